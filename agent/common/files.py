"""
Files that hold secrets or state: written whole, atomically, readable by the owner only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


__all__ = ["write_private"]


def write_private(path: Path, data: bytes) -> None:
    """
    Replace ``path`` with ``data``, mode 0600, atomically and durably.

    The temporary file is created 0600 before a byte is written, so the content is
    never readable by others, not even for a moment; the rename means a crash leaves
    either the old file or the new one, never a torn one. The temporary name is
    unique, so concurrent writers (threads, processes) cannot mix their bytes.

    Args:
        path: Destination; its directory must exist.
        data: The whole content.

    Raises:
        OSError: The directory is not writable, the disk is full ...; the
            temporary file is removed and ``path`` is unchanged.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    temporary = Path(name)
    try:
        try:
            os.fchmod(fd, 0o600)  # mkstemp already uses 0600; say it whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        temporary.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
