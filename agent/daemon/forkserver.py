"""
Bundled proxies forked by one pre-initialised launcher process (``agent.proxy.launcher``).

The daemon never imports the proxy: it runs the launcher as a program, talks to it over a
private ``SOCK_SEQPACKET`` pair (``agent/common/launchwire.py``) and gets one forked
``tunnel-localproxy`` per request. Such a proxy is not our child, so it is watched through
a pidfd that the launcher sends along (``pidfd_open`` on its own fresh child: no pid reuse
race), and its exit status comes back over the channel; when the launcher is gone the
status is unknown and counts as a failure (the tunnel's proxy is restarted). Otherwise it
is supervised as before: same pipes, same signals to its process group.

Lifetimes:

- The launcher is our child: ``PR_SET_PDEATHSIG`` and the lifeline stop it when we die; it
  is restarted after a delay when it dies, and running proxies are unaffected.
- Each proxy holds the read end of the lifeline pipe, whose write end only the agent holds,
  and stops at end of file: after the agent's death, even ``kill -9``, whatever became of
  the launcher. Both ends are inherited across a reload's ``execv`` (their numbers in
  :data:`LIFELINE_ENV`), so the proxies survive a reload; the channel is not, so the old
  launcher exits and the new image starts its own, with the new code.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import signal
import socket
import stat
import sys
from typing import TYPE_CHECKING

import structlog

from agent.common import launchwire
from agent.common.process import death_signal_preexec, ksm_state
from agent.daemon.children import Child, ChildExit, is_our_child, spawn
from agent.daemon.supervisor import (
    ProxyProcess,
    SubprocessLauncher,
    proxy_command,
    with_report_channel,
)
from agent.exceptions import ProxyStartError


if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, MutableMapping

    from structlog.typing import FilteringBoundLogger

    from agent.daemon.supervisor import ProxySpec


__all__ = ["LIFELINE_ENV", "ForeignExit", "ForkLauncher", "Lifeline"]

log = structlog.get_logger("agent.daemon.forkserver")

#: ``READ,WRITE``: the lifeline's descriptors, for the next program image.
LIFELINE_ENV = "IOT_TUNNEL_AGENT_LIFELINE_FDS"
LAUNCHER_COMMAND = (sys.executable, "-m", "agent.proxy.launcher")
# How long an exited proxy's status may take to come over the channel.
_STATUS_WAIT = 2.0
_START_TIMEOUT = 15.0
_RESTART_DELAYS = (0.2, 1.0, 5.0, 30.0)
# A launcher that lived this long (seconds) restarts after the shortest delay again.
_STABLE = 30.0
_KEPT_STATUSES = 1024


class Lifeline:
    """
    A pipe whose write end only the agent holds: end of file means the agent is gone.
    """

    def __init__(self, read: int, write: int) -> None:
        """
        Use an existing pipe.
        """
        self.read = read
        self.write = write

    @classmethod
    def inherit_or_create(cls, environ: MutableMapping[str, str] | None = None) -> Lifeline:
        """
        The lifeline a previous program image left (a reload), else a new one.

        Both ends stay inheritable (``subprocess`` closes them in other children) and their
        numbers are in :data:`LIFELINE_ENV`, so a re-exec keeps them.
        """
        env = os.environ if environ is None else environ
        value = env.get(LIFELINE_ENV, "")
        read_s, _, write_s = value.partition(",")
        if read_s.isdigit() and write_s.isdigit():
            read, write = int(read_s), int(write_s)
            with contextlib.suppress(OSError):
                if all(stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in (read, write)):
                    return cls(read, write)
        read, write = os.pipe()
        for fd in (read, write):
            os.set_inheritable(fd, True)  # noqa: FBT003 - os API
        env[LIFELINE_ENV] = f"{read},{write}"
        return cls(read, write)


class ForeignExit:
    """
    The exit of a proxy that is not our child: its pidfd, then its status from the launcher.
    """

    def __init__(
        self, pid: int, pidfd: int, report: Callable[[int], asyncio.Future[int | None]]
    ) -> None:
        """
        Watch ``pidfd`` (ours now); ``report(pid)`` resolves to the status, ``None`` if lost.
        """
        self.pid = pid
        self._loop = asyncio.get_running_loop()
        self.status: asyncio.Future[int] = self._loop.create_future()
        self._pidfd: int | None = pidfd
        self._report = report
        self._released = False
        self._loop.add_reader(pidfd, self._gone)

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _gone(self) -> None:
        self._close_pidfd()
        report = self._report(self.pid)
        timer = self._loop.call_later(_STATUS_WAIT, self._finish, None)

        def reported(future: asyncio.Future[int | None]) -> None:
            timer.cancel()
            self._finish(None if future.cancelled() else future.result())

        report.add_done_callback(reported)

    def _finish(self, code: int | None) -> None:
        if self._released or self.status.done():
            return
        # Unknown (the launcher is gone): a failure, so the tunnel's proxy is restarted.
        self.status.set_result(255 if code is None else code)

    @property
    def returncode(self) -> int | None:
        """
        The exit status once known, else ``None``.
        """
        return self.status.result() if self.status.done() else None

    def release(self) -> None:
        """
        Stop watching: the process is handed to another program image.
        """
        self._released = True
        self._close_pidfd()
        if not self.status.done():
            self.status.cancel()


def _forked_by_a_launcher(pid: int) -> bool:
    try:
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read()  # noqa: PTH123, SIM115
        owner = os.stat(f"/proc/{pid}").st_uid  # noqa: PTH116
    except OSError:
        return False
    return b"agent.proxy.launcher" in cmdline and owner == os.getuid()


class ForkLauncher:
    """
    Starts bundled proxies through the launcher process; supervises the launcher.
    """

    def __init__(
        self,
        *,
        env: Mapping[str, str],
        command: tuple[str, ...] = LAUNCHER_COMMAND,
        merge_pages: bool = False,
    ) -> None:
        """
        Prepare; the launcher starts on :meth:`warm_up` or the first launch.

        Args:
            env: The launcher's environment, which its proxies share (no tokens in it).
            command: How the launcher is run.
            merge_pages: Offer the launcher's and its proxies' memory to the kernel's
                same-page merging (``proxy.merge_pages``).
        """
        self._env = dict(env)
        self._command = (*command, "--merge-pages") if merge_pages else command
        self._merge_pages = merge_pages
        self._prefix = tuple(proxy_command("bundled"))
        self._lifeline = Lifeline.inherit_or_create()
        self._plain = SubprocessLauncher()
        self._channel: socket.socket | None = None
        self._launcher: Child | None = None
        self._launcher_task: asyncio.Task[None] | None = None
        self._started_at = 0.0
        self._failures = 0
        self._restart: asyncio.TimerHandle | None = None
        self._closing = False
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[tuple[int, int]]] = {}
        self._mine: set[int] = set()  # proxies the current launcher forked, not yet exited
        self._statuses: dict[int, int] = {}
        self._waiters: dict[int, asyncio.Future[int | None]] = {}

    @property
    def launcher_pid(self) -> int | None:
        """
        The running launcher's pid.
        """
        return None if self._launcher is None else self._launcher.pid

    def warm_up(self) -> None:
        """
        Start the launcher now, so the first tunnel does not wait for its imports.
        """
        if self._channel is None and not self._closing:
            self._start_launcher()

    def _start_launcher(self) -> None:
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            child = spawn(
                [
                    *self._command,
                    "--channel-fd", str(theirs.fileno()),
                    "--lifeline-fd", str(self._lifeline.read),
                ],
                env=self._env,
                preexec_fn=death_signal_preexec(os.getpid()),
                pass_fds=(theirs.fileno(), self._lifeline.read),
            )  # fmt: skip
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        loop = asyncio.get_running_loop()
        ours.setblocking(False)  # noqa: FBT003 - socket API
        self._channel = ours
        self._launcher = child
        self._started_at = loop.time()
        loop.add_reader(ours.fileno(), self._readable)
        self._launcher_task = asyncio.ensure_future(self._watch_launcher(child))
        merging = {"ksm": ksm_state()} if self._merge_pages else {}
        log.info("proxy_launcher_started", pid=child.pid, **merging)

    async def _watch_launcher(self, child: Child) -> None:
        exit_watch = ChildExit(child.pid)
        loop = asyncio.get_running_loop()
        pumps = [
            asyncio.ensure_future(self._pump(fd, stream))
            for fd, stream in ((child.stdout, "stdout"), (child.stderr, "stderr"))
        ]
        try:
            returncode = await exit_watch.status
        finally:
            for pump in pumps:
                pump.cancel()
        self._launcher_gone(returncode)
        if self._closing:
            return
        lived = loop.time() - self._started_at
        self._failures = 0 if lived >= _STABLE else self._failures + 1
        delay = _RESTART_DELAYS[min(self._failures, len(_RESTART_DELAYS) - 1)]
        log.warning("proxy_launcher_exited", pid=child.pid, returncode=returncode, restart_in=delay)
        self._restart = loop.call_later(delay, self._restart_launcher)

    def _restart_launcher(self) -> None:
        self._restart = None
        if self._channel is None and not self._closing:
            try:
                self._start_launcher()
            except OSError as exc:
                log.error("proxy_launcher_start_failed", error=exc.strerror)  # noqa: TRY400

    async def _pump(self, fd: int, stream: str) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        transport, _ = await loop.connect_read_pipe(
            functools.partial(lambda p: p, protocol), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            while line := await reader.readline():
                text = line.decode("utf-8", "replace").rstrip()[:2000]
                if text:
                    log.warning("proxy_launcher_output", stream=stream, line=text)
        finally:
            transport.close()

    def _launcher_gone(self, returncode: int) -> None:
        if self._channel is not None:
            asyncio.get_running_loop().remove_reader(self._channel.fileno())
            self._channel.close()
            self._channel = None
        self._launcher = None
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ProxyStartError(f"the proxy launcher exited ({returncode})"))
        self._pending.clear()
        # Its proxies run on, but nobody can tell their exit status any more.
        self._mine.clear()
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def _readable(self) -> None:
        channel = self._channel
        while channel is not None:
            try:
                received = launchwire.receive(channel)
            except BlockingIOError:
                return
            except (OSError, launchwire.WireError) as exc:
                log.warning("proxy_launcher_channel_error", error=str(exc))
                return
            if received is None:
                asyncio.get_running_loop().remove_reader(channel.fileno())
                return
            self._dispatch(*received)

    def _dispatch(self, message: dict[str, object], fds: list[int]) -> None:
        op, pid = message.get("op"), message.get("pid")
        if op in {"started", "failed"}:
            ident = message.get("id")
            future = self._pending.pop(ident, None) if isinstance(ident, int) else None
            if op == "started" and isinstance(pid, int) and len(fds) == 1:
                self._mine.add(pid)
                if future is not None and not future.done():
                    future.set_result((pid, fds[0]))
                    return
            elif future is not None and not future.done():
                future.set_exception(ProxyStartError(f"cannot start: {message.get('error')}"))
        elif op == "exited" and isinstance(pid, int) and isinstance(message.get("status"), int):
            status = message["status"]
            assert isinstance(status, int)  # noqa: S101 - checked above
            self._mine.discard(pid)
            waiter = self._waiters.pop(pid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(status)
            else:
                if len(self._statuses) >= _KEPT_STATUSES:
                    self._statuses.pop(next(iter(self._statuses)))
                self._statuses[pid] = status
        for fd in fds:
            os.close(fd)

    def _report(self, pid: int) -> asyncio.Future[int | None]:
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        if pid in self._statuses:
            future.set_result(self._statuses.pop(pid))
        elif pid in self._mine:
            self._waiters[pid] = future
        else:
            future.set_result(None)  # forked by an earlier launcher: nobody will tell
        return future

    async def launch(
        self,
        spec: ProxySpec,
        *,
        log: FilteringBoundLogger,
        on_change: Callable[[], None] | None = None,
    ) -> ProxyProcess:
        """
        Have the launcher fork one proxy; anything but the bundled proxy is spawned as before.

        Raises:
            ProxyStartError: The launcher could not start it.
        """
        tokens = spec.tokens
        if tuple(spec.argv[: len(self._prefix)]) != self._prefix or tokens is None:
            return await self._plain.launch(spec, log=log, on_change=on_change)
        if self._channel is None:
            try:
                self._start_launcher()
            except OSError as exc:
                raise ProxyStartError(f"cannot start the proxy launcher: {exc.strerror}") from exc
        channel = self._channel
        assert channel is not None  # noqa: S101 - just started
        spec, report = with_report_channel(spec)
        loop = asyncio.get_running_loop()
        ident = next(self._ids)
        future: asyncio.Future[tuple[int, int]] = loop.create_future()
        self._pending[ident] = future
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        request = {
            "op": "start",
            "id": ident,
            "argv": list(spec.argv[len(self._prefix) :]),
            "tokens": list(tokens),
            "fds": list(spec.pass_fds),
        }
        try:
            launchwire.send(channel, request, [out_w, err_w, self._lifeline.read, *spec.pass_fds])
            async with asyncio.timeout(_START_TIMEOUT):
                pid, pidfd = await future
        except BaseException as exc:
            self._pending.pop(ident, None)
            for fd in (out_r, err_r) if report is None else (out_r, err_r, report[0]):
                os.close(fd)
            if isinstance(exc, OSError | TimeoutError):
                raise ProxyStartError(f"the proxy launcher did not answer: {exc}") from exc
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
            if report is not None:
                os.close(report[1])
        return await ProxyProcess.watch(
            Child(pid, out_r, err_r),
            log=log,
            stop_grace=spec.stop_grace,
            connect_timeout=spec.connect_timeout,
            on_change=on_change,
            exit_watch=ForeignExit(pid, pidfd, self._report),
            report_fd=None if report is None else report[0],
        )

    async def adopt(
        self,
        child: Child,
        *,
        log: FilteringBoundLogger,
        stop_grace: float,
        connect_timeout: float = 30.0,
        on_change: Callable[[], None] | None = None,
    ) -> ProxyProcess | None:
        """
        Watch a proxy of a previous program image: our child, or forked by a launcher.
        """
        if is_our_child(child.pid):
            return await self._plain.adopt(
                child,
                log=log,
                stop_grace=stop_grace,
                connect_timeout=connect_timeout,
                on_change=on_change,
            )
        pidfd = None
        if _forked_by_a_launcher(child.pid):
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(child.pid)
        if pidfd is None:
            child.close_pipes()
            return None
        return await ProxyProcess.watch(
            child,
            log=log,
            stop_grace=stop_grace,
            connect_timeout=connect_timeout,
            on_change=on_change,
            exit_watch=ForeignExit(child.pid, pidfd, self._report),
        )

    async def aclose(self) -> None:
        """
        Stop the launcher (its proxies are the tunnel manager's to stop).
        """
        self._closing = True
        if self._restart is not None:
            self._restart.cancel()
        launcher, task = self._launcher, self._launcher_task
        if launcher is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(launcher.pid, signal.SIGTERM)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
