"""
An asyncio MQTT5 client for the emulator's own service clients and the tests.

The emulator's publisher and its broker administration talk to the emulator's
Mosquitto through this client; tests use it to play devices. It is never on the
device's import path (the device's client is :mod:`agent.notify.mqtt_client`).
awscrt calls back on its own threads; every callback is handed to the event loop
with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Self

import structlog
from awscrt import mqtt5
from awsiot import mqtt5_client_builder

from agent.common.loop import call_in_loop
from agent.exceptions import AgentError


if TYPE_CHECKING:
    import concurrent.futures
    from collections.abc import Callable
    from pathlib import Path


__all__ = ["AsyncMqttClient", "MqttConnectError", "ReceivedPublish"]

log = structlog.get_logger(__name__)


class MqttConnectError(AgentError):
    """
    An MQTT client could not connect (TLS refused, CONNACK failure, timeout).
    """


@dataclass(frozen=True, slots=True)
class ReceivedPublish:
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
        Hide the payload: on the notify topic it holds an access token.
        """
        return f"ReceivedPublish(topic={self.topic!r}, payload=<{len(self.payload)} bytes>)"


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
        session_expiry: Seconds the broker keeps the session; 0 = clean session.
        min_reconnect_delay: First reconnect delay, seconds.
        max_reconnect_delay: Reconnect delay cap, seconds.
        queue_size: Capacity of the receive queue.
        validation: ``"aws"`` applies AWS IoT Core's client-side limits (a device's view);
            ``"none"`` for the emulator's own service clients.
        connect_timeout: Seconds :meth:`connect` waits for the first CONNACK.
        stop_timeout: Seconds :meth:`disconnect` waits for the client to stop.
    """

    def __init__(  # noqa: PLR0913 - one keyword per client option
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
        validation: Literal["aws", "none"] = "none",
        connect_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        """
        Store the options; nothing connects before :meth:`connect`.
        """
        behavior = (
            mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS
            if session_expiry
            else mqtt5.ClientSessionBehaviorType.CLEAN
        )
        self._options: dict[str, Any] = {
            "endpoint": endpoint,
            "port": port,
            "cert_filepath": str(cert),
            "pri_key_filepath": str(key),
            "ca_filepath": None if ca is None else str(ca),
            "client_id": client_id,
            "session_behavior": behavior,
            "session_expiry_interval_sec": session_expiry or None,
            "min_reconnect_delay_ms": max(1, int(min_reconnect_delay * 1000)),
            "max_reconnect_delay_ms": max(1, int(max_reconnect_delay * 1000)),
            "extended_validation_and_flow_control_options": (
                mqtt5.ExtendedValidationAndFlowControlOptions.AWS_IOT_CORE_DEFAULTS
                if validation == "aws"
                else mqtt5.ExtendedValidationAndFlowControlOptions.NONE
            ),
            "enable_metrics_collection": False,
        }
        self.client_id = client_id
        self.connect_timeout = connect_timeout
        self.stop_timeout = stop_timeout
        self._queue: asyncio.Queue[ReceivedPublish] = asyncio.Queue(maxsize=queue_size)
        self._client: mqtt5.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first: asyncio.Future[mqtt5.ConnackPacket] | None = None
        self._stopped: asyncio.Event | None = None
        self._last_failure = "no attempt yet"
        self.connected = False
        self.connections = 0
        self._tracked: set[concurrent.futures.Future[mqtt5.PublishCompletionData]] = set()

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
        self._client = mqtt5_client_builder.mtls_from_path(
            **self._options,
            on_publish_received=lambda d: call_in_loop(loop, self._on_publish, d),
            on_lifecycle_connection_success=lambda d: call_in_loop(loop, self._on_success, d),
            on_lifecycle_connection_failure=lambda d: call_in_loop(loop, self._on_failure, d),
            on_lifecycle_disconnection=lambda d: call_in_loop(loop, self._on_disconnect, d),
            on_lifecycle_stopped=lambda d: call_in_loop(loop, self._on_stopped, d),
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
            payload: ReceivedPublish bytes.
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

    def publish_tracked(
        self,
        topic: str,
        payload: bytes,
        on_done: Callable[[int | None, BaseException | None], None],
    ) -> None:
        """
        Queue a QoS 1 PUBLISH from any thread; :meth:`flush` waits for it.

        Args:
            topic: Topic name.
            payload: Message bytes.
            on_done: Called in the loop with the PUBACK reason code (0: delivered,
                16: no subscriber) or the exception, once acknowledged or failed.

        Raises:
            MqttConnectError: The client is not started.
        """
        future = self.publish_nowait(topic, payload)
        loop = self._loop
        assert loop is not None  # noqa: S101 - publish_nowait raised if never started
        self._tracked.add(future)

        def done(future: concurrent.futures.Future[mqtt5.PublishCompletionData]) -> None:
            self._tracked.discard(future)
            exc = future.exception()
            puback = None if exc is not None else future.result().puback
            code = None if puback is None or puback.reason_code is None else int(puback.reason_code)
            on_done(code, exc)

        future.add_done_callback(lambda f: call_in_loop(loop, done, f))

    async def flush(self) -> None:
        """
        Wait until every :meth:`publish_tracked` message is acknowledged or has failed.
        """
        while self._tracked:
            futures = [asyncio.wrap_future(f) for f in list(self._tracked)]
            await asyncio.gather(*futures, return_exceptions=True)
            # Done callbacks reach the loop through call_soon: let them run.
            await asyncio.sleep(0)

    async def finish(self, grace: float = 2.0) -> int:
        """
        Wait up to ``grace`` seconds for tracked PUBACKs, then disconnect.

        Returns:
            How many tracked messages were still unacknowledged.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.flush()
        left = len(self._tracked)
        await self.disconnect()
        return left

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1) -> int | None:
        """
        Publish and wait for the PUBACK.

        Args:
            topic: Topic name.
            payload: ReceivedPublish bytes.
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

    async def receive(self) -> ReceivedPublish:
        """
        Return the next received message (wrap in :func:`asyncio.timeout` to bound the wait).
        """
        return await self._queue.get()

    def pending(self) -> list[ReceivedPublish]:
        """
        Return and remove every message already received.
        """
        items: list[ReceivedPublish] = []
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        return items

    # -- CRT callbacks, run in the loop ---------------------------------------------------------

    def _on_publish(self, data: mqtt5.PublishReceivedData) -> None:
        packet = data.publish_packet
        message = ReceivedPublish(packet.topic, bytes(packet.payload or b""))
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
