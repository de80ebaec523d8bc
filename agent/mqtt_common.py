"""
Shared awscrt MQTT5 plumbing: client construction, thread-to-loop hand-off, an asyncio client.

awscrt runs its own event-loop threads and calls back on them. Nothing here
touches asyncio state from those threads: every callback is forwarded with
``loop.call_soon_threadsafe`` (:func:`call_in_loop`), as SEAM 1 requires
(interfaces.md). The device-side :mod:`agent.notify.mqtt` uses
:func:`build_client` and :func:`call_in_loop`; :class:`AsyncMqttClient` serves
the emulator's publisher, its broker administration and the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Self

import structlog
from awscrt import http as crt_http, mqtt5
from awsiot import mqtt5_client_builder

from agent.exceptions import AgentError, ConfigError


if TYPE_CHECKING:
    import concurrent.futures
    from collections.abc import Callable
    from pathlib import Path


__all__ = [
    "AsyncMqttClient",
    "Message",
    "MqttConnectError",
    "Validation",
    "build_client",
    "call_in_loop",
    "proxy_options",
]

log = structlog.get_logger(__name__)

Validation = Literal["aws", "none"]


class MqttConnectError(AgentError):
    """
    An MQTT client could not connect (TLS refused, CONNACK failure, timeout).
    """


@dataclass(frozen=True, slots=True)
class Message:
    """
    One PUBLISH received by an :class:`AsyncMqttClient`.

    Attributes:
        topic: The topic it arrived on.
        payload: Raw payload bytes.
    """

    topic: str
    payload: bytes

    def __repr__(self) -> str:
        """
        Hide the payload: on the notify topic it holds an access token (STYLE §7).
        """
        return f"Message(topic={self.topic!r}, payload=<{len(self.payload)} bytes>)"


def call_in_loop(loop: asyncio.AbstractEventLoop, func: Callable[..., object], *args: Any) -> None:
    """
    Schedule ``func(*args)`` on ``loop`` from any thread; a no-op once the loop is closed.

    CRT threads may still deliver a callback while the loop shuts down; dropping it
    then is correct, since nobody is left to consume it.

    Args:
        loop: The event loop that owns the consumer.
        func: Called in the loop's thread.
        *args: Passed to ``func``.
    """
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(func, *args)


def proxy_options(url: str) -> crt_http.HttpProxyOptions:
    """
    Turn ``http://[user:password@]host:port`` into awscrt proxy options (CONNECT tunnel).

    Args:
        url: The proxy URL. Only plain ``http`` proxies are supported: TLS to the
            broker runs inside the CONNECT tunnel either way.

    Returns:
        Options for :class:`awscrt.mqtt5.ClientOptions`.

    Raises:
        ConfigError: Unsupported scheme, missing host, or a bad port. The message
            never repeats the URL, which may carry a password.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError("mqtt.http_proxy: invalid URL (bad port?)") from exc
    if parts.scheme != "http":
        raise ConfigError("mqtt.http_proxy: only http:// proxies are supported")
    if not parts.hostname:
        raise ConfigError("mqtt.http_proxy: no host in the URL")
    options = crt_http.HttpProxyOptions(
        host_name=parts.hostname,
        port=port or 80,
        connection_type=crt_http.HttpProxyConnectionType.Tunneling,
    )
    if parts.username is not None:
        options.auth_type = crt_http.HttpProxyAuthenticationType.Basic
        options.auth_username = urllib.parse.unquote(parts.username)
        options.auth_password = urllib.parse.unquote(parts.password or "")
    return options


def build_client(  # noqa: PLR0913 - one knob per MQTT5 client option we set
    *,
    endpoint: str,
    port: int,
    cert: Path,
    key: Path,
    ca: Path | None,
    client_id: str,
    session_expiry: int = 0,
    keep_alive: int = 1200,
    min_reconnect_delay: float = 1.0,
    max_reconnect_delay: float = 120.0,
    http_proxy: str | None = None,
    validation: Validation = "aws",
    on_publish: Callable[[mqtt5.PublishReceivedData], None] | None = None,
    on_success: Callable[[mqtt5.LifecycleConnectSuccessData], None] | None = None,
    on_failure: Callable[[mqtt5.LifecycleConnectFailureData], None] | None = None,
    on_disconnect: Callable[[mqtt5.LifecycleDisconnectData], None] | None = None,
    on_stopped: Callable[[mqtt5.LifecycleStoppedData], None] | None = None,
) -> mqtt5.Client:
    """
    Build an awscrt MQTT5 client with mutual TLS from PEM files.

    Args:
        endpoint: Broker host name or address.
        port: Broker port.
        cert: Client certificate (its CN is the thing name on AWS IoT and the emulator).
        key: Client private key.
        ca: Trust anchor; ``None`` uses the system store.
        client_id: MQTT client id.
        session_expiry: Seconds the broker keeps the session after a disconnect; a
            non-zero value also asks to rejoin the session on every connect
            (``REJOIN_ALWAYS``), zero asks for a clean session.
        keep_alive: PINGREQ interval in seconds.
        min_reconnect_delay: First reconnect delay, seconds.
        max_reconnect_delay: Cap of the exponential reconnect delay, seconds.
        http_proxy: Optional ``http://host:port`` proxy for the TCP connection.
        validation: ``"aws"`` applies AWS IoT Core's client-side limits (topic shape,
            100 publishes/s); ``"none"`` for the emulator's own service clients.
        on_publish: Called on a CRT thread for each received PUBLISH.
        on_success: Called on a CRT thread on each CONNACK success.
        on_failure: Called on a CRT thread for each failed connection attempt.
        on_disconnect: Called on a CRT thread when a live connection drops.
        on_stopped: Called on a CRT thread once the client has stopped.

    Returns:
        The client, not yet started.

    Raises:
        ConfigError: The proxy URL is invalid.
    """
    behavior = (
        mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS
        if session_expiry
        else mqtt5.ClientSessionBehaviorType.CLEAN
    )
    flow = (
        mqtt5.ExtendedValidationAndFlowControlOptions.AWS_IOT_CORE_DEFAULTS
        if validation == "aws"
        else mqtt5.ExtendedValidationAndFlowControlOptions.NONE
    )
    return mqtt5_client_builder.mtls_from_path(
        cert_filepath=str(cert),
        pri_key_filepath=str(key),
        endpoint=endpoint,
        port=port,
        ca_filepath=None if ca is None else str(ca),
        client_id=client_id,
        session_behavior=behavior,
        session_expiry_interval_sec=session_expiry or None,
        keep_alive_interval_sec=keep_alive,
        # Decorrelated jitter spreads a fleet's reconnects after a broker outage
        # without the near-zero delays full jitter allows.
        retry_jitter_mode=mqtt5.ExponentialBackoffJitterMode.DECORRELATED,
        min_reconnect_delay_ms=max(1, int(min_reconnect_delay * 1000)),
        max_reconnect_delay_ms=max(1, int(max_reconnect_delay * 1000)),
        # QoS 1 publishes issued while offline wait for the next connection.
        offline_queue_behavior=mqtt5.ClientOperationQueueBehaviorType.FAIL_NON_QOS1_PUBLISH_ON_DISCONNECT,
        http_proxy_options=None if http_proxy is None else proxy_options(http_proxy),
        extended_validation_and_flow_control_options=flow,
        enable_metrics_collection=False,
        on_publish_received=on_publish,
        on_lifecycle_connection_success=on_success,
        on_lifecycle_connection_failure=on_failure,
        on_lifecycle_disconnection=on_disconnect,
        on_lifecycle_stopped=on_stopped,
    )


def _describe_failure(data: mqtt5.LifecycleConnectFailureData) -> str:
    connack = data.connack_packet
    if connack is not None and connack.reason_code is not None:
        return f"CONNACK {mqtt5.ConnectReasonCode(connack.reason_code).name}"
    return "unknown error" if data.exception is None else str(data.exception)


class AsyncMqttClient:
    """
    An asyncio face on one awscrt MQTT5 client with mutual TLS.

    Received messages land in a bounded queue read with :meth:`receive`; a full
    queue drops the message with a warning rather than blocking a CRT thread.

    Args:
        endpoint: Broker host.
        port: Broker port.
        cert: Client certificate.
        key: Client private key.
        ca: Broker trust anchor.
        client_id: MQTT client id.
        session_expiry: See :func:`build_client`; 0 = clean session.
        min_reconnect_delay: First reconnect delay, seconds.
        max_reconnect_delay: Reconnect delay cap, seconds.
        queue_size: Capacity of the receive queue.
        validation: See :func:`build_client`.
        connect_timeout: Seconds :meth:`connect` waits for the first CONNACK.
        stop_timeout: Seconds :meth:`disconnect` waits for the client to stop.
    """

    def __init__(  # noqa: PLR0913 - mirrors build_client's keyword-only options
        self,
        *,
        endpoint: str,
        port: int,
        cert: Path,
        key: Path,
        ca: Path | None,
        client_id: str,
        session_expiry: int = 0,
        min_reconnect_delay: float = 0.1,
        max_reconnect_delay: float = 2.0,
        queue_size: int = 1000,
        validation: Validation = "none",
        connect_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        """
        Store the options; nothing connects before :meth:`connect`.
        """
        self._options: dict[str, Any] = {
            "endpoint": endpoint,
            "port": port,
            "cert": cert,
            "key": key,
            "ca": ca,
            "client_id": client_id,
            "session_expiry": session_expiry,
            "min_reconnect_delay": min_reconnect_delay,
            "max_reconnect_delay": max_reconnect_delay,
            "validation": validation,
        }
        self.client_id = client_id
        self.connect_timeout = connect_timeout
        self.stop_timeout = stop_timeout
        self._queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=queue_size)
        self._client: mqtt5.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first: asyncio.Future[mqtt5.ConnackPacket] | None = None
        self._stopped: asyncio.Event | None = None
        self._last_failure = "no attempt yet"
        self.connected = False
        self.connections = 0

    async def __aenter__(self) -> Self:
        """
        Connect; see :meth:`connect`.
        """
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """
        Disconnect; see :meth:`disconnect`.
        """
        await self.disconnect()

    async def connect(self) -> mqtt5.ConnackPacket:
        """
        Start the client and wait for its first successful CONNACK.

        The first attempt must succeed; afterwards the CRT reconnects by itself.

        Returns:
            The CONNACK (``session_present`` tells whether a session was resumed).

        Raises:
            MqttConnectError: The first attempt failed, or nothing answered within
                ``connect_timeout``; the client is stopped either way.
        """
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._first = loop.create_future()
        self._stopped = asyncio.Event()
        self._client = build_client(
            **self._options,
            on_publish=lambda d: call_in_loop(loop, self._on_publish, d),
            on_success=lambda d: call_in_loop(loop, self._on_success, d),
            on_failure=lambda d: call_in_loop(loop, self._on_failure, d),
            on_disconnect=lambda d: call_in_loop(loop, self._on_disconnect, d),
            on_stopped=lambda d: call_in_loop(loop, self._on_stopped, d),
        )
        self._client.start()
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await asyncio.shield(self._first)
        except MqttConnectError:
            await self.disconnect()
            raise
        except TimeoutError:
            await self.disconnect()
            raise MqttConnectError(
                f"{self.client_id}: no connection within {self.connect_timeout:g}s "
                f"({self._last_failure})"
            ) from None

    async def disconnect(self) -> None:
        """
        Send DISCONNECT (keeping any session) and wait, up to ``stop_timeout``, for the stop.
        """
        client, self._client = self._client, None
        if client is None or self._stopped is None:
            return
        client.stop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.stop_timeout):
                await self._stopped.wait()
        self.connected = False

    def publish_nowait(
        self, topic: str, payload: bytes, *, qos: int = 1
    ) -> concurrent.futures.Future[mqtt5.PublishCompletionData]:
        """
        Queue a PUBLISH from any thread (QoS 1 waits offline for the next connection).

        Args:
            topic: Topic name.
            payload: Message bytes.
            qos: 0 or 1.

        Returns:
            A :mod:`concurrent.futures` future completed on a CRT thread with the PUBACK.

        Raises:
            MqttConnectError: The client is not started.
        """
        if self._client is None:
            raise MqttConnectError(f"{self.client_id}: not started")
        packet = mqtt5.PublishPacket(topic=topic, payload=payload, qos=mqtt5.QoS(qos), retain=False)
        future: concurrent.futures.Future[mqtt5.PublishCompletionData] = self._client.publish(
            packet
        )
        return future

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> int | None:
        """
        Publish and wait for the PUBACK.

        Args:
            topic: Topic name.
            payload: Message bytes.
            qos: 0 or 1.

        Returns:
            The PUBACK reason code (0 = success, 16 = no subscribers, 135 = not
            authorized), or ``None`` for QoS 0.
        """
        result = await asyncio.wrap_future(self.publish_nowait(topic, payload, qos=qos))
        if result.puback is None or result.puback.reason_code is None:
            return None
        return int(result.puback.reason_code)

    async def subscribe(self, topic: str, *, qos: int = 1) -> list[int]:
        """
        Subscribe to one topic filter and wait for the SUBACK.

        Args:
            topic: Topic filter.
            qos: Maximum QoS requested.

        Returns:
            The SUBACK reason codes (granted QoS, or >= 0x80 on failure, e.g. 135).

        Raises:
            MqttConnectError: The client is not started.
        """
        if self._client is None:
            raise MqttConnectError(f"{self.client_id}: not started")
        packet = mqtt5.SubscribePacket([mqtt5.Subscription(topic, mqtt5.QoS(qos))])
        suback = await asyncio.wrap_future(self._client.subscribe(packet))
        return [int(code) for code in suback.reason_codes]

    async def receive(self) -> Message:
        """
        Return the next received message (wrap in :func:`asyncio.timeout` to bound the wait).
        """
        return await self._queue.get()

    def pending(self) -> list[Message]:
        """
        Return and remove every message already received.
        """
        items: list[Message] = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    # -- CRT callbacks, run in the loop ---------------------------------------------------------

    def _on_publish(self, data: mqtt5.PublishReceivedData) -> None:
        packet = data.publish_packet
        message = Message(packet.topic, bytes(packet.payload or b""))
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            log.warning("mqtt_message_dropped", client_id=self.client_id, topic=message.topic)

    def _on_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        self.connected = True
        self.connections += 1
        if self._first is not None and not self._first.done():
            self._first.set_result(data.connack_packet)

    def _on_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        self._last_failure = _describe_failure(data)
        # The first attempt decides: a refused TLS handshake or CONNACK will not heal by
        # retrying. Once connected, drops are retried by the CRT.
        if self._first is not None and not self._first.done():
            self._first.set_exception(
                MqttConnectError(f"{self.client_id}: connection refused ({self._last_failure})")
            )

    def _on_disconnect(self, _data: mqtt5.LifecycleDisconnectData) -> None:
        self.connected = False

    def _on_stopped(self, _data: mqtt5.LifecycleStoppedData) -> None:
        self.connected = False
        if self._stopped is not None:
            self._stopped.set()
