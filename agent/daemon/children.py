"""
The agent's child processes, known by pid and two pipe descriptors only.

A reload re-executes the agent in place (same pid), and the new program adopts the
running proxies: all it can be given is each child's pid and its stdout/stderr pipes.
So every proxy is watched that way from the start, launched or adopted alike:
``subprocess.Popen`` does the fork and exec, then the exit is awaited through a pidfd
(``pidfd_open``, Linux >= 5.3) that the event loop watches, and reaped with
``waitpid(pid, WNOHANG)``. Without pidfds a thread blocks in ``waitpid`` instead.

``subprocess`` itself must never reap these children (``Popen.__del__`` polls a child
it thinks is still running): each ``Popen`` is kept until we have reaped its pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol


if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence


__all__ = ["Child", "ChildExit", "ExitWatch", "is_our_child", "our_children", "spawn"]

# Popen objects of children not reaped yet (see the module docstring).
_popens: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True, slots=True)
class Child:
    """
    A child process: its pid and the read ends of its stdout and stderr pipes.

    Attributes:
        pid: The process id (it leads its own process group).
        stdout: File descriptor of its stdout pipe.
        stderr: File descriptor of its stderr pipe.
    """

    pid: int
    stdout: int
    stderr: int

    def close_pipes(self) -> None:
        """
        Close both pipe descriptors (a child that will not be watched).
        """
        for fd in (self.stdout, self.stderr):
            with contextlib.suppress(OSError):
                os.close(fd)


def spawn(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    preexec_fn: Callable[[], None] | None = None,
    pass_fds: Sequence[int] = (),
) -> Child:
    """
    Start a child in its own process group, stdin from /dev/null, stdout and stderr piped.

    ``pass_fds`` are inherited under the same numbers; every other descriptor is closed.

    Raises:
        OSError: The program is missing or cannot be executed.
    """
    # Our own pipes, not PIPE: the read ends stay plain descriptors that can be handed on.
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        popen = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            close_fds=True,
            pass_fds=tuple(pass_fds),
            process_group=0,
            preexec_fn=preexec_fn,  # noqa: PLW1509 - one prctl, see supervisor.py
        )
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    _popens[popen.pid] = popen
    return Child(popen.pid, out_r, err_r)


def _reaped(pid: int, returncode: int) -> None:
    popen = _popens.pop(pid, None)
    if popen is not None:
        popen.returncode = returncode


def is_our_child(pid: int) -> bool:
    """
    Whether ``pid`` is a child of this process that has not been reaped.
    """
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def our_children() -> set[int]:
    """
    The pids of this process' children, from ``/proc/self/task/*/children``.
    """
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (task / "children").read_text().split())
    return found


class ExitWatch(Protocol):
    """
    How a supervised process' exit is learnt: :class:`ChildExit` for our own children.
    """

    status: asyncio.Future[int]

    @property
    def returncode(self) -> int | None:
        """
        The exit status once known, else ``None``.
        """
        ...

    def release(self) -> None:
        """
        Stop watching: the process is handed to another program image.
        """
        ...


class ChildExit:
    """
    The exit status of one child, reaped exactly once, awaitable from the event loop.
    """

    def __init__(self, pid: int) -> None:
        """
        Start watching ``pid``, which must be our child (:func:`is_our_child`).

        Args:
            pid: The child's pid.
        """
        self.pid = pid
        self._loop = asyncio.get_running_loop()
        self.status: asyncio.Future[int] = self._loop.create_future()
        self._pidfd: int | None = None
        self._released = False
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            # Already reaped by someone else: the status is lost.
            self._finish(None)
            return
        except OSError:
            # No pidfds (kernel < 5.3, or a seccomp filter): a thread waits instead.
            threading.Thread(target=self._wait_blocking, name=f"waitpid-{pid}", daemon=True).start()
            return
        self._loop.add_reader(self._pidfd, self._poll)
        self._poll()

    def _poll(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            self._finish(None)
            return
        if pid != 0:
            self._finish(os.waitstatus_to_exitcode(status))

    def _wait_blocking(self) -> None:
        try:
            _, status = os.waitpid(self.pid, 0)
            code: int | None = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._finish, code)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _finish(self, code: int | None) -> None:
        self._close_pidfd()
        if self._released or self.status.done():
            return
        # Status unknown (reaped elsewhere): report a failure, so the tunnel is restarted.
        returncode = 255 if code is None else code
        _reaped(self.pid, returncode)
        self.status.set_result(returncode)

    @property
    def returncode(self) -> int | None:
        """
        The exit status once reaped (negative: the signal that killed it), else ``None``.
        """
        return self.status.result() if self.status.done() else None

    def release(self) -> None:
        """
        Stop watching without reaping: the child is handed to another program image.
        """
        self._released = True
        self._close_pidfd()
        if not self.status.done():
            self.status.cancel()
