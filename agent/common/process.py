"""
Child processes that die with their parent: the kernel's death signal.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from collections.abc import Callable


__all__ = ["death_signal_preexec"]

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - a Linux without a loadable libc
        return None
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    result: Callable[..., int] = prctl
    return result


# Resolved once at import: the forked child must only call an already-bound function.
_prctl = _load_prctl()


def death_signal_preexec(parent_pid: int) -> Callable[[], None] | None:
    """
    Return a ``preexec_fn`` that has the kernel send the child SIGTERM when its parent dies.

    The signal follows the *thread* that forked the child (``PR_SET_PDEATHSIG``), so
    start children from a thread that lives as long as the parent, and before any
    change of user (which clears it).

    Args:
        parent_pid: The parent's pid (``os.getpid()`` before the fork): a child whose
            parent died before the call took effect exits at once.

    Returns:
        The function, or ``None`` where the platform has no death signal.
    """
    if _prctl is None:  # pragma: no cover - non-Linux
        return None
    prctl = _prctl

    def preexec() -> None:
        # Runs in the child between fork and exec; keep it to one syscall and a check.
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec
