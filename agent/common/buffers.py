"""
Receive buffers that cost memory only where bytes have landed.

``bytearray(n)`` writes n zero bytes: every page of it is private memory at once, even in an
idle tunnel that never receives more than a ping. An anonymous mapping starts as the kernel's
shared zero page; a page becomes the process' own only when something is written into it. A
receive buffer that is refilled from its start holds as many pages as its largest read.
"""

from __future__ import annotations

import mmap


__all__ = ["lazy_buffer"]


def lazy_buffer(size: int) -> mmap.mmap:
    """
    A zero-filled, writable ``size``-byte buffer whose pages are allocated on first write.

    It slices, searches (``find``) and exports the buffer protocol like a ``bytearray`` of
    fixed size; it is unmapped when the last reference to it (or a view of it) goes.
    """
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
