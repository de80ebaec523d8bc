"""
The Device Shadow service on MQTT: AWS IoT's side of the reserved shadow topics.

One awscrt MQTT5 client with the privileged certificate subscribes to every thing's request
topics (``$aws/things/+/shadow[/name/+]/update|get|delete``); the broker's ACL already limits
each thing to its own. A request is answered on ``.../accepted`` or ``.../rejected``. Accepted
changes, whether they came over MQTT or through the iot-data HTTP API, reach this service as
:class:`~agent.emulator.shadows.ShadowEvent` s and are published on ``/update/accepted``,
``/update/documents`` and ``/update/delta`` (or ``/delete/accepted``), in that order on one
connection. Requests are handled one at a time on the event loop, so documents are never
interleaved. Payloads are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from typing import TYPE_CHECKING, Self

import structlog

from agent.emulator.broker import SHADOW_REQUEST_TOPICS
from agent.emulator.mqtt_client import AsyncMqttClient, MqttConnectError
from agent.emulator.pki import PRIVILEGED_IDENTITY
from agent.emulator.shadows import ShadowRejected, request_client_token


if TYPE_CHECKING:
    from pathlib import Path

    from agent.emulator.mqtt_client import ReceivedPublish
    from agent.emulator.pki import KeyPair
    from agent.emulator.shadows import JsonObject, ShadowEvent, ShadowStore


__all__ = ["ShadowService", "parse_request_topic", "shadow_topic"]

log = structlog.get_logger(__name__)

_REQUEST_RE = re.compile(
    r"\$aws/things/(?P<thing>[^/]+)/shadow(?:/name/(?P<name>[^/]+))?/(?P<op>update|get|delete)"
)


def shadow_topic(thing: str, name: str | None, suffix: str) -> str:
    """
    Return a shadow topic: ``$aws/things/<thing>/shadow[/name/<name>]/<suffix>``.
    """
    infix = "" if name is None else f"/name/{name}"
    return f"$aws/things/{thing}/shadow{infix}/{suffix}"


def parse_request_topic(topic: str) -> tuple[str, str | None, str] | None:
    """
    Split a request topic into ``(thing, name, operation)``; None for any other topic.
    """
    match = _REQUEST_RE.fullmatch(topic)
    return None if match is None else (match["thing"], match["name"], match["op"])


def _encode(document: JsonObject) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


class ShadowService:
    """
    Answer shadow requests and publish shadow changes on the emulator's broker.

    Args:
        shadows: The shadow store.
        host: Broker host.
        port: Broker port.
        identity: The privileged client certificate and key.
        ca_file: The emulator CA (the broker's trust anchor).
        client_id: MQTT client id (the notifier uses the bare privileged identity).
    """

    def __init__(  # noqa: PLR0913 - keyword-only connection settings
        self,
        shadows: ShadowStore,
        *,
        host: str,
        port: int,
        identity: KeyPair,
        ca_file: Path,
        client_id: str = f"{PRIVILEGED_IDENTITY}-shadows",
    ) -> None:
        """
        Remember the settings; nothing connects before :meth:`start`.
        """
        self.shadows = shadows
        self._client = AsyncMqttClient(
            endpoint=host,
            port=port,
            cert=identity.cert,
            key=identity.key,
            ca=ca_file,
            client_id=client_id,
            # The service side: AWS IoT's client-side limits do not apply.
            validation="none",
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task[None] | None = None
        self.handled = 0
        self.published = 0
        self.failed = 0

    async def __aenter__(self) -> Self:
        """
        Start; see :meth:`start`.
        """
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """
        Stop; see :meth:`stop`.
        """
        await self.stop()

    async def start(self) -> None:
        """
        Connect, subscribe to every request topic and start answering.

        Raises:
            MqttConnectError: The broker refused the connection or a subscription.
        """
        self._loop = asyncio.get_running_loop()
        await self._client.connect()
        try:
            refused = {t: c for t in SHADOW_REQUEST_TOPICS if (c := await self._subscribe(t))}
        except BaseException:
            await self._client.disconnect()
            raise
        if refused:
            await self._client.disconnect()
            raise MqttConnectError(f"shadow request topics refused: {refused}")
        self.shadows.listeners.append(self._on_event)
        self._reader = asyncio.create_task(self._read(), name="shadow-requests")
        log.info("shadow_service_started", client_id=self._client.client_id)

    async def stop(self) -> None:
        """
        Stop answering, wait briefly for outstanding PUBACKs, and disconnect.
        """
        if self._on_event in self.shadows.listeners:
            self.shadows.listeners.remove(self._on_event)
        if self._reader is not None:
            task, self._reader = self._reader, None
            task.cancel("shadow service stopping")
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if left := await self._client.finish():
            log.warning("shadow_unacknowledged", count=left)

    async def flush(self) -> None:
        """
        Wait until every queued response is acknowledged or has failed.
        """
        await self._client.flush()

    def handle(self, topic: str, payload: bytes) -> None:
        """
        Answer one request PUBLISH (an unknown topic is ignored).

        Args:
            topic: The request topic.
            payload: The request document.
        """
        parsed = parse_request_topic(topic)
        if parsed is None:
            log.warning("shadow_unexpected_topic", topic=topic)
            return
        thing, name, operation = parsed
        self.handled += 1
        token = None if operation == "update" else request_client_token(payload)
        try:
            if operation == "update":
                # Accepted updates are published by _on_event, for HTTP ones too.
                self.shadows.update(thing, name, payload)
            elif operation == "delete":
                self.shadows.delete(thing, name, client_token=token)
            else:
                document = self.shadows.get(thing, name, client_token=token)
                self._publish(shadow_topic(thing, name, "get/accepted"), document)
        except ShadowRejected as exc:
            log.info(
                "shadow_request_rejected",
                thing_name=thing,
                shadow=name,
                operation=operation,
                code=exc.status,
            )
            document = exc.document(int(self.shadows.clock()))
            self._publish(shadow_topic(thing, name, f"{operation}/rejected"), document)

    # -- internals -----------------------------------------------------------------------------

    async def _subscribe(self, topic: str) -> list[int]:
        """
        Subscribe to ``topic``; return the SUBACK codes when refused, [] when granted.
        """
        codes = await self._client.subscribe(topic)
        return [] if codes == [1] else codes

    async def _read(self) -> None:
        while True:
            message: ReceivedPublish = await self._client.receive()
            try:
                self.handle(message.topic, message.payload)
            except Exception:
                # Our bug: keep serving the other requests.
                log.exception("shadow_request_failed", topic=message.topic)

    def _on_event(self, event: ShadowEvent) -> None:
        if event.kind == "deleted":
            self._publish(shadow_topic(event.thing, event.name, "delete/accepted"), event.accepted)
            return
        self._publish(shadow_topic(event.thing, event.name, "update/accepted"), event.accepted)
        if event.documents is not None:
            topic = shadow_topic(event.thing, event.name, "update/documents")
            self._publish(topic, event.documents)
        if event.delta is not None:
            self._publish(shadow_topic(event.thing, event.name, "update/delta"), event.delta)

    def _publish(self, topic: str, document: JsonObject) -> None:
        if self._loop is None:
            return
        try:
            self._client.publish_tracked(
                topic, _encode(document), lambda code, exc: self._on_done(code, exc, topic)
            )
        except MqttConnectError:
            self.failed += 1
            log.warning("shadow_publish_failed", topic=topic, error="not connected")

    def _on_done(self, code: int | None, exc: BaseException | None, topic: str) -> None:
        # 0: delivered to a subscriber; 16: nobody subscribed, which is normal for responses.
        if exc is None and code in (0, 16):
            self.published += 1
            return
        self.failed += 1
        log.warning(
            "shadow_publish_failed",
            topic=topic,
            reason_code=code,
            error=None if exc is None else type(exc).__name__,
        )
