"""
Spawn, watch and stop one destination local proxy process (docs/architecture.md §5.2).

One command line serves the bundled ``tunnel-localproxy`` and the AWS localproxy
binary: both take ``-d MAP``, ``-r REGION`` or ``-e ENDPOINT``, ``-c`` and ``-k``
(docs/protocol.md §9). The access token and the client token never travel in argv, which is
world-readable in ``/proc/*/cmdline`` (docs/architecture.md §7.4): the bundled proxy reads
them from an inherited pipe (``--token-fd``), so they are not in its ``/proc/PID/environ``
either; an external binary gets them in its environment (``AWSIOT_TUNNEL_ACCESS_TOKEN``,
``AWSIOT_TUNNEL_CLIENT_TOKEN``, ``AWSIOT_CLIENT_TOKEN``). Neither argv nor the environment
is ever logged.

Children die with the agent: each child asks the kernel for SIGTERM when its
parent thread exits (``PR_SET_PDEATHSIG``), so not even ``kill -9`` of the
agent leaves a proxy behind. A reload re-executes the agent in place: the process
does not exit, so its proxies live on as its children and the next program image
adopts them (:meth:`ProxyLauncher.adopt`). Each child leads its own process group, so a
terminal's Ctrl-C reaches only the agent, which then stops the proxies in order
(docs/architecture.md §6.5), and a stop reaches whatever the proxy itself started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import secrets
import signal
import string
import sys
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal, Protocol

from agent.common.process import death_signal_preexec
from agent.common.secretpipe import token_pipe
from agent.daemon.children import Child, ChildExit, ExitWatch, is_our_child, spawn
from agent.daemon.proxyoutput import ConnectionWatch
from agent.daemon.proxyreport import ProxyFigures, is_bundled
from agent.exceptions import ProxyStartError


if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path

    from structlog.typing import FilteringBoundLogger


__all__ = [
    "ProxyHandle",
    "ProxyLauncher",
    "ProxyProcess",
    "ProxySpec",
    "SubprocessLauncher",
    "build_argv",
    "build_env",
    "new_client_token",
    "proxy_command",
    "with_report_channel",
]

_CLIENT_TOKEN_ALPHABET = string.ascii_letters + string.digits + "-"
# Inherited from the agent's environment; everything else (notably TUNNEL_AGENT_*
# and NOTIFY_SOCKET) stays out of the proxy's environment.
_INHERITED_ENV = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR",
     "PYTHONPATH", "VIRTUAL_ENV", "SSL_CERT_FILE", "SSL_CERT_DIR", "PYTHONASYNCIODEBUG"}
)  # fmt: skip
_INHERITED_PREFIXES = ("LC_", "COVERAGE_", "COV_CORE_")
# Longest stdout/stderr line logged; longer ones are cut (a log line is not a dump).
_MAX_LINE = 2000
_PIPE_LIMIT = 64 * 1024
# After the proxy exits, how long its pipes may stay open (held by a grandchild).
_PIPE_DRAIN_TIMEOUT = 1.0


def proxy_command(binary: Literal["bundled"] | Path) -> list[str]:
    """
    Return the command that starts the configured local proxy, before its flags.

    Args:
        binary: ``"bundled"`` or the path of an AWS-localproxy-compatible binary.

    Returns:
        ``[sys.executable, "-m", "agent.proxy"]`` or ``[str(binary)]``.
    """
    if binary == "bundled":
        return [sys.executable, "-m", "agent.proxy"]
    return [str(binary)]


def new_client_token(length: int = 64) -> str:
    """
    Generate a fresh client token: the proxy reconnects with it after a drop.

    Args:
        length: 32 to 128 characters (docs/protocol.md §3.1).

    Returns:
        ``length`` characters from ``[a-zA-Z0-9-]``, from :mod:`secrets`.

    Raises:
        ValueError: ``length`` is out of range.
    """
    if not 32 <= length <= 128:
        raise ValueError("client tokens are 32 to 128 characters")
    return "".join(secrets.choice(_CLIENT_TOKEN_ALPHABET) for _ in range(length))


def build_argv(  # noqa: PLR0913 - keyword-only, one per localproxy flag
    command: Sequence[str],
    *,
    services: Mapping[str, str],
    region: str,
    endpoint: str | None = None,
    ca: Path | None = None,
    no_verify: bool = False,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """
    Build a destination proxy's argv; it never contains a token.

    Args:
        command: :func:`proxy_command`'s result.
        services: Service id -> target (``22``, ``host:port`` or a socket path), validated.
        region: The tunnel's region, used unless ``endpoint`` is set.
        endpoint: ``host[:port]`` override (the emulator's relay).
        ca: CA file or directory for the data-plane TLS (``-c``).
        no_verify: Skip TLS verification (``-k``), emulator only.
        extra_args: Further flags from the settings, appended last.

    Returns:
        The full argv.
    """
    argv = [*command, "-d", ",".join(f"{name}={target}" for name, target in services.items())]
    argv += ["-e", endpoint] if endpoint is not None else ["-r", region]
    if ca is not None:
        argv += ["-c", str(ca)]
    if no_verify:
        argv.append("-k")
    argv += extra_args
    return argv


def build_env(
    *,
    token: str | None,
    client_token: str | None,
    extra_env: Mapping[str, str] | None = None,
    http_proxy: str | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """
    Build a proxy's environment: a short allow-list of ours plus the tunnel's tokens.

    Args:
        token: The destination client access token; ``None`` when it travels on a pipe.
        client_token: The tunnel's client token; ``None`` when it travels on a pipe.
        extra_env: Variables from the settings.
        http_proxy: Outbound web proxy, passed as ``HTTPS_PROXY`` (localproxy reads it).
        base: Environment to inherit from; :data:`os.environ` by default.

    Returns:
        The child's complete environment.
    """
    source = os.environ if base is None else base
    env = {
        name: value
        for name, value in source.items()
        if name in _INHERITED_ENV or name.startswith(_INHERITED_PREFIXES)
    }
    if http_proxy is not None:
        env["HTTPS_PROXY"] = http_proxy
    env.update(extra_env or {})
    if token is not None:
        env["AWSIOT_TUNNEL_ACCESS_TOKEN"] = token
    if client_token is not None:
        # AWSIOT_TUNNEL_CLIENT_TOKEN is ours; the AWS localproxy reads AWSIOT_CLIENT_TOKEN.
        # Both, so either binary reconnects with the same client token.
        env["AWSIOT_TUNNEL_CLIENT_TOKEN"] = env["AWSIOT_CLIENT_TOKEN"] = client_token
    return env


@dataclass(frozen=True, slots=True)
class ProxySpec:
    """
    Everything needed to start one proxy process.

    Attributes:
        argv: The command line (no secrets).
        env: The complete environment (tokens included for an external binary); not in repr.
        stop_grace: Seconds between SIGTERM and SIGKILL on stop.
        connect_timeout: Seconds the proxy may take to say it is connected.
        tokens: Access and client token for the bundled proxy, handed over on a pipe
            (``--token-fd``) instead of the environment; ``None`` for an external binary.
        pass_fds: Further descriptors the proxy inherits under the same numbers.
    """

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)
    stop_grace: float = 2.0
    connect_timeout: float = 30.0
    tokens: tuple[str, str | None] | None = field(default=None, repr=False)
    pass_fds: tuple[int, ...] = ()


def _same(protocol: asyncio.StreamReaderProtocol) -> asyncio.StreamReaderProtocol:
    return protocol


class ProxyHandle(Protocol):
    """
    A running proxy, as the tunnel manager sees it.
    """

    @property
    def pid(self) -> int:
        """
        The process id.
        """
        ...

    @property
    def returncode(self) -> int | None:
        """
        The exit status once reaped (negative: killed by that signal), else ``None``.
        """
        ...

    @property
    def connected(self) -> bool | None:
        """
        ``True`` once connected, ``None`` while connecting, ``False`` once overdue.
        """
        ...

    @property
    def last_error(self) -> str | None:
        """
        The proxy's latest warning or error line since it last connected.
        """
        ...

    async def wait(self) -> int:
        """
        Wait for the process to exit and return its status; safe to await concurrently.
        """
        ...

    async def stop(self) -> int:
        """
        Stop the process (SIGTERM, grace, SIGKILL), reap it and return its status.
        """
        ...

    async def detach(self) -> Child | None:
        """
        Stop watching the process and leave it running, for the next program image.

        Returns:
            Its pid and inheritable copies of its pipes, or ``None`` if it has exited.
        """
        ...


class ProxyLauncher(Protocol):
    """
    Starts proxies: the real :class:`SubprocessLauncher` or a test fake.
    """

    async def launch(
        self,
        spec: ProxySpec,
        *,
        log: FilteringBoundLogger,
        on_change: Callable[[], None] | None = None,
    ) -> ProxyHandle:
        """
        Start one proxy; ``log`` carries the tunnel's context for its output lines.

        ``on_change`` is called when the proxy's ``connected`` or ``last_error`` changes.
        """
        ...

    async def adopt(
        self,
        child: Child,
        *,
        log: FilteringBoundLogger,
        stop_grace: float,
        connect_timeout: float = 30.0,
        on_change: Callable[[], None] | None = None,
    ) -> ProxyHandle | None:
        """
        Watch a proxy a previous program image of this process started (a reload).

        Returns:
            Its handle, or ``None`` if ``child`` is not (or no longer) our child.
        """
        ...


class ProxyProcess:
    """
    One proxy child: its output goes to the log, its exit is awaited once and shared.

    Launched and adopted proxies are the same: a pid and two pipes (agent/daemon/children.py).
    """

    def __init__(  # noqa: PLR0913 - keyword-only watch settings
        self,
        child: Child,
        pipes: Sequence[tuple[asyncio.ReadTransport, asyncio.StreamReader]],
        *,
        log: FilteringBoundLogger,
        stop_grace: float,
        connect_timeout: float = 30.0,
        on_change: Callable[[], None] | None = None,
        exit_watch: ExitWatch | None = None,
        figures: ProxyFigures | None = None,
    ) -> None:
        """
        Watch a child whose pipes are already connected; use :meth:`watch`.
        """
        #: Connections and bytes from the bundled proxy's report channel, else ``None``.
        self.figures = figures
        self._child = child
        self._pipes = list(pipes)
        self._exit: ExitWatch = ChildExit(child.pid) if exit_watch is None else exit_watch
        self._log = log.bind(pid=child.pid)
        self._stop_grace = stop_grace
        self._connection = ConnectionWatch(
            log=self._log, timeout=connect_timeout, on_change=on_change
        )
        # One watcher task; every waiter awaits it through a shield.
        self._exited = asyncio.ensure_future(self._watch())

    @classmethod
    async def watch(  # noqa: PLR0913 - keyword-only watch settings
        cls,
        child: Child,
        *,
        log: FilteringBoundLogger,
        stop_grace: float,
        connect_timeout: float = 30.0,
        on_change: Callable[[], None] | None = None,
        exit_watch: ExitWatch | None = None,
        report_fd: int | None = None,
    ) -> ProxyProcess:
        """
        Start watching ``child``: log its output lines, await its exit.

        Args:
            child: Our child; its pipe descriptors now belong to the returned object.
            log: Logger bound to the tunnel's context.
            stop_grace: Seconds between SIGTERM and SIGKILL in :meth:`stop`.
            connect_timeout: Seconds it may take to say it is connected before it is reported.
            on_change: Called when :attr:`connected` or :attr:`last_error` changes.
            exit_watch: How its exit is learnt; by default it is our child, reaped here.
            report_fd: The read end of the bundled proxy's report channel (now owned here).
        """
        loop = asyncio.get_running_loop()
        figures = None
        if report_fd is not None:
            figures = ProxyFigures(log=log.bind(pid=child.pid), on_change=on_change)
            await figures.watch(report_fd)
        pipes = []
        for fd in (child.stdout, child.stderr):
            # Inherited across a re-exec they were inheritable: ours alone from now on.
            os.set_inheritable(fd, False)  # noqa: FBT003 - os API
            reader = asyncio.StreamReader(limit=_PIPE_LIMIT, loop=loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            # A pipe: no disk I/O. The transport owns (and closes) the descriptor.
            pipe = os.fdopen(fd, "rb", buffering=0)
            transport, _ = await loop.connect_read_pipe(functools.partial(_same, protocol), pipe)
            pipes.append((transport, reader))
        return cls(
            child,
            pipes,
            log=log,
            stop_grace=stop_grace,
            connect_timeout=connect_timeout,
            on_change=on_change,
            exit_watch=exit_watch,
            figures=figures,
        )

    @property
    def pid(self) -> int:
        """
        The process id.
        """
        return self._child.pid

    @property
    def returncode(self) -> int | None:
        """
        The exit status once reaped, else ``None``.
        """
        return self._exit.returncode

    @property
    def connected(self) -> bool | None:
        """
        ``True`` once connected, ``None`` while connecting, ``False`` once overdue.
        """
        return self._connection.connected

    @property
    def last_error(self) -> str | None:
        """
        The proxy's latest warning or error line since it last connected (tokens masked).
        """
        return self._connection.last_error

    async def _pump(self, reader: asyncio.StreamReader, stream: str) -> None:
        while True:
            try:
                line = await reader.readline()
            except ValueError:
                # Longer than the pipe limit: asyncio dropped it; say so and go on.
                self._log.warning("proxy_output_truncated", stream=stream)
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self._connection.feed(text[:_MAX_LINE], stream)

    async def _watch(self) -> int:
        pumps: list[asyncio.Future[None]] = [
            asyncio.ensure_future(self._pump(reader, stream))
            for (_, reader), stream in zip(self._pipes, ("stdout", "stderr"), strict=True)
        ]
        pending: set[asyncio.Future[None]] = set()
        try:
            returncode = await asyncio.shield(self._exit.status)
            # At once: a proxy that has exited is not one that failed to connect.
            self._connection.close()
            # Whatever the proxy left in its group (a wrapper's child) goes with it.
            self._signal_group(signal.SIGKILL)
            _, pending = await asyncio.wait(pumps, timeout=_PIPE_DRAIN_TIMEOUT)
        finally:
            self._connection.close()
            for pump in pumps:
                pump.cancel()
            for transport, _ in self._pipes:
                transport.close()
            if self.figures is not None:
                await self.figures.close()
        for pump in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        return returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        # The child leads its own group (process_group=0): pgid == pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._child.pid, sig)

    async def wait(self) -> int:
        """
        Wait for the process to exit and its output to be logged.

        Returns:
            The exit status (negative: killed by that signal).
        """
        return await asyncio.shield(self._exited)

    async def stop(self) -> int:
        """
        Stop the process: SIGTERM to its group, ``stop_grace`` seconds, then SIGKILL; reap.

        Returns:
            The exit status.
        """
        if self._exit.returncode is None and not self._exited.done():
            self._log.info("proxy_stopping", grace=self._stop_grace)
            self._signal_group(signal.SIGTERM)
            try:
                async with asyncio.timeout(self._stop_grace):
                    return await asyncio.shield(self._exited)
            except TimeoutError:
                self._log.warning("proxy_kill", reason="grace_expired")
                self._signal_group(signal.SIGKILL)
        return await asyncio.shield(self._exited)

    async def detach(self) -> Child | None:
        """
        Stop watching and leave the process running; its pipes are handed on.

        Lines already read are logged first; what the proxy writes from now on waits in
        the pipe for the next reader.

        Returns:
            The pid and inheritable duplicates of the pipes, or ``None`` if it has exited.
        """
        if self._exit.returncode is not None or self._exited.done():
            return None
        for transport, _ in self._pipes:
            transport.pause_reading()
        for _ in range(3):
            await asyncio.sleep(0)  # the pumps log complete lines already buffered
        out, err = os.dup(self._child.stdout), os.dup(self._child.stderr)
        for fd in (out, err):
            os.set_inheritable(fd, True)  # noqa: FBT003 - os API
        self._exit.release()
        self._connection.close()
        if self.figures is not None:
            # Not handed on: the next image starts without figures (the proxy's writes fail).
            await self.figures.close()
        self._exited.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._exited
        return Child(self._child.pid, out, err)


def with_report_channel(spec: ProxySpec) -> tuple[ProxySpec, tuple[int, int] | None]:
    """
    Give the bundled proxy its report channel: a pipe whose write end it inherits.

    Args:
        spec: The proxy to start.

    Returns:
        The spec with ``--report-fd`` and the descriptor to pass, and the pipe
        (read end, write end); the caller closes the write end once the proxy has it.
        An external binary's spec comes back as it is, with ``None``.
    """
    if not is_bundled(spec.argv):
        return spec, None
    # The bundled proxy's private channel for its figures (agent/protocol/report.py).
    report = os.pipe()
    argv = (*spec.argv, "--report-fd", str(report[1]))
    return replace(spec, argv=argv, pass_fds=(*spec.pass_fds, report[1])), report


class SubprocessLauncher:
    """
    Starts each proxy as a child process of the agent.
    """

    async def launch(
        self,
        spec: ProxySpec,
        *,
        log: FilteringBoundLogger,
        on_change: Callable[[], None] | None = None,
    ) -> ProxyProcess:
        """
        Start one proxy process.

        Args:
            spec: Command, environment, stop grace and connect timeout.
            log: Logger bound to the tunnel's context.
            on_change: Called when the proxy's ``connected`` or ``last_error`` changes.

        Returns:
            The running process.

        Raises:
            ProxyStartError: The binary is missing or cannot be executed.
        """
        spec, report = with_report_channel(spec)
        argv, pass_fds = list(spec.argv), tuple[int, ...]()
        if spec.tokens is not None:
            # The pipe's number is the same in the child (pass_fds keeps numbers).
            token_fd = token_pipe(*spec.tokens)
            argv += ["--token-fd", str(token_fd)]
            pass_fds = (token_fd,)
        try:
            child = spawn(
                argv,
                env=spec.env,
                preexec_fn=death_signal_preexec(os.getpid()),
                pass_fds=(*pass_fds, *spec.pass_fds),
            )
        except OSError as exc:
            if report is not None:
                os.close(report[0])
            # Name only the binary: the rest of argv is fine but the habit is not.
            raise ProxyStartError(f"cannot start {spec.argv[0]}: {exc.strerror}") from exc
        finally:
            for fd in pass_fds:
                os.close(fd)
            if report is not None:
                os.close(report[1])
        return await ProxyProcess.watch(
            child,
            log=log,
            stop_grace=spec.stop_grace,
            connect_timeout=spec.connect_timeout,
            on_change=on_change,
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
        Watch a proxy started before this process re-executed itself.

        Args:
            child: Its pid and pipe descriptors (inherited across the exec).
            log: Logger bound to the tunnel's context.
            stop_grace: Seconds between SIGTERM and SIGKILL.
            connect_timeout: Seconds it may take to say it is connected before it is reported.
            on_change: Called when the proxy's ``connected`` or ``last_error`` changes.

        Returns:
            The process, or ``None`` when ``child.pid`` is not our child (its pipes are closed).
        """
        if not is_our_child(child.pid):
            child.close_pipes()
            return None
        return await ProxyProcess.watch(
            child,
            log=log,
            stop_grace=stop_grace,
            connect_timeout=connect_timeout,
            on_change=on_change,
        )
