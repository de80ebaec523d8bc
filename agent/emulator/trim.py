"""
Freed heap memory back to the system after connections close (glibc's ``malloc_trim``).

glibc keeps freed memory in its heaps for reuse. Each connection's buffers are a few hundred KB
(the TLS layer's, the WebSocket receive buffer); once glibc has raised its mmap threshold above
that size, they come from the heap, and when a burst of connections closes, the holes they leave
keep the process's RSS at its peak. ``malloc_trim(0)`` hands whole free pages back. It walks the
heaps, so it runs once per quiet interval after closes, not once per close.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from collections.abc import Callable


__all__ = ["TRIM_DELAY", "Trimmer"]

log = logging.getLogger("agent.emulator.relay")

# Seconds between a close and the trim that follows it; closes meanwhile share that trim.
TRIM_DELAY = 1.0


def _malloc_trim() -> Callable[[int], int] | None:
    """
    The C library's ``malloc_trim``, or None on a C library without it (musl, macOS).
    """
    try:
        libc = ctypes.CDLL(None)
    except OSError:  # pragma: no cover - every POSIX has a process handle
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:  # pragma: no cover - glibc has it
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim  # type: ignore[no-any-return]


class Trimmer:
    """
    Trims the heap ``delay`` seconds after the first of a run of closes.
    """

    def __init__(self, delay: float = TRIM_DELAY) -> None:
        """
        Find ``malloc_trim``; without it, ``closed`` does nothing.
        """
        self._delay = delay
        self._trim = _malloc_trim()
        self._handle: asyncio.TimerHandle | None = None
        self.trims = 0

    def closed(self) -> None:
        """
        A connection closed: trim soon, unless a trim is already due.
        """
        if self._trim is not None and self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self._delay, self._run)

    def cancel(self) -> None:
        """
        Drop a trim that is due (the relay is closing).
        """
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _run(self) -> None:
        self._handle = None
        if self._trim is not None:
            self._trim(0)
            self.trims += 1
