"""
Tunnel notifications over MQTT5 (awsiotsdk / awscrt), with mutual TLS to AWS IoT Core.

The device subscribes at QoS 1 to ``$aws/things/<thing>/tunnels/notify``
(docs/protocol.md §17.3) inside a persistent session: the client always asks to rejoin
its session (``REJOIN_ALWAYS``) with a session expiry of at least an hour, so a
notification published while the device was briefly offline is queued by the
broker and delivered on reconnection. When the CONNACK says no session was
present (expired, or a broker that lost it), the subscription is made again.

A notification is acknowledged (PUBACK) only when the daemon says it was
handled: the source takes manual control of each QoS 1 PUBACK inside awscrt's
publish callback and sends it from :class:`~agent.notify.base.Acknowledgement`.
Until then the broker keeps the message; one still unacknowledged when the
connection drops or the agent dies is sent again when the session resumes (the
daemon's duplicate check then ignores a copy already handled). The CONNECT's
Receive Maximum caps the unacknowledged notifications the broker may have out,
which bounds the queue without ever dropping one.

awscrt reconnects by itself, with exponential backoff and decorrelated jitter
between the configured minimum and maximum delays; the delay goes back to the
minimum once a connection has lasted ``reconnect_reset_after`` seconds. Its
callbacks run on CRT threads: they only hand data to the event loop
(``call_soon_threadsafe``). Payloads are handed over raw; parsing lives in
:mod:`agent.daemon.notification`. Nothing here logs a payload: it
carries the access token.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import TYPE_CHECKING, Self

import structlog
from awscrt import mqtt5

from agent.common.loop import call_in_loop
from agent.exceptions import ConfigError, NotificationError
from agent.notify.base import Acknowledgement, NotificationQueue, PublishResult, RawNotification
from agent.notify.mqtt_client import build_client, proxy_options
from agent.protocol.ids import THING_NAME


if TYPE_CHECKING:
    import concurrent.futures
    import enum
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path


__all__ = ["MAX_RECEIVE_MAXIMUM", "MIN_SESSION_EXPIRY", "MqttNotificationSource"]

_log = structlog.get_logger(__name__)

#: Shortest session expiry accepted: an hour of queued notifications (the AWS IoT default).
MIN_SESSION_EXPIRY = 3600
#: Largest Receive Maximum asked for (AWS IoT Core's in-flight limit is 100).
MAX_RECEIVE_MAXIMUM = 100
_STOP_TIMEOUT = 5.0


def _code_name(codes: type[enum.IntEnum], value: int | None) -> str | None:
    if value is None:
        return None
    try:
        return codes(value).name
    except ValueError:
        return str(value)


def _error_name(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    # AwsCrtError carries a stable symbolic name (e.g. AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE).
    return str(getattr(exc, "name", type(exc).__name__))


class MqttNotificationSource:
    """
    A :class:`~agent.notify.base.NotificationSource` on an MQTT5 persistent session.

    Args:
        thing_name: The thing whose notify topic to subscribe to.
        endpoint: AWS IoT data endpoint (or the emulator's broker host).
        cert: The thing's certificate (PEM).
        key: The thing's private key (PEM).
        ca: Trust anchor for the broker; ``None`` uses the system store.
        port: Broker port (8883 for AWS IoT mutual TLS).
        client_id: MQTT client id; defaults to the thing name (AWS IoT policies usually
            tie the two together).
        session_expiry: Seconds the broker keeps the session while disconnected;
            at least :data:`MIN_SESSION_EXPIRY`.
        keep_alive: PINGREQ interval, seconds (AWS IoT allows 30..1200).
        min_reconnect_delay: First reconnect delay, seconds.
        max_reconnect_delay: Largest reconnect delay, seconds.
        reconnect_reset_after: Seconds a connection must last for the reconnect
            delay to start again from ``min_reconnect_delay``.
        receive_maximum: Unacknowledged notifications the broker may have out at
            once (MQTT5 Receive Maximum, 1..:data:`MAX_RECEIVE_MAXIMUM`).
        http_proxy: Optional ``http://[user:password@]host:port`` proxy.
        connect_timeout: Seconds ``__aenter__`` waits for the first subscription
            before returning anyway (the client keeps trying in the background).

    Raises:
        ConfigError: Invalid thing name, session expiry, reconnect delays, Receive
            Maximum or proxy URL.
    """

    def __init__(  # noqa: PLR0913 - keyword-only settings mirroring [mqtt]
        self,
        *,
        thing_name: str,
        endpoint: str,
        cert: Path,
        key: Path,
        ca: Path | None = None,
        port: int = 8883,
        client_id: str | None = None,
        session_expiry: int = MIN_SESSION_EXPIRY,
        keep_alive: int = 1200,
        min_reconnect_delay: float = 1.0,
        max_reconnect_delay: float = 20.0,
        reconnect_reset_after: float = 10.0,
        receive_maximum: int = 10,
        http_proxy: str | None = None,
        connect_timeout: float = 30.0,
    ) -> None:
        """
        Validate and record the settings; nothing connects before ``__aenter__``.
        """
        # The name goes into a topic: a wildcard or '/' would widen the subscription.
        if not THING_NAME.fullmatch(thing_name):
            raise ConfigError(f"thing name {thing_name!r} does not match [a-zA-Z0-9:_-]{{1,128}}")
        if session_expiry < MIN_SESSION_EXPIRY:
            raise ConfigError(f"session_expiry must be >= {MIN_SESSION_EXPIRY} seconds")
        if not 1 <= receive_maximum <= MAX_RECEIVE_MAXIMUM:
            raise ConfigError(f"receive_maximum must be between 1 and {MAX_RECEIVE_MAXIMUM}")
        if not 0 < min_reconnect_delay <= max_reconnect_delay:
            raise ConfigError("reconnect delays must satisfy 0 < min_reconnect_delay <= max")
        if reconnect_reset_after <= 0:
            raise ConfigError("reconnect_reset_after must be > 0")
        self.thing_name = thing_name
        self.topic = f"$aws/things/{thing_name}/tunnels/notify"
        self.client_id = client_id or thing_name
        self.endpoint = endpoint
        self.port = port
        self.connect_timeout = connect_timeout
        self.session_expiry = session_expiry
        self._cert, self._key, self._ca = cert, key, ca
        self._keep_alive = keep_alive
        self._reconnect_delays = (min_reconnect_delay, max_reconnect_delay)
        self._reconnect_reset_after = reconnect_reset_after
        self.receive_maximum = receive_maximum
        self._http_proxy = http_proxy
        # Fail on a bad proxy URL now, at configuration time, not inside __aenter__.
        if http_proxy is not None:
            proxy_options(http_proxy)
        self._queue = NotificationQueue(source="mqtt")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt5.Client | None = None
        self._ready: asyncio.Future[None] | None = None
        self._stopped: asyncio.Event | None = None
        self._closing = False
        self._subscribing = False
        self.connected = False
        #: When the current connection (MQTT session) started, or the last one ended.
        self.connected_since: float | None = None
        #: Called in the loop when :attr:`connected` changes.
        self.on_link_change: Callable[[], None] | None = None
        self.subscribed = False
        self.connections = 0
        self.subscriptions = 0
        #: Notifications of the current connection not acknowledged yet.
        self.unacknowledged = 0
        self._over_maximum = False

    # -- NotificationSource ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """
        Start the client; wait up to ``connect_timeout`` for the subscription.

        Returning before the first connection is deliberate: a device may boot
        without network, and the client keeps reconnecting in the background.

        Raises:
            NotificationError: The broker refused the subscription (SUBACK failure:
                the certificate's policy does not allow this thing's notify topic).
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._closing = False
        self._ready = loop.create_future()
        # A refusal that arrives after __aenter__ gave up waiting is logged, not lost: mark
        # the future's exception as retrieved so asyncio does not report it at collection.
        self._ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        stopped = self._stopped = asyncio.Event()
        self._client = build_client(
            endpoint=self.endpoint,
            port=self.port,
            cert=self._cert,
            key=self._key,
            ca=self._ca,
            client_id=self.client_id,
            session_expiry=self.session_expiry,
            keep_alive=self._keep_alive,
            min_reconnect_delay=self._reconnect_delays[0],
            max_reconnect_delay=self._reconnect_delays[1],
            reconnect_reset_after=self._reconnect_reset_after,
            receive_maximum=self.receive_maximum,
            http_proxy=self._http_proxy,
            on_publish=self._on_publish,
            on_success=lambda d: call_in_loop(loop, self._connected, d),
            on_failure=lambda d: call_in_loop(loop, self._connect_failed, d),
            on_disconnect=lambda d: call_in_loop(loop, self._disconnected, d),
            on_stopped=lambda _d: call_in_loop(loop, stopped.set),
        )
        self._client.start()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await asyncio.shield(self._ready)
        except TimeoutError:
            _log.warning(
                "mqtt_connect_pending",
                endpoint=self.endpoint,
                port=self.port,
                waited=self.connect_timeout,
            )
        except NotificationError:
            await self._stop_client()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """
        Disconnect (the broker keeps the session) and end any pending iteration.
        """
        self._closing = True
        await self._stop_client()
        self._queue.close()

    def __aiter__(self) -> AsyncIterator[RawNotification]:
        """
        Return an iterator over received notifications, ending once the source is closed.
        """
        return aiter(self._queue)

    @property
    def waiting(self) -> int:
        """
        Notifications received and not yet taken by the daemon.
        """
        return len(self._queue)

    async def wait_subscribed(self) -> None:
        """
        Wait until the first subscription is acknowledged (bound it with :func:`asyncio.timeout`).

        Raises:
            NotificationError: The subscription was refused.
        """
        if self._ready is not None:
            await asyncio.shield(self._ready)

    async def publish(self, topic: str, payload: bytes) -> PublishResult:
        """
        Publish at QoS 1 on this source's connection (:class:`~agent.notify.base.Publisher`).

        awscrt keeps a QoS 1 publish made while offline until the next connection.

        Returns:
            The outcome; a PUBACK failure (135: not authorized) is ``refused``.
        """
        client = self._client
        if client is None:
            return PublishResult(ok=False, reason="not connected")
        packet = mqtt5.PublishPacket(topic=topic, payload=payload, qos=mqtt5.QoS.AT_LEAST_ONCE)
        try:
            data = await asyncio.wrap_future(client.publish(packet))
        except Exception as exc:  # an SDK error is an outcome, not a crash
            return PublishResult(ok=False, reason=_error_name(exc))
        puback = getattr(data, "puback", None)
        code = getattr(puback, "reason_code", None)
        if code is not None and int(code) >= 0x80:
            name = _code_name(mqtt5.PubackReasonCode, int(code))
            return PublishResult(ok=False, reason=name, refused=True)
        return PublishResult(ok=True)

    def _link_changed(self, *, connected: bool) -> None:
        self.connected = connected
        self.connected_since = time.time()
        if self.on_link_change is not None:
            self.on_link_change()

    # -- internals (event loop) -----------------------------------------------------------------

    async def _stop_client(self) -> None:
        client, self._client = self._client, None
        if client is None or self._stopped is None:
            return
        client.stop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_STOP_TIMEOUT):
                await self._stopped.wait()
        if self.connected:
            self._link_changed(connected=False)
            _log.info("mqtt_disconnected", client_id=self.client_id, reason="stopped")
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()

    def _deliver(
        self, topic: str, payload: bytes, control: mqtt5.PublishAcknowledgementControlHandle | None
    ) -> None:
        # Not acknowledged when closing: the broker sends it again next time.
        if self._closing:
            return
        if control is None:
            ack = Acknowledgement()  # QoS 0: nothing to acknowledge
        else:
            # In order with the lifecycle callbacks (same CRT thread, FIFO hand-off), so
            # `connections` is the connection this PUBLISH arrived on.
            ack = Acknowledgement(functools.partial(self._puback, control, self.connections))
            self.unacknowledged += 1
            if self.unacknowledged > self.receive_maximum and not self._over_maximum:
                # The broker ignores our Receive Maximum (Mosquitto 2.0.11 does after the
                # first PUBACK): nothing is dropped, but say so once per connection.
                self._over_maximum = True
                _log.warning(
                    "mqtt_receive_maximum_exceeded",
                    unacknowledged=self.unacknowledged,
                    receive_maximum=self.receive_maximum,
                )
        self._queue.put(RawNotification(topic=topic, payload=payload, ack=ack))

    def _puback(self, control: mqtt5.PublishAcknowledgementControlHandle, connection: int) -> None:
        if connection != self.connections:
            # A reconnection cancelled this PUBACK; the broker has sent the message again.
            return
        self.unacknowledged -= 1
        client = self._client
        if client is None:
            return  # stopped: the session keeps the message for the next start
        try:
            client.invoke_publish_acknowledgement(control)
        except Exception as exc:  # an SDK error must not stop the daemon
            _log.warning("mqtt_puback_failed", error=_error_name(exc))

    def _connected(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        if self._closing:
            return
        connack = data.connack_packet
        session_present = bool(connack is not None and connack.session_present)
        self.connections += 1
        self._link_changed(connected=True)
        # PUBACKs owed on the previous connection were cancelled by awscrt.
        self.unacknowledged = 0
        self._over_maximum = False
        _log.info(
            "mqtt_connected",
            client_id=self.client_id,
            endpoint=self.endpoint,
            port=self.port,
            session_present=session_present,
            reason_code=_code_name(mqtt5.ConnectReasonCode, getattr(connack, "reason_code", None)),
        )
        # A resumed session keeps the subscription; a new one (first start, expiry,
        # a broker that lost its state) needs it made again.
        if not session_present:
            self.subscribed = False
        if not self.subscribed:
            self._subscribe()

    def _connect_failed(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        if self._closing:
            return
        connack = data.connack_packet
        _log.warning(
            "mqtt_connect_failed",
            client_id=self.client_id,
            endpoint=self.endpoint,
            port=self.port,
            error=_error_name(data.exception),
            reason_code=_code_name(mqtt5.ConnectReasonCode, getattr(connack, "reason_code", None)),
        )

    def _disconnected(self, data: mqtt5.LifecycleDisconnectData) -> None:
        if self._closing:
            return
        self._link_changed(connected=False)
        packet = data.disconnect_packet
        _log.info(
            "mqtt_disconnected",
            client_id=self.client_id,
            error=_error_name(data.exception),
            reason_code=_code_name(
                mqtt5.DisconnectReasonCode, getattr(packet, "reason_code", None)
            ),
        )

    def _subscribe(self) -> None:
        if self._client is None or self._subscribing:
            return
        self._subscribing = True
        loop = self._loop
        assert loop is not None  # noqa: S101 - set by __aenter__
        packet = mqtt5.SubscribePacket([mqtt5.Subscription(self.topic, mqtt5.QoS.AT_LEAST_ONCE)])
        future = self._client.subscribe(packet)
        future.add_done_callback(lambda f: call_in_loop(loop, self._subscribe_done, f))

    def _subscribe_done(self, future: concurrent.futures.Future[mqtt5.SubackPacket]) -> None:
        self._subscribing = False
        if self._closing:
            return
        exc = future.exception()
        if exc is not None:
            # Typically the connection dropped before the SUBACK: the next CONNACK
            # triggers another attempt, since `subscribed` is still False.
            _log.warning("mqtt_subscribe_interrupted", topic=self.topic, error=_error_name(exc))
            return
        codes = list(future.result().reason_codes or [])
        names = [_code_name(mqtt5.SubackReasonCode, c) for c in codes]
        if codes and all(int(c) < 0x80 for c in codes):
            self.subscribed = True
            self.subscriptions += 1
            _log.info("mqtt_subscribed", topic=self.topic, reason_codes=names)
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            return
        _log.error("mqtt_subscribe_failed", topic=self.topic, reason_codes=names)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(
                NotificationError(
                    f"subscription to {self.topic} refused: {', '.join(map(str, names))}"
                )
            )

    # -- CRT thread -----------------------------------------------------------------------------

    def _on_publish(self, data: mqtt5.PublishReceivedData) -> None:
        loop = self._loop
        packet = data.publish_packet
        if loop is None or packet is None:
            return
        # Only possible inside this callback: afterwards awscrt would have sent the PUBACK.
        acquire = data.acquire_publish_acknowledgement_control
        control = acquire() if acquire is not None else None
        topic = packet.topic or self.topic
        call_in_loop(loop, self._deliver, topic, bytes(packet.payload or b""), control)
