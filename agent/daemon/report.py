"""
The agent's health, and its report to the device's named shadow (``tunnel-agent``).

Two halves: pure functions that build the documents (the status file's health part and the
shadow's ``state.reported``) from plain values, and :class:`ShadowReporter`, a small
coalescer that publishes the latest document at most once a second, and only when it
changed. The report never holds a token: services are named only when they are
well-formed service ids, and a rejection's reason is :mod:`agent.daemon.notification`'s
wording, which never quotes a payload value.

A publish the device's IoT policy refuses (PUBACK reason 135, not authorized) is logged
once (``shadow_report_refused``) and reporting carries on quietly: tunnels never depend on
the shadow. The agent is marked ``offline`` by an explicit update when it stops cleanly;
AWS IoT's shadow service ignores MQTT will messages sent to reserved (``$aws``) topics, so
after a crash the shadow keeps its last report, and ``updated_at`` tells how old it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog


if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    from agent.daemon.tunnels import Limits, TunnelInfo
    from agent.notify.base import PublishResult


__all__ = [
    "DEFAULT_SHADOW",
    "Health",
    "Rejection",
    "ShadowReporter",
    "health_document",
    "offline_document",
    "reported_document",
    "shadow_update_topic",
]

log = structlog.get_logger("agent.daemon.report")

DEFAULT_SHADOW = "tunnel-agent"
# A shadow's reported section must stay well under AWS IoT's 8 KiB document limit.
_MAX_ERROR = 200
_MAX_REASON = 300


def shadow_update_topic(thing_name: str, shadow: str) -> str:
    """
    The MQTT topic that updates a named shadow.
    """
    return f"$aws/things/{thing_name}/shadow/name/{shadow}/update"


@dataclass(frozen=True, slots=True)
class Rejection:
    """
    A notification the agent refused.

    Attributes:
        at: When, seconds since the epoch.
        reason: Why, in words that quote no payload value.
        services: The services it asked for, when each is a well-formed service id.
        service_count: How many it asked for, when they cannot be named.
    """

    at: float
    reason: str
    services: tuple[str, ...] | None = None
    service_count: int | None = None

    def document(self) -> dict[str, Any]:
        """
        As JSON, for the status file and the shadow.
        """
        # Both keys always: in a shadow, null removes what an earlier rejection left there.
        return {
            "at": round(self.at, 3),
            "reason": self.reason[:_MAX_REASON],
            "services": None if self.services is None else list(self.services),
            "service_count": self.service_count,
        }


@dataclass(slots=True)
class Health:
    """
    What the agent knows about its own links, beyond its tunnels.

    Attributes:
        mqtt_state: ``connected``, ``disconnected``, or ``unknown`` (a source that cannot say).
        mqtt_since: When the MQTT state last changed (the session start while connected).
        notification_at: When the last notification arrived.
        notification_outcome: What became of it (``started``, ``rejected``, ...).
        rejection: The last refused notification.
    """

    mqtt_state: str = "unknown"
    mqtt_since: float | None = None
    notification_at: float | None = None
    notification_outcome: str | None = None
    rejection: Rejection | None = None

    def link(self, *, connected: bool | None, since: float | None = None) -> bool:
        """
        Record the MQTT link's state; return whether it changed.
        """
        state = "unknown" if connected is None else ("connected" if connected else "disconnected")
        if state == self.mqtt_state:
            return False
        self.mqtt_state = state
        self.mqtt_since = time.time() if since is None else since
        return True


def health_document(health: Health) -> dict[str, Any]:
    """
    The health part of the status file: ``mqtt``, ``last_notification``, ``last_rejection``.
    """
    return {
        "mqtt": {"state": health.mqtt_state, "since": health.mqtt_since},
        "last_notification": None
        if health.notification_at is None
        else {"at": health.notification_at, "outcome": health.notification_outcome},
        "last_rejection": None if health.rejection is None else health.rejection.document(),
    }


def _tunnel(info: TunnelInfo) -> dict[str, Any]:
    # No nulls: a shadow refuses null inside an array; a missing key means unknown.
    row = {
        "key": info.key,
        "services": list(info.services),
        "since": round(info.started_at, 3),
        "connected": info.connected,
        "connections": info.connections,
        "bytes_in": info.bytes_in,
        "bytes_out": info.bytes_out,
        "restarts": info.restarts,
        "last_error": None if info.last_error is None else info.last_error[:_MAX_ERROR],
    }
    return {key: value for key, value in row.items() if value is not None}


def reported_document(  # noqa: PLR0913 - keyword-only, one per reported field
    *,
    version: str,
    state: str,
    started_at: float,
    health: Health,
    services: Sequence[str],
    limits: Limits,
    tunnels: Sequence[TunnelInfo],
) -> dict[str, Any]:
    """
    Build the shadow's ``state.reported`` (without ``updated_at``, stamped at publish).

    Tunnels are a list, so each report replaces the previous one whole (a shadow merges
    objects key by key but replaces arrays).
    """
    return {
        "version": version,
        "state": state,
        "started_at": round(started_at, 3),
        "mqtt_session_start": health.mqtt_since if health.mqtt_state == "connected" else None,
        "services": sorted(services),
        "limits": {
            "max_concurrent_tunnels": limits.max_concurrent,
            "max_tunnel_lifetime": limits.max_lifetime,
            "on_limit": limits.on_limit,
        },
        "tunnels": [_tunnel(t) for t in tunnels],
        "last_rejection": None if health.rejection is None else health.rejection.document(),
    }


def offline_document(*, at: float | None = None) -> dict[str, Any]:
    """
    The ``state.reported`` of an agent that stopped cleanly: no tunnel, ``offline`` since now.
    """
    return {"state": "offline", "tunnels": [], "offline_since": time.time() if at is None else at}


class ShadowReporter:
    """
    Publishes the latest reported document: on change, at most once per ``interval``.

    Args:
        publish: Sends ``(topic, payload)`` at QoS 1 and returns the outcome.
        topic: The shadow's update topic.
        interval: Least seconds between two publishes.
    """

    def __init__(
        self,
        publish: Callable[[str, bytes], Awaitable[PublishResult]],
        *,
        topic: str,
        interval: float = 1.0,
    ) -> None:
        """
        Idle until :meth:`update` is first called.
        """
        self._publish = publish
        self.topic = topic
        self._interval = interval
        self._pending: Mapping[str, Any] | None = None
        self._last: Mapping[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._refused_logged = False
        self._closed = False
        #: Publishes the broker accepted.
        self.published = 0

    def update(self, reported: Mapping[str, Any]) -> None:
        """
        Queue this document; it replaces one not published yet, and is dropped if unchanged.
        """
        if self._closed:
            return
        if reported == self._last:
            self._pending = None
            return
        self._pending = reported
        self._wake.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="shadow-report")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        last_sent = -self._interval
        while True:
            await self._wake.wait()
            self._wake.clear()
            delay = last_sent + self._interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            document, self._pending = self._pending, None
            if document is None:
                continue
            last_sent = loop.time()
            await self._send(document)

    async def _send(self, reported: Mapping[str, Any]) -> bool:
        body = {"state": {"reported": {**reported, "updated_at": round(time.time(), 3)}}}
        payload = json.dumps(body, separators=(",", ":")).encode()
        try:
            result = await self._publish(self.topic, payload)
        except Exception as exc:  # the report must never disturb the tunnels
            log.warning("shadow_report_failed", error=repr(exc))
            return False
        if result.ok:
            self._last = reported
            self.published += 1
            return True
        if result.refused:
            if not self._refused_logged:
                self._refused_logged = True
                log.warning("shadow_report_refused", topic=self.topic, reason=result.reason)
        else:
            log.info("shadow_report_failed", topic=self.topic, reason=result.reason)
        return False

    async def close(self, final: Mapping[str, Any] | None = None) -> None:
        """
        Stop, then publish ``final`` (the offline mark); bound it with :func:`asyncio.timeout`.
        """
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if final is not None:
            await self._send(final)
