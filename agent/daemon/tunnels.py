"""
TunnelManager: which tunnels run, for how long, and what happens when a proxy exits.

No I/O of its own: processes come from a :class:`~agent.daemon.supervisor.ProxyLauncher`.
Policy, in one place (docs/architecture.md §4.3):

- **Dedupe**: a notification whose token was seen recently is ignored
  (docs/protocol.md §17.3); this also catches the broker's redelivery of one
  handled but not yet acknowledged.
- **Handled**: :meth:`TunnelManager.open` returns once the tunnel's first proxy
  was started (or failed to start), so what the daemon acknowledges to the
  broker has a process behind it.
- **Rotation**: a new token for the services of a running tunnel starts a new
  proxy; the old one is *superseded* (it no longer counts against the cap) and
  ends on its own when the service replaces its connection (docs/protocol.md §8.3: the
  close frame makes it exit 0).
- **Cap**: at ``max_concurrent`` tunnels, ``refuse_new`` drops the notification;
  ``stop_oldest`` stops the oldest-started tunnel and admits the new one.
- **Lifetime**: a tunnel's proxy is stopped ``max_lifetime`` after it started.
- **Restarts**: exit 0 means the tunnel ended (a close frame or a 4xx handshake,
  docs/protocol.md §8.5); a non-zero exit or a signal restarts the proxy with the same
  tokens after a backoff delay, at most ``max_restarts`` times in a row. A run
  longer than ``restart_reset_after`` resets the count (docs/architecture.md §4.3).

- **Records**: with a :class:`~agent.daemon.records.RecordStore`, each tunnel's record
  (tokens included) is on disk while the tunnel lives. It is removed when the tunnel ends,
  reaches its lifetime, is evicted or superseded, or its proxy gives up; it is kept when
  the agent stops (shutdown) or re-executes itself (hand-off), so the next process can
  :meth:`~TunnelManager.restore` it with the same client token.
- **Hand-off**: :meth:`~TunnelManager.detach` stops supervising without stopping any
  proxy; :meth:`~TunnelManager.adopt` supervises them again in the next program image.

Stopping never cancels a tunnel's task: it sets the tunnel's stop event and the
task stops its proxy and returns (docs/architecture.md §6.5).
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import structlog

from agent.common.retry import backoff
from agent.daemon.handoff import Handoff, HandoffTunnel
from agent.daemon.records import TunnelRecord
from agent.daemon.supervisor import ProxySpec, build_argv, build_env, new_client_token
from agent.exceptions import ProxyStartError
from agent.logging import register_secret, unregister_secret
from agent.protocol.ids import token_digest


if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
    from pathlib import Path

    from pydantic import SecretStr

    from agent.daemon.children import Child
    from agent.daemon.notification import TunnelRequest
    from agent.daemon.records import RecordStore
    from agent.daemon.supervisor import ProxyHandle, ProxyLauncher


__all__ = ["Limits", "Outcome", "SpawnConfig", "TunnelInfo", "TunnelManager"]

log = structlog.get_logger("agent.daemon.tunnels")

# How many recent token digests are remembered for dedupe (a few hours of tunnels).
_RECENT_TOKENS = 256
# End reasons after which the tunnel lives on in the next agent process: its record stays.
_CONTINUED = frozenset({"shutdown", "handoff"})


class Outcome(enum.StrEnum):
    """
    What :meth:`TunnelManager.open` did with a request.
    """

    STARTED = "started"
    DUPLICATE = "duplicate"
    REFUSED_LIMIT = "refused_limit"
    REFUSED_SERVICE = "refused_service"
    CLOSING = "closing"


@dataclass(frozen=True, slots=True)
class Limits:
    """
    Bounds reloaded on SIGHUP.

    Attributes:
        max_concurrent: Most tunnels running at once (superseded ones not counted).
        max_lifetime: Seconds after which a tunnel's proxy is stopped.
        on_limit: ``refuse_new`` or ``stop_oldest`` at the cap.
    """

    max_concurrent: int = 10
    max_lifetime: float = 12 * 3600.0
    on_limit: Literal["refuse_new", "stop_oldest"] = "refuse_new"


@dataclass(frozen=True, slots=True)
class SpawnConfig:
    """
    How proxies are started and restarted; fixed for the agent's life.

    Attributes:
        command: Binary and leading arguments (:func:`~agent.daemon.supervisor.proxy_command`).
        endpoint: ``-e`` override, else ``-r`` with the notification's region.
        ca: ``-c`` CA file or directory.
        no_verify: ``-k`` (emulator only).
        extra_args: Appended to argv.
        extra_env: Added to the environment (excluded from repr).
        http_proxy: Outbound web proxy for the data plane (excluded from repr).
        stop_grace: Seconds from SIGTERM to SIGKILL.
        connect_timeout: Seconds a proxy may take to connect before it is reported.
        max_restarts: Consecutive failed runs restarted before giving up.
        backoff_initial: First restart delay, in seconds.
        backoff_max: Largest restart delay, in seconds.
        restart_reset_after: A run this long (seconds) resets the failure count.
        token_pipe: Hand the tokens over on a pipe (``--token-fd``, the bundled proxy)
            instead of the environment (an external binary).
    """

    command: tuple[str, ...]
    endpoint: str | None = None
    ca: Path | None = None
    no_verify: bool = False
    extra_args: tuple[str, ...] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    http_proxy: str | None = field(default=None, repr=False)
    stop_grace: float = 2.0
    connect_timeout: float = 30.0
    max_restarts: int = 5
    backoff_initial: float = 1.0
    backoff_max: float = 30.0
    restart_reset_after: float = 60.0
    token_pipe: bool = False


@dataclass(frozen=True, slots=True)
class TunnelInfo:
    """
    A snapshot of one tunnel for the status file.

    Attributes:
        key: Short random id of the tunnel in logs (not derived from the token).
        services: Requested service ids.
        region: The tunnel's region.
        state: ``starting``, ``running``, ``restarting`` or ``stopping``.
        pid: The proxy's pid while one runs.
        started_at: Wall-clock start, seconds since the epoch.
        restarts: Proxy restarts so far.
        superseded: A newer token for the same services arrived (rotation).
        connected: The proxy said it is connected (``True``), is still within its
            connect timeout (``None``), or is overdue (``False``).
        last_error: The proxy's latest warning or error line while not connected.
        connections: Local connections open now (``None``: the proxy does not report them).
        bytes_in: Bytes from the tunnel to the local services (``None``: not reported).
        bytes_out: Bytes from the local services into the tunnel (``None``: not reported).
    """

    key: str
    services: tuple[str, ...]
    region: str
    state: str
    pid: int | None
    started_at: float
    restarts: int
    superseded: bool
    connected: bool | None = None
    last_error: str | None = None
    connections: int | None = None
    bytes_in: int | None = None
    bytes_out: int | None = None


@dataclass(eq=False, slots=True)
class _Tunnel:
    key: str
    services: tuple[str, ...]
    region: str
    endpoint: str | None
    token: SecretStr = field(repr=False)
    client_token: str = field(repr=False)
    digest: str
    started_at: float
    expires_at: float
    deadline: float
    generation: int = 0
    # The event of its first proxy: a notification, a record, or a hand-off.
    origin: str = "tunnel_started"
    state: str = "starting"
    pid: int | None = None
    restarts: int = 0
    superseded: bool = False
    stop_reason: str | None = None
    stop_event: asyncio.Event = field(default_factory=asyncio.Event)
    handle: ProxyHandle | None = None
    # The last run's error line, shown while the next run has none of its own.
    last_error: str | None = None
    # Set once the first proxy launch was attempted (or the tunnel ended before it).
    launched: asyncio.Event = field(default_factory=asyncio.Event)
    # The proxy handed over by the previous program image, until adopted.
    inherited: Child | None = None
    # The proxy handed on to the next program image (detach).
    handed_on: Child | None = None

    def record(self) -> TunnelRecord:
        return TunnelRecord(
            key=self.key,
            services=self.services,
            region=self.region,
            endpoint=self.endpoint,
            token=self.token,
            client_token=self.client_token,
            started_at=self.started_at,
            expires_at=self.expires_at,
            generation=self.generation,
        )

    @classmethod
    def from_record(cls, record: TunnelRecord, *, origin: str) -> _Tunnel:
        remaining = record.expires_at - time.time()
        return cls(
            key=record.key,
            services=record.services,
            region=record.region,
            endpoint=record.endpoint,
            token=record.token,
            client_token=record.client_token,
            digest=token_digest(record.token.get_secret_value()),
            started_at=record.started_at,
            expires_at=record.expires_at,
            deadline=asyncio.get_running_loop().time() + remaining,
            generation=record.generation,
            origin=origin,
        )

    def info(self) -> TunnelInfo:
        connected = None if self.handle is None else self.handle.connected
        last_error = None
        if connected is not True:
            last_error = (self.handle and self.handle.last_error) or self.last_error
        # Only the bundled proxy reports figures (agent/daemon/proxyreport.py).
        figures = getattr(self.handle, "figures", None)
        return TunnelInfo(
            key=self.key,
            services=self.services,
            region=self.region,
            state=self.state,
            pid=self.pid,
            started_at=self.started_at,
            restarts=self.restarts,
            superseded=self.superseded,
            connected=connected,
            last_error=last_error,
            connections=None if figures is None else figures.connections,
            bytes_in=None if figures is None else figures.bytes_in,
            bytes_out=None if figures is None else figures.bytes_out,
        )

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.state = "stopping"
        self.stop_event.set()


class TunnelManager:
    """
    Admits tunnel requests and supervises one proxy per tunnel until it ends.
    """

    def __init__(  # noqa: PLR0913 - keyword-only, documented defaults
        self,
        *,
        launcher: ProxyLauncher,
        services: Mapping[str, str],
        limits: Limits,
        options: SpawnConfig,
        on_change: Callable[[], None] | None = None,
        records: RecordStore | None = None,
    ) -> None:
        """
        Create an idle manager.

        Args:
            launcher: Starts proxy processes.
            services: Service id -> localproxy target; the deny-by-default allow-list.
            limits: Cap, lifetime and over-cap policy.
            options: Proxy command and restart policy.
            on_change: Called (synchronously) whenever the set of tunnels or a pid changes.
            records: Where live tunnels are recorded; ``None`` keeps tokens in memory only.
        """
        self._launcher = launcher
        self._records = records
        self._handed_on: list[HandoffTunnel] = []
        self._services = dict(services)
        self._limits = limits
        self._options = options
        self._on_change = on_change
        self._tunnels: dict[str, _Tunnel] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._closing = False

    @property
    def services(self) -> Mapping[str, str]:
        """
        The current services map (id -> target).
        """
        return self._services

    @property
    def limits(self) -> Limits:
        """
        The current limits.
        """
        return self._limits

    def tunnels(self) -> list[TunnelInfo]:
        """
        Return a snapshot of the running tunnels, oldest first.
        """
        return [tunnel.info() for tunnel in self._tunnels.values()]

    def reconfigure(self, *, services: Mapping[str, str], limits: Limits) -> None:
        """
        Apply a reloaded services map and limits without touching running proxies.

        A tunnel's next restart uses the new map (a removed service is dropped);
        a new lifetime applies to tunnels opened from now on.

        Args:
            services: The new allow-list.
            limits: The new limits.
        """
        self._services = dict(services)
        self._limits = limits
        log.info(
            "tunnels_reconfigured",
            services=sorted(self._services),
            max_concurrent=limits.max_concurrent,
            max_lifetime=limits.max_lifetime,
            on_limit=limits.on_limit,
        )

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("status_update_failed")

    def _is_duplicate(self, digest: str) -> bool:
        if digest in self._recent:
            self._recent.move_to_end(digest)
            return True
        self._recent[digest] = None
        if len(self._recent) > _RECENT_TOKENS:
            self._recent.popitem(last=False)
        return False

    def _counted(self) -> list[_Tunnel]:
        return [t for t in self._tunnels.values() if not t.superseded and t.stop_reason is None]

    def _admit(self, request: TunnelRequest) -> Outcome | _Tunnel | None:
        """
        Apply rotation and the cap; return the superseded tunnel, ``None``, or a refusal.
        """
        counted = self._counted()
        same = [t for t in counted if set(t.services) == set(request.services)]
        superseded = sum(t.superseded for t in self._tunnels.values())
        # Rotation: bounded so that at most 2 x max_concurrent proxies ever run.
        if same and superseded < self._limits.max_concurrent:
            return same[-1]
        if len(counted) < self._limits.max_concurrent:
            return None
        if self._limits.on_limit == "refuse_new":
            log.warning(
                "tunnel_limit_reached",
                policy="refuse_new",
                max_concurrent=self._limits.max_concurrent,
            )
            return Outcome.REFUSED_LIMIT
        oldest = min(counted, key=lambda t: t.started_at)
        log.warning(
            "tunnel_limit_reached",
            policy="stop_oldest",
            max_concurrent=self._limits.max_concurrent,
            stopping=oldest.key,
        )
        oldest.request_stop("evicted")
        return None

    async def open(self, request: TunnelRequest) -> Outcome:
        """
        Start a tunnel for a validated request, unless policy says otherwise.

        Args:
            request: From :func:`agent.daemon.notification.parse_notification`.

        Returns:
            What was done, once it is done: for :attr:`Outcome.STARTED`, after the
            first proxy launch was attempted. Every refusal is also logged.
        """
        if self._closing:
            return Outcome.CLOSING
        unknown = [s for s in request.services if s not in self._services]
        if unknown:
            log.warning("notification_rejected", reason="unknown_service", services=unknown)
            return Outcome.REFUSED_SERVICE
        # Dedupe on a hash so the manager keeps no token after its tunnel ends.
        digest = token_digest(request.token.get_secret_value())
        if self._is_duplicate(digest):
            log.info("notification_duplicate", services=list(request.services))
            return Outcome.DUPLICATE
        admitted = self._admit(request)
        if isinstance(admitted, Outcome):
            # Not started: a later delivery of the same token deserves a fresh decision.
            self._recent.pop(digest, None)
            return admitted
        key = secrets.token_hex(4)
        now = time.time()
        tunnel = _Tunnel(
            key=key,
            services=request.services,
            region=request.region,
            endpoint=self._options.endpoint,
            token=request.token,
            client_token=new_client_token(),
            digest=digest,
            started_at=now,
            expires_at=now + self._limits.max_lifetime,
            deadline=asyncio.get_running_loop().time() + self._limits.max_lifetime,
            generation=0 if admitted is None else admitted.generation + 1,
        )
        if admitted is not None:
            admitted.superseded = True
            # Its token is revoked by the rotation: no later process may reconnect it.
            self._forget(admitted)
            log.info("tunnel_superseded", tunnel_key=admitted.key, by=key)
        self._save(tunnel)
        self._start(tunnel)
        await tunnel.launched.wait()
        return Outcome.STARTED

    def _start(self, tunnel: _Tunnel) -> None:
        # From here on every log line masks both tokens, whatever the key name.
        register_secret(tunnel.token.get_secret_value())
        register_secret(tunnel.client_token)
        key = tunnel.key
        self._tunnels[key] = tunnel
        task = asyncio.create_task(self._run(tunnel), name=f"tunnel-{key}")
        self._tasks[key] = task
        task.add_done_callback(lambda _task: self._tasks.pop(key, None))
        # Also when the task is cancelled before it ever ran.
        task.add_done_callback(lambda _task: tunnel.launched.set())
        self._changed()

    def _save(self, tunnel: _Tunnel) -> None:
        if self._records is not None:
            self._records.save(tunnel.record())

    def _forget(self, tunnel: _Tunnel) -> None:
        if self._records is not None:
            self._records.remove(tunnel.key)

    def restore(self, records: Iterable[TunnelRecord]) -> int:
        """
        Reconnect the tunnels an earlier agent process recorded, with their client tokens.

        Expired records are deleted. Of several records for the same services (a crash in
        the middle of a rotation) only the newest generation is kept. Records beyond
        ``max_concurrent`` (counting the running tunnels) are deleted, oldest kept first.

        Args:
            records: From :meth:`RecordStore.load`.

        Returns:
            How many tunnels were restored.
        """
        now = time.time()
        newest: dict[frozenset[str], TunnelRecord] = {}
        restored = 0
        for record in sorted(records, key=lambda r: (r.generation, r.started_at)):
            if record.key in self._tunnels:
                continue  # adopted from a hand-off
            services = frozenset(record.services)
            if services in newest:
                self._drop(newest[services], "superseded")
            newest[services] = record
        for record in sorted(newest.values(), key=lambda r: r.started_at):
            if record.expires_at <= now:
                self._drop(record, "expired")
            elif self._closing:
                break
            elif len(self._counted()) >= self._limits.max_concurrent:
                self._drop(record, "limit")
            else:
                tunnel = _Tunnel.from_record(record, origin="tunnel_restored")
                self._is_duplicate(tunnel.digest)
                self._start(tunnel)
                restored += 1
        return restored

    def _drop(self, record: TunnelRecord, reason: str) -> None:
        log.info(
            "tunnel_record_dropped",
            tunnel_key=record.key,
            services=list(record.services),
            reason=reason,
        )
        if self._records is not None:
            self._records.remove(record.key)

    def adopt(self, handoff: Handoff) -> None:
        """
        Supervise the tunnels (and running proxies) a previous program image handed over.

        Args:
            handoff: From :func:`agent.daemon.handoff.read_handoff` or :meth:`detach`.
        """
        self._closing = False
        for digest in handoff.recent:
            self._is_duplicate(digest)
        for entry in handoff.tunnels:
            tunnel = _Tunnel.from_record(entry.record, origin="tunnel_adopted")
            tunnel.restarts = entry.restarts
            tunnel.inherited = entry.child
            self._is_duplicate(tunnel.digest)
            # The previous image may have kept tokens in memory only; this one may persist.
            self._save(tunnel)
            self._start(tunnel)

    async def detach(self) -> Handoff:
        """
        Stop supervising every tunnel but leave its proxy running, for the next program image.

        Returns:
            The tunnels (with their proxies' pids and inheritable pipes) and recent digests.
        """
        self._closing = True
        self._handed_on = []
        for tunnel in list(self._tunnels.values()):
            if tunnel.superseded:
                # Its token is revoked: stop it now rather than hand over a dying proxy.
                tunnel.request_stop("superseded")
            else:
                tunnel.request_stop("handoff")
        tasks = list(self._tasks.values())
        if tasks:
            await asyncio.wait(tasks)
        handed_on, self._handed_on = self._handed_on, []
        return Handoff(tuple(handed_on), tuple(self._recent))

    def _spec(self, tunnel: _Tunnel, services: Mapping[str, str]) -> ProxySpec:
        opts = self._options
        argv = build_argv(
            opts.command,
            services=services,
            region=tunnel.region,
            endpoint=tunnel.endpoint,
            ca=opts.ca,
            no_verify=opts.no_verify,
            extra_args=opts.extra_args,
        )
        token = tunnel.token.get_secret_value()
        piped = opts.token_pipe
        env = build_env(
            token=None if piped else token,
            client_token=None if piped else tunnel.client_token,
            extra_env=opts.extra_env,
            http_proxy=opts.http_proxy,
        )
        return ProxySpec(
            argv=tuple(argv),
            env=env,
            stop_grace=opts.stop_grace,
            connect_timeout=opts.connect_timeout,
            tokens=(token, tunnel.client_token) if piped else None,
        )

    def _delays(self) -> Iterator[float]:
        return backoff(initial=self._options.backoff_initial, maximum=self._options.backoff_max)

    async def _sleep_or_stop(self, tunnel: _Tunnel, delay: float) -> bool:
        """
        Sleep ``delay`` seconds (bounded by the deadline); return True if told to stop.
        """
        loop = asyncio.get_running_loop()
        remaining = tunnel.deadline - loop.time()
        if remaining <= 0:
            tunnel.request_stop("lifetime")
            return True
        try:
            async with asyncio.timeout(min(delay, remaining)):
                await tunnel.stop_event.wait()
        except TimeoutError:
            if loop.time() >= tunnel.deadline:
                tunnel.request_stop("lifetime")
                return True
            return False
        return True

    async def _supervise(self, tunnel: _Tunnel, handle: ProxyHandle) -> int | None:
        """
        Wait for the proxy to exit, or stop it on request or at the deadline.

        Returns:
            The exit status if the proxy exited by itself, ``None`` if we stopped it.
        """
        loop = asyncio.get_running_loop()
        exited = asyncio.ensure_future(handle.wait())
        stopped = asyncio.ensure_future(tunnel.stop_event.wait())
        try:
            await asyncio.wait(
                {exited, stopped},
                timeout=max(0.0, tunnel.deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stopped.cancel()
            exited.cancel()  # handle.wait() is shielded: the process is unaffected.
        if handle.returncode is not None and not tunnel.stop_event.is_set():
            return handle.returncode
        if tunnel.stop_reason == "handoff":
            tunnel.handed_on = await handle.detach()
            if tunnel.handed_on is None and await handle.wait() == 0:
                tunnel.stop_reason = "ended"  # the tunnel ended just now: nothing to hand on
            return None
        if not tunnel.stop_event.is_set():
            tunnel.request_stop("lifetime")
            log.info("tunnel_lifetime_exceeded", max_lifetime=self._limits.max_lifetime)
        returncode = await handle.stop()
        log.info("proxy_exited", pid=handle.pid, returncode=returncode, stopped=True)
        return None

    async def _run(self, tunnel: _Tunnel) -> None:
        with structlog.contextvars.bound_contextvars(
            tunnel_key=tunnel.key, services=list(tunnel.services)
        ):
            started = asyncio.get_running_loop().time()
            reason = "error"
            try:
                reason = await self._run_proxies(tunnel)
            except Exception:
                log.exception("tunnel_failed")
            finally:
                self._tunnels.pop(tunnel.key, None)
                if reason == "handoff":
                    self._handed_on.append(
                        HandoffTunnel(tunnel.record(), tunnel.handed_on, tunnel.restarts)
                    )
                elif reason not in _CONTINUED:
                    self._forget(tunnel)
                unregister_secret(tunnel.token.get_secret_value())
                unregister_secret(tunnel.client_token)
                self._changed()
                if reason == "handoff":
                    # Not an end: the next program image supervises it from here.
                    pid = None if tunnel.handed_on is None else tunnel.handed_on.pid
                    log.info("tunnel_handed_on", pid=pid)
                else:
                    log.info(
                        "tunnel_ended",
                        reason=reason,
                        restarts=tunnel.restarts,
                        duration=round(asyncio.get_running_loop().time() - started, 3),
                    )

    async def _run_once(self, tunnel: _Tunnel, spec: ProxySpec, *, first: bool) -> int | None:
        """
        Run one proxy to its end: its exit status, or ``None`` if we stopped it.
        """
        try:
            handle = await self._adopt(tunnel)
            if handle is None:
                try:
                    handle = await self._launcher.launch(
                        spec, log=log.bind(), on_change=self._changed
                    )
                except ProxyStartError as exc:
                    # A configuration problem, not our bug: no traceback.
                    log.error("proxy_start_failed", error=str(exc))  # noqa: TRY400
                    return 127
        finally:
            tunnel.launched.set()
        tunnel.pid, tunnel.state, tunnel.handle = handle.pid, "running", handle
        self._changed()
        if first:
            log.info(
                tunnel.origin,
                pid=handle.pid,
                region=tunnel.region,
                endpoint=tunnel.endpoint,
            )
        else:
            log.info("proxy_restarted", pid=handle.pid, attempt=tunnel.restarts)
        try:
            returncode = await self._supervise(tunnel, handle)
        except asyncio.CancelledError:
            # Only close() cancels, after its grace: still reap the child.
            await asyncio.shield(handle.stop())
            raise
        finally:
            tunnel.last_error = handle.last_error or tunnel.last_error
            tunnel.handle = None
        if returncode is not None:
            log.info("proxy_exited", pid=handle.pid, returncode=returncode)
        return returncode

    async def _adopt(self, tunnel: _Tunnel) -> ProxyHandle | None:
        """
        Take over the proxy the previous program image ran for this tunnel, if any.
        """
        child, tunnel.inherited = tunnel.inherited, None
        if child is None:
            return None
        handle = await self._launcher.adopt(
            child,
            log=log.bind(),
            stop_grace=self._options.stop_grace,
            connect_timeout=self._options.connect_timeout,
            on_change=self._changed,
        )
        if handle is None:
            # Reaped before the hand-off completed: start a new proxy with the same tokens.
            log.warning("proxy_adoption_failed", pid=child.pid, reason="not_our_child")
        return handle

    async def _run_proxies(self, tunnel: _Tunnel) -> str:
        loop = asyncio.get_running_loop()
        delays = self._delays()
        failures = 0
        while True:
            # Deny by default, also across a reload: only services still mapped are passed.
            mapped = {s: self._services[s] for s in tunnel.services if s in self._services}
            if not mapped:
                return "services_removed"
            run_started = loop.time()
            returncode = await self._run_once(
                tunnel, self._spec(tunnel, mapped), first=tunnel.state == "starting"
            )
            tunnel.pid = None
            if returncode is None or tunnel.stop_event.is_set():
                return tunnel.stop_reason or "stopped"
            if returncode == 0:
                return "ended"
            if loop.time() - run_started >= self._options.restart_reset_after:
                failures, delays = 0, self._delays()
            if failures >= self._options.max_restarts:
                log.error("proxy_restart_limit", max_restarts=self._options.max_restarts)
                return "restart_limit"
            failures += 1
            delay = next(delays)
            tunnel.state = "restarting"
            self._changed()
            log.info("proxy_restart_scheduled", delay=round(delay, 3), attempt=failures)
            if await self._sleep_or_stop(tunnel, delay):
                return tunnel.stop_reason or "stopped"
            tunnel.restarts += 1

    def stop_all(self, reason: str = "shutdown") -> None:
        """
        Refuse new tunnels and ask every running tunnel to stop its proxy.

        Args:
            reason: Logged as each tunnel's end reason.
        """
        self._closing = True
        for tunnel in list(self._tunnels.values()):
            tunnel.request_stop(reason)

    async def close(self, *, grace: float = 4.0) -> None:
        """
        Stop every tunnel and wait; cancel what is left after ``grace`` seconds.

        Args:
            grace: Graceful budget; each proxy gets SIGTERM, then SIGKILL after its own grace.
        """
        self.stop_all()
        tasks: Sequence[asyncio.Task[None]] = list(self._tasks.values())
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel("tunnel manager closing: grace period expired")
        if pending:
            log.warning("tunnels_cancelled", count=len(pending))
            await asyncio.wait(pending)
