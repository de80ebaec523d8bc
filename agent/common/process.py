"""
Process-level kernel requests: a child's death signal, and same-page merging (KSM).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from collections.abc import Callable


__all__ = ["death_signal_preexec", "ksm_state", "share_identical_pages"]

_PR_SET_PDEATHSIG = 1
_PR_SET_MEMORY_MERGE = 67  # Linux 6.4
_MADV_MERGEABLE = 12
_KSM_RUN = "/sys/kernel/mm/ksm/run"


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


def share_identical_pages() -> str:
    """
    Offer this process's memory to the kernel's same-page merging (KSM); children inherit it.

    Forked proxies hold many page copies that are identical to the launcher's or to each
    other's (a reference count that went up and down again, the same first-use writes in
    every child); ksmd, when it runs, maps each such page once (docs/architecture.md §5.2).
    Nothing happens while ksmd is stopped, and only memory offered like this is scanned.

    Returns:
        ``"process"`` (``PR_SET_MEMORY_MERGE``: every mapping, present and future),
        ``"mappings"`` (older kernels: ``MADV_MERGEABLE`` on each private writable mapping
        there is now) or ``"unavailable"`` (no KSM in this kernel, or not Linux).
    """
    if _prctl is None:  # pragma: no cover - non-Linux
        return "unavailable"
    if _prctl(_PR_SET_MEMORY_MERGE, 1, 0, 0, 0) == 0:
        return "process"
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    offered = 0
    with open("/proc/self/maps", encoding="ascii") as maps:  # noqa: PTH123 - no pathlib
        for line in maps:
            fields = line.split()
            if fields[1][1] != "w" or fields[1][3] != "p" or fields[-1] in {"[stack]", "[vvar]"}:
                continue
            start, end = (int(value, 16) for value in fields[0].split("-"))
            if madvise(start, end - start, _MADV_MERGEABLE) == 0:
                offered += 1
    return "mappings" if offered else "unavailable"


def ksm_state() -> str:
    """
    Whether the kernel's same-page merging daemon runs: ``running``, ``stopped`` or ``absent``.
    """
    try:
        with open(_KSM_RUN, encoding="ascii") as run:  # noqa: PTH123 - no pathlib
            value = run.read().strip()
    except OSError:
        return "absent"
    return "running" if value == "1" else "stopped"  # 0 stops it, 2 unmerges and stops


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
