"""
The emulator's tunnel-notification publisher: AWS IoT's side of docs/protocol.md §17.

It listens to the :class:`TunnelStore` and, when a destination access token is
minted for a thing, publishes to ``$aws/things/<thing>/tunnels/notify``:

* on "opened" when the tunnel has ``destinationConfig.thingName``;
* on "rotated" when the rotated modes include "destination" and the request
  carried a ``destinationConfig`` with a thing name (docs/protocol.md §15.5).

QoS 1, retain false (a choice, docs/protocol.md §17.3), through one awscrt MQTT5 client holding the
privileged certificate. Store listeners run synchronously inside the API call, so
the publish is only queued there; the PUBACK is logged later. The token travels
in the payload only: it is never logged.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Self

import structlog

from agent.emulator.broker import notify_topic
from agent.emulator.mqtt_client import AsyncMqttClient
from agent.emulator.pki import PRIVILEGED_IDENTITY


if TYPE_CHECKING:
    from pathlib import Path

    from agent.emulator.pki import KeyPair
    from agent.emulator.store import StoreEvent, Tunnel, TunnelStore


__all__ = ["Notifier", "notification_payload"]

log = structlog.get_logger(__name__)


def notification_payload(tunnel: Tunnel) -> bytes:
    """
    Build the notify payload of docs/protocol.md §17.2 for a tunnel's current destination token.

    Args:
        tunnel: The tunnel; its destination token, region and services are used.

    Returns:
        Compact UTF-8 JSON, members in the documented order, ``clientMode`` lowercase.
    """
    body = {
        "clientAccessToken": tunnel.destination.token,
        "clientMode": "destination",
        "region": tunnel.region,
        "services": list(tunnel.services),
    }
    return json.dumps(body, separators=(",", ":")).encode()


class Notifier:
    """
    Publish tunnel notifications for store events.

    Args:
        store: The tunnel store to listen to.
        host: Broker host.
        port: Broker port.
        identity: The privileged client certificate and key.
        ca_file: The emulator CA (the broker's trust anchor).
        client_id: MQTT client id.
    """

    def __init__(  # noqa: PLR0913 - keyword-only connection settings
        self,
        store: TunnelStore,
        *,
        host: str,
        port: int,
        identity: KeyPair,
        ca_file: Path,
        client_id: str = PRIVILEGED_IDENTITY,
    ) -> None:
        """
        Remember the settings; nothing connects before :meth:`start`.
        """
        self.store = store
        self._client = AsyncMqttClient(
            endpoint=host,
            port=port,
            cert=identity.cert,
            key=identity.key,
            ca=ca_file,
            client_id=client_id,
            # The emulator is the service side: AWS IoT's client-side limits do not apply.
            validation="none",
        )
        self._loop: asyncio.AbstractEventLoop | None = None
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
        Connect to the broker and start listening to the store.

        Raises:
            MqttConnectError: The broker refused or did not answer.
        """
        self._loop = asyncio.get_running_loop()
        await self._client.connect()
        self.store.listeners.append(self._on_store_event)
        log.info("notifier_started", client_id=self._client.client_id)

    async def stop(self) -> None:
        """
        Stop listening, wait briefly for outstanding PUBACKs, and disconnect.
        """
        if self._on_store_event in self.store.listeners:
            self.store.listeners.remove(self._on_store_event)
        if left := await self._client.finish():
            log.warning("notifier_unacknowledged", count=left)

    async def flush(self) -> None:
        """
        Wait until every queued notification is acknowledged or has failed.
        """
        await self._client.flush()

    def notify(self, tunnel: Tunnel) -> None:
        """
        Queue the notification of ``tunnel`` for its thing (any thread).

        Args:
            tunnel: A tunnel with a thing name.
        """
        if tunnel.thing_name is None or self._loop is None:
            return
        tunnel_id, thing_name = tunnel.tunnel_id, tunnel.thing_name
        self._client.publish_tracked(
            notify_topic(thing_name),
            notification_payload(tunnel),
            lambda code, exc: self._on_done(code, exc, tunnel_id, thing_name),
        )

    def _on_store_event(self, event: StoreEvent) -> None:
        tunnel = event.tunnel
        if tunnel.thing_name is None or tunnel.status != "OPEN":
            return
        due = event.kind == "opened" or (
            event.kind == "rotated" and "destination" in event.modes and event.destination_config
        )
        if due:
            self.notify(tunnel)

    def _on_done(
        self, code: int | None, exc: BaseException | None, tunnel_id: str, thing_name: str
    ) -> None:
        # 0 = delivered to a subscriber, 16 = accepted with no subscriber (queued sessions
        # count as subscribers); anything else is a failure.
        if exc is None and code in (0, 16):
            self.published += 1
            log.info(
                "notification_published",
                tunnel_id=tunnel_id,
                thing_name=thing_name,
                subscribers=code == 0,
            )
            return
        self.failed += 1
        log.warning(
            "notification_failed",
            tunnel_id=tunnel_id,
            thing_name=thing_name,
            reason_code=code,
            error=None if exc is None else type(exc).__name__,
        )
