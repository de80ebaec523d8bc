"""
The agent's lifecycle: start, receive notifications, supervise tunnels, stop.

Signals only set flags (docs/architecture.md §6.5): SIGTERM/SIGINT set the stop event and the
main coroutine runs the shutdown; SIGHUP reloads. Shutdown order: stop taking
notifications, then stop every proxy (SIGTERM, grace, SIGKILL) while the
notification source disconnects, all within ``shutdown_timeout`` (5 s by
default); exit status 0. The tunnels' records stay: the next start reconnects them.

Reload (with a :class:`~agent.daemon.reexec.ReexecPlan`): preflight the code and
configuration on disk while still serving; then stop taking notifications,
disconnect the source cleanly, detach the proxies (they keep running) and
re-execute in place. The new image adopts them before it connects its source.
If the preflight fails the old image carries on; if ``execv`` fails it adopts its
own proxies back. Without a plan, SIGHUP reloads the services map and limits in place.

Start: adopt the proxies of a hand-off, stop any other child (a hand-off that
could not be read), then restore the recorded tunnels, all before the source connects.

Under systemd (``NOTIFY_SOCKET`` set) the daemon reports ``READY=1`` once the
source is subscribed, ``STATUS=`` on every tunnel change, ``STOPPING=1`` and
``WATCHDOG=1`` at half of ``WATCHDOG_USEC``. Idle means idle: no timer runs
except that watchdog.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import structlog

from agent import __version__
from agent.daemon import reexec
from agent.daemon.capath import hashed_ca_directory, needs_ca_directory
from agent.daemon.children import ChildExit, our_children
from agent.daemon.forkserver import ForkLauncher
from agent.daemon.handoff import close_descriptors, read_handoff, write_handoff
from agent.daemon.notification import parse_notification, requested_services
from agent.daemon.records import RecordStore
from agent.daemon.report import (
    Health,
    Rejection,
    ShadowReporter,
    health_document,
    offline_document,
    reported_document,
    shadow_update_topic,
)
from agent.daemon.sdnotify import SdNotifier, watchdog_interval
from agent.daemon.status import StatusFile
from agent.daemon.supervisor import SubprocessLauncher, build_env, proxy_command
from agent.daemon.tunnels import Limits, Outcome, SpawnConfig, TunnelManager
from agent.exceptions import EXIT_FAILURE, EXIT_OK, ConfigError, InvalidNotification
from agent.notify import load_source_class, resolve_kind
from agent.notify.base import Publisher


if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from agent.daemon.handoff import Handoff
    from agent.daemon.reexec import ReexecPlan
    from agent.daemon.settings import AgentSettings
    from agent.daemon.supervisor import ProxyLauncher
    from agent.notify.base import NotificationSource, RawNotification


__all__ = [
    "Daemon",
    "build_daemon",
    "build_reporter",
    "build_source",
    "limits_from",
    "proxy_ca",
    "spawn_config_from",
]

log = structlog.get_logger("agent.daemon")

# A stray child (from a hand-off that could not be read) gets this long after SIGTERM.
_STRAY_GRACE = 2.0
# The offline mark may take this long at shutdown (it runs alongside stopping the proxies).
_OFFLINE_TIMEOUT = 2.0
# Why the manager refused a request, in words for the shadow and the status file.
_REFUSALS = {
    Outcome.REFUSED_SERVICE: "a requested service is not in the services map",
    Outcome.REFUSED_LIMIT: "the device already runs its maximum number of tunnels",
}


class Daemon:
    """
    Runs one notification source and one tunnel manager until told to stop.
    """

    def __init__(  # noqa: PLR0913 - keyword-only, documented defaults
        self,
        *,
        source: NotificationSource,
        manager: TunnelManager,
        status: StatusFile | None = None,
        reload: Callable[[], tuple[Mapping[str, str], Limits]] | None = None,
        notifier: SdNotifier | None = None,
        watchdog: float | None = None,
        shutdown_timeout: float = 5.0,
        thing_name: str | None = None,
        records: RecordStore | None = None,
        handoff: Handoff | None = None,
        reexec_plan: ReexecPlan | None = None,
        warm_up: Callable[[], None] | None = None,
        reporter: ShadowReporter | None = None,
    ) -> None:
        """
        Assemble a daemon from its parts; nothing starts before :meth:`run`.

        Args:
            source: Where notifications come from (entered in :meth:`run`).
            manager: Supervises the tunnels; its ``on_change`` should call :meth:`changed`.
            status: The status file, or ``None`` for none.
            reload: Returns a fresh services map and limits on SIGHUP.
            notifier: systemd notifier, or ``None`` outside systemd.
            watchdog: Seconds between ``WATCHDOG=1`` pings, or ``None``.
            shutdown_timeout: Budget for the whole graceful stop, in seconds.
            thing_name: Bound to every log line of the daemon.
            records: Recorded tunnels to restore at start, or ``None``.
            handoff: What the previous program image handed over (a reload), or ``None``.
            reexec_plan: How SIGHUP re-executes the agent; ``None`` reloads in place.
            warm_up: Starts the proxy launcher, after stray children are stopped.
            reporter: Publishes the agent's report to its shadow, or ``None`` for none.
        """
        self._source = source
        self._warm_up = warm_up
        self._manager = manager
        self._status = status
        self._reload = reload
        self._notifier = notifier
        self._watchdog = watchdog
        self._shutdown_timeout = shutdown_timeout
        self._context = {} if thing_name is None else {"thing_name": thing_name}
        self._records = records
        self._handoff = handoff
        self._reexec_plan = reexec_plan
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._state = "starting"
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reporter = reporter
        self._started_at = time.time()
        #: MQTT link and last notification, for the status file and the shadow.
        self.health = Health()
        if hasattr(source, "on_link_change"):
            source.on_link_change = self._link_changed

    def request_stop(self) -> None:
        """
        Ask the daemon to shut down (what SIGTERM and SIGINT do).
        """
        if not self._stop.is_set():
            log.info("agent_stop_requested")
        self._stop.set()

    def request_reload(self) -> None:
        """
        Reload (what SIGHUP does): re-execute in place, or reload the services map and limits.

        Running tunnels stay either way.
        """
        if self._reexec_plan is not None:
            if not self._reload_requested.is_set():
                log.info("agent_reload_requested")
            self._reload_requested.set()
            return
        self._reload_in_place()

    def _reload_in_place(self) -> None:
        if self._reload is None:
            log.warning("config_reload_unavailable")
            return
        try:
            services, limits = self._reload()
        except ConfigError as exc:
            log.error("config_reload_failed", error=str(exc))  # noqa: TRY400 - no traceback
            return
        except Exception:
            log.exception("config_reload_failed")
            return
        self._manager.reconfigure(services=services, limits=limits)
        self.changed()

    def _link_changed(self) -> None:
        connected = getattr(self._source, "connected", None)
        since = getattr(self._source, "connected_since", None)
        if self.health.link(connected=connected, since=since):
            self.changed()

    def changed(self) -> None:
        """
        Publish the agent's state: status file, shadow report and systemd ``STATUS=``.
        """
        tunnels = self._manager.tunnels()
        if self._status is not None:
            try:
                self._status.write(tunnels, state=self._state, health=health_document(self.health))
            except OSError as exc:
                log.warning("status_write_failed", path=str(self._status.path), error=exc.strerror)
        if self._reporter is not None and self._state == "running":
            self._reporter.update(
                reported_document(
                    version=__version__,
                    state=self._state,
                    started_at=self._started_at,
                    health=self.health,
                    services=list(self._manager.services),
                    limits=self._manager.limits,
                    tunnels=tunnels,
                )
            )
        if self._notifier is not None:
            self._notifier.notify(f"STATUS={self._state}: {len(tunnels)} active tunnel(s)")

    def _noted(self, outcome: str, rejection: Rejection | None = None) -> None:
        self.health.notification_at = time.time()
        self.health.notification_outcome = outcome
        if rejection is not None:
            self.health.rejection = rejection
        self.changed()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        # Strong reference until done (docs/architecture.md §6.5).
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _handle(self, raw: RawNotification) -> bool:
        """
        Handle one notification; return whether the outcome is final (to acknowledge).
        """
        # Never the payload: it carries the token (docs/architecture.md §7.4).
        log.info("notification_received", topic=raw.topic, size=len(raw.payload))
        try:
            request = parse_notification(raw.payload, allowed_services=self._manager.services)
        except InvalidNotification as exc:
            log.warning("notification_rejected", reason=str(exc))
            services, count = requested_services(raw.payload)
            self._noted(
                "rejected",
                Rejection(time.time(), str(exc), services=services, service_count=count),
            )
            return True
        outcome = await self._manager.open(request)
        log.info("notification_handled", outcome=str(outcome), services=list(request.services))
        refusal = _REFUSALS.get(outcome)
        self._noted(
            str(outcome),
            None if refusal is None else Rejection(time.time(), refusal, services=request.services),
        )
        # A stopping agent's refusal is the one outcome a redelivery would change.
        return outcome is not Outcome.CLOSING

    async def _consume(self) -> None:
        # One at a time, in order: a rotation must follow the token it replaces.
        async for raw in self._source:
            final = True
            try:
                final = await self._handle(raw)
            except Exception:
                # Input must never bring the daemon down; acknowledged all
                # the same, or the broker would redeliver it forever.
                log.exception("notification_handling_failed")
            # Cancelled (the agent stops) before an outcome: not acknowledged, redelivered.
            if final:
                try:
                    raw.ack()
                except Exception:
                    log.exception("notification_ack_failed")

    async def _ping_watchdog(self, interval: float) -> None:
        while True:
            if self._notifier is not None:
                self._notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _enter_source(self) -> bool:
        """
        Connect the source, unless a stop request comes first; return True if connected.
        """
        entering = self._spawn(self._source.__aenter__(), "source-enter")
        stopping = self._spawn(self._stop.wait(), "stop-wait")
        await asyncio.wait({entering, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if entering.done():
            entering.result()  # re-raise a connection failure
            return True
        entering.cancel("agent stopping before the notification source connected")
        with contextlib.suppress(asyncio.CancelledError):
            await entering
        return False

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        # Held across a re-exec: delivered now, to the handlers above. Before any proxy
        # starts, which would inherit the mask.
        reexec.unblock_signals()

    @staticmethod
    def _remove_signals(loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    async def run(self) -> int:
        """
        Run until SIGTERM/SIGINT (or :meth:`request_stop`), then shut down gracefully.

        Returns:
            :data:`EXIT_OK` after a requested stop, :data:`EXIT_FAILURE` if the
            notification source failed or ended by itself.
        """
        with structlog.contextvars.bound_contextvars(**self._context):
            return await self._run()

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        exit_code = EXIT_OK
        entered = False
        try:
            self.changed()
            self._start_tunnels()
            if self._watchdog is not None:
                self._spawn(self._ping_watchdog(self._watchdog), "watchdog")
            while True:
                try:
                    entered = await self._enter_source()
                except Exception as exc:
                    log.error("notification_source_failed", error=repr(exc))  # noqa: TRY400
                    return EXIT_FAILURE
                if not entered:
                    break
                served = await self._serve()
                if served is not None:
                    exit_code = served
                    break
                # Reload: preflight passed and notifications are stopped.
                await self._close_source()
                entered = False
                await self._reexecute()
                # Still here: no exec (it failed, or a stop came first); proxies adopted back.
                if self._stop.is_set():
                    break
        finally:
            await self._shutdown(entered=entered)
            self._remove_signals(loop)
        return exit_code

    def _start_tunnels(self) -> None:
        """
        Adopt the hand-off's proxies, stop stray children, restore recorded tunnels.
        """
        handoff, self._handoff = self._handoff, None
        if handoff is not None:
            adopted = {t.child.pid for t in handoff.tunnels if t.child is not None}
            # After a re-exec every child is a proxy: those not handed over are strays.
            for pid in our_children() - adopted:
                self._spawn(_stop_stray(pid), f"stray-{pid}")
            self._manager.adopt(handoff)
            log.info("tunnels_adopted", count=len(handoff.tunnels), running=len(adopted))
        if self._warm_up is not None:
            try:
                self._warm_up()
            except OSError as exc:
                log.error("proxy_launcher_start_failed", error=exc.strerror)  # noqa: TRY400
        if self._records is not None:
            restored = self._manager.restore(self._records.load())
            if restored:
                log.info("tunnels_restored", count=restored)

    async def _serve(self) -> int | None:
        """
        Take notifications until told to stop (an exit status) or to reload (``None``).
        """
        self._state = "running"
        self.changed()
        if self._notifier is not None:
            self._notifier.notify("READY=1")
        log.info("agent_started", version=__version__, services=sorted(self._manager.services))
        consumer = self._spawn(self._consume(), "notifications")
        while True:
            stopping = self._spawn(self._stop.wait(), "stop-wait")
            reloading = self._spawn(self._reload_requested.wait(), "reload-wait")
            await asyncio.wait({consumer, stopping, reloading}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            reloading.cancel()
            if consumer.done():
                if consumer.cancelled() or consumer.exception() is None:
                    log.error("notification_source_closed")
                else:
                    log.error("notification_source_failed", error=repr(consumer.exception()))
                return EXIT_FAILURE
            if self._stop.is_set() or await self._preflight():
                break
        # 1. Stop taking notifications (docs/architecture.md §6.5).
        consumer.cancel("agent stopping")
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        return EXIT_OK if self._stop.is_set() else None

    async def _preflight(self) -> bool:
        """
        Check the code and configuration on disk; True if the re-exec may go ahead.
        """
        assert self._reexec_plan is not None  # noqa: S101 - only set with a plan
        self._reload_requested.clear()
        if self._notifier is not None:
            self._notifier.notify(
                "RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}", "STATUS=reloading"
            )
        checking = self._spawn(reexec.preflight(self._reexec_plan), "preflight")
        stopping = self._spawn(self._stop.wait(), "stop-wait")
        await asyncio.wait({checking, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not checking.done():
            checking.cancel("agent stopping")
            with contextlib.suppress(asyncio.CancelledError):
                await checking
            return False
        problem = checking.result()
        if problem is None:
            return True
        # The old code keeps running, and keeps supervising every proxy.
        log.error("agent_reload_failed", stage="preflight", reason=problem)
        if self._notifier is not None:
            self._notifier.notify("READY=1", "STATUS=reload failed: still running the old code")
        return False

    async def _reexecute(self) -> None:
        """
        Hand the proxies to a fresh image of the agent; return only if that did not happen.

        A stop request that arrives meanwhile wins: the proxies are taken back and the
        caller shuts down as usual.
        """
        assert self._reexec_plan is not None  # noqa: S101 - only called with a plan
        handoff = await self._manager.detach()
        self._state = "reloading"
        self.changed()
        # From here a signal waits for the next image; one that came just before is
        # delivered by the loop now, and a stop request then cancels the exec.
        reexec.hold_signals()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        if self._stop.is_set() or reexec.stop_pending():
            reexec.unblock_signals()
            log.info("agent_reload_cancelled", reason="stop requested")
        else:
            log.info(
                "agent_reexecuting",
                tunnels=len(handoff.tunnels),
                running=sum(t.child is not None for t in handoff.tunnels),
            )
            try:
                fd = write_handoff(handoff, self._reexec_plan.runtime_dir)
                try:
                    reexec.execute(self._reexec_plan, fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                reexec.unblock_signals()
                log.error("agent_reload_failed", stage="exec", error=exc.strerror)  # noqa: TRY400
            if self._notifier is not None:
                self._notifier.notify("READY=1", "STATUS=reload failed: still running the old code")
        # The exec did not happen: take the proxies back, inherited pipes and all.
        self._manager.adopt(handoff)

    async def _report_offline_and_close(self) -> None:
        """
        Mark the agent offline in its shadow (bounded), then disconnect the source.
        """
        if self._reporter is not None:
            try:
                async with asyncio.timeout(min(_OFFLINE_TIMEOUT, self._shutdown_timeout / 2)):
                    await self._reporter.close(offline_document())
            except TimeoutError:
                log.info("shadow_offline_report_timeout")
        await self._close_source()

    async def _close_source(self) -> None:
        try:
            await self._source.__aexit__(None, None, None)
        except Exception as exc:
            log.warning("notification_source_close_failed", error=repr(exc))

    async def _shutdown(self, *, entered: bool) -> None:
        self._state = "stopping"
        loop = asyncio.get_running_loop()
        started = loop.time()
        if self._notifier is not None:
            self._notifier.notify("STOPPING=1", "STATUS=stopping")
        log.info("agent_stopping", tunnels=len(self._manager.tunnels()))
        # 2-5. Stop the proxies while the source disconnects, within the budget.
        grace = max(0.5, self._shutdown_timeout - 1.0)
        steps = [self._manager.close(grace=grace)]
        if entered:
            steps.append(self._report_offline_and_close())
        elif self._reporter is not None:
            await self._reporter.close()
        try:
            async with asyncio.timeout(self._shutdown_timeout):
                await asyncio.gather(*steps)
        except TimeoutError:
            log.warning("shutdown_timeout", timeout=self._shutdown_timeout)
        for task in list(self._tasks):
            task.cancel("agent stopped")
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        if self._status is not None:
            self._status.remove()
        if self._notifier is not None:
            self._notifier.close()
        log.info("agent_stopped", duration=round(loop.time() - started, 3))


def limits_from(settings: AgentSettings) -> Limits:
    """
    Extract the tunnel limits from the settings.

    Args:
        settings: Validated settings.

    Returns:
        Plain values for :class:`TunnelManager`.
    """
    return Limits(
        max_concurrent=settings.limits.max_concurrent_tunnels,
        max_lifetime=settings.limits.max_tunnel_lifetime.total_seconds(),
        on_limit=settings.limits.on_limit,
    )


def proxy_ca(settings: AgentSettings) -> Path | None:
    """
    Return what the proxy gets as ``-c``: ``proxy.ca``, or a hashed directory made from it.

    An external binary (the AWS localproxy) takes only a hashed CA directory; the bundled
    proxy takes a file or a directory. So for an external binary and a CA *file*, the
    directory is made here, under ``<runtime dir>/ca/``.

    Args:
        settings: Validated settings.

    Returns:
        The path for ``-c``, or ``None`` for the system's trust store.

    Raises:
        ConfigError: The CA file holds no usable certificate, or the runtime
            directory cannot be written.
    """
    proxy = settings.proxy
    if proxy.ca is None or not needs_ca_directory(proxy.binary, proxy.ca):
        return proxy.ca
    parent = settings.state_dir / "ca"
    try:
        directory = hashed_ca_directory(proxy.ca, parent)
    except OSError as exc:
        message = f"cannot make the proxy's CA directory in {parent}: {exc.strerror}"
        raise ConfigError(message) from None
    log.info("proxy_ca_directory", ca=str(proxy.ca), directory=str(directory))
    return directory


def spawn_config_from(settings: AgentSettings) -> SpawnConfig:
    """
    Extract how proxies are started from the settings.

    Args:
        settings: Validated settings.

    Returns:
        Plain values for :class:`TunnelManager`; an external binary's CA directory is
        made on the way (:func:`proxy_ca`).
    """
    proxy = settings.proxy
    http_proxy = settings.mqtt.http_proxy
    return SpawnConfig(
        command=tuple(proxy_command(proxy.binary)),
        endpoint=proxy.endpoint,
        ca=proxy_ca(settings),
        no_verify=proxy.no_verify,
        extra_args=proxy.extra_args,
        extra_env={k: v.get_secret_value() for k, v in proxy.extra_env.items()},
        http_proxy=None if http_proxy is None else http_proxy.get_secret_value(),
        stop_grace=proxy.stop_grace,
        connect_timeout=proxy.connect_timeout.total_seconds(),
        max_restarts=proxy.max_restarts,
        backoff_initial=proxy.restart_backoff_initial,
        backoff_max=proxy.restart_backoff_max,
        token_pipe=proxy.binary == "bundled",
    )


def build_source(settings: AgentSettings) -> NotificationSource:
    """
    Instantiate the configured notification source (resolved lazily, docs/architecture.md §5.1).

    Args:
        settings: Validated settings.

    Returns:
        An unentered source.
    """
    kind = resolve_kind(settings.notify)
    cls = load_source_class(settings.notify)
    if kind == "greengrass":
        return cls(thing_name=settings.thing_name)
    mqtt = settings.mqtt
    return cls(
        thing_name=settings.thing_name,
        endpoint=mqtt.endpoint,
        port=mqtt.port,
        client_id=settings.client_id,
        cert=mqtt.cert,
        key=mqtt.key,
        ca=mqtt.ca,
        http_proxy=None if mqtt.http_proxy is None else mqtt.http_proxy.get_secret_value(),
        min_reconnect_delay=mqtt.min_reconnect_delay,
        max_reconnect_delay=mqtt.max_reconnect_delay,
        reconnect_reset_after=mqtt.reconnect_reset_after,
        receive_maximum=mqtt.receive_maximum,
    )


async def _stop_stray(pid: int) -> None:
    """
    Stop a child nobody supervises (SIGTERM to its group, grace, SIGKILL) and reap it.
    """
    log.warning("stray_child_stopping", pid=pid)
    waiter = ChildExit(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        # A proxy leads its own group: what it started goes too.
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGTERM)
        else:
            os.kill(pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(_STRAY_GRACE):
            await asyncio.shield(waiter.status)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        await waiter.status


def _record_store(settings: AgentSettings) -> RecordStore | None:
    """
    The tunnel records' store when persistence is on and its directory usable.
    """
    store = RecordStore(settings.tunnels.directory)
    if settings.tunnels.persist:
        return store if store.prepare() else None
    # Tokens in memory only: records an earlier configuration left must not linger.
    purged = store.purge()
    if purged:
        log.info("tunnel_records_purged", count=purged, path=str(store.directory))
    return None


def _default_launcher(settings: AgentSettings, config: SpawnConfig) -> ProxyLauncher:
    """
    The launcher (fork server) for the bundled proxy unless turned off, else plain processes.
    """
    if settings.proxy.binary != "bundled" or not settings.proxy.launcher:
        return SubprocessLauncher()
    env = build_env(
        token=None, client_token=None, extra_env=config.extra_env, http_proxy=config.http_proxy
    )
    return ForkLauncher(env=env, merge_pages=settings.proxy.merge_pages)


def build_daemon(  # noqa: PLR0913 - keyword-only, each a seam for tests
    settings: AgentSettings,
    *,
    reload: Callable[[], AgentSettings] | None = None,
    source: NotificationSource | None = None,
    launcher: ProxyLauncher | None = None,
    environ: Mapping[str, str] | None = None,
    reexec_plan: ReexecPlan | None = None,
) -> Daemon:
    """
    Wire a daemon from settings: source, launcher, manager, records, status file, systemd.

    Takes the hand-off of a previous program image (a reload), if there is one.

    Args:
        settings: Validated settings.
        reload: Re-reads the settings on SIGHUP (raising :class:`ConfigError` on error).
        source: Notification source; :func:`build_source` by default.
        launcher: Proxy launcher; :class:`SubprocessLauncher` by default.
        environ: Environment for systemd's variables; :data:`os.environ` by default.
        reexec_plan: How SIGHUP re-executes the agent; ``None`` reloads in place.

    Returns:
        A daemon ready to :meth:`Daemon.run`.
    """
    handoff = read_handoff()
    status = StatusFile(settings.state_dir, thing_name=settings.thing_name)
    holder: list[Daemon] = []
    records = _record_store(settings)
    spawn_config = spawn_config_from(settings)
    if launcher is None:
        launcher = _default_launcher(settings, spawn_config)
    warm_up = launcher.warm_up if isinstance(launcher, ForkLauncher) else None
    try:
        manager = TunnelManager(
            launcher=launcher,
            services=settings.services,
            limits=limits_from(settings),
            options=spawn_config,
            on_change=lambda: holder[0].changed() if holder else None,
            records=records,
        )
    except BaseException:
        if handoff is not None:
            close_descriptors(handoff.descriptors())
        raise

    def reload_limits() -> tuple[Mapping[str, str], Limits]:
        assert reload is not None  # noqa: S101 - only passed down when set
        fresh = reload()
        return fresh.services, limits_from(fresh)

    source = source if source is not None else build_source(settings)
    daemon = Daemon(
        source=source,
        manager=manager,
        status=status,
        reload=reload_limits if reload is not None else None,
        notifier=SdNotifier.from_environ(environ),
        watchdog=watchdog_interval(environ),
        thing_name=settings.thing_name,
        records=records,
        handoff=handoff,
        reexec_plan=reexec_plan,
        warm_up=warm_up,
        reporter=build_reporter(settings, source),
    )
    holder.append(daemon)
    return daemon


def build_reporter(settings: AgentSettings, source: NotificationSource) -> ShadowReporter | None:
    """
    The shadow reporter, when ``[report] shadow`` is set and the source can publish.

    Args:
        settings: Validated settings.
        source: The notification source whose connection carries the report.

    Returns:
        A reporter, or ``None`` (turned off, or a source that cannot publish: Greengrass).
    """
    name = settings.report.shadow
    if not name:
        return None
    if not isinstance(source, Publisher):
        log.info("shadow_report_unavailable", reason="the notification source cannot publish")
        return None
    return ShadowReporter(source.publish, topic=shadow_update_topic(settings.thing_name, name))
