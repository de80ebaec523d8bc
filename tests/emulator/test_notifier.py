"""Tests for the tunnel-notification publisher (agent/emulator/notifier.py)."""

from __future__ import annotations

import asyncio
import json

import pytest
from structlog.testing import capture_logs

from agent.emulator.broker import notify_topic
from agent.emulator.notifier import Notifier, notification_payload
from agent.emulator.store import TunnelStore
from tests.emulator import fixtures
from tests.emulator.fixtures import SCALE, mqtt_client


broker = fixtures.broker
mqtt_pki = fixtures.mqtt_pki


@pytest.fixture
async def store_and_notifier(broker, mqtt_pki):
    store = TunnelStore(region="eu-west-1")
    notifier = Notifier(
        store, host=broker.host, port=broker.port, identity=mqtt_pki.admin, ca_file=mqtt_pki.ca_file
    )
    await notifier.start()
    try:
        yield store, notifier
    finally:
        await notifier.stop()


@pytest.fixture
async def thing1(broker, mqtt_pki):
    client = mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing1"), "thing1")
    async with client:
        await client.subscribe(notify_topic("thing1"))
        yield client


async def _next(client):
    async with asyncio.timeout(5 * SCALE):
        return await client.receive()


async def _quiet(client, notifier):
    await notifier.flush()
    await asyncio.sleep(0.2 * SCALE)
    return client.pending()


class TestPayload:
    def test_exact_bytes(self):
        """The payload is compact JSON in the documented order with a lowercase clientMode."""
        store = TunnelStore(region="us-east-1")
        tunnel = store.open_tunnel(thing_name="dev1", services=["SSH", "HTTP"])

        payload = notification_payload(tunnel)

        assert payload == (
            b'{"clientAccessToken":"' + tunnel.destination.token.encode() + b'",'
            b'"clientMode":"destination","region":"us-east-1","services":["SSH","HTTP"]}'
        )


class TestPublish:
    async def test_open_tunnel_notifies_thing(self, store_and_notifier, thing1):
        """OpenTunnel with thingName publishes the destination token to that thing at QoS 1."""
        store, notifier = store_and_notifier

        tunnel = store.open_tunnel(thing_name="thing1", services=["SSH"])
        message = await _next(thing1)
        await notifier.flush()

        assert message.topic == "$aws/things/thing1/tunnels/notify"
        assert json.loads(message.payload) == {
            "clientAccessToken": tunnel.destination.token,
            "clientMode": "destination",
            "region": "eu-west-1",
            "services": ["SSH"],
        }
        assert message.payload == notification_payload(tunnel)
        assert (notifier.published, notifier.failed) == (1, 0)

    async def test_rotate_destination_notifies_new_token(self, store_and_notifier, thing1):
        """Rotate DESTINATION with destinationConfig publishes the new destination token."""
        store, _ = store_and_notifier
        tunnel = store.open_tunnel(thing_name="thing1", services=["SSH"])
        first = await _next(thing1)

        store.rotate(
            tunnel.tunnel_id, ["source", "destination"], thing_name="thing1", services=["VNC"]
        )
        second = await _next(thing1)

        assert json.loads(first.payload)["clientAccessToken"] != tunnel.destination.token
        assert json.loads(second.payload) == {
            "clientAccessToken": tunnel.destination.token,
            "clientMode": "destination",
            "region": "eu-west-1",
            "services": ["VNC"],
        }

    @pytest.mark.parametrize("modes", [["source"], ["destination"], ["source", "destination"]])
    async def test_rotate_without_config_is_silent(self, store_and_notifier, thing1, modes):
        """Rotation without a destinationConfig (or of the source only) publishes nothing."""
        store, notifier = store_and_notifier
        tunnel = store.open_tunnel(thing_name="thing1", services=["SSH"])
        await _next(thing1)

        store.rotate(tunnel.tunnel_id, modes)
        extra = await _quiet(thing1, notifier)

        assert extra == []
        assert notifier.published == 1

    async def test_no_thing_no_publish(self, store_and_notifier, thing1):
        """A tunnel without destinationConfig.thingName is not announced on MQTT."""
        store, notifier = store_and_notifier

        store.open_tunnel(services=["SSH"])
        store.open_tunnel()
        extra = await _quiet(thing1, notifier)

        assert extra == []
        assert notifier.published == 0

    async def test_only_the_named_thing(self, store_and_notifier, broker, mqtt_pki, thing1):
        """thing2's notification reaches thing2 and not thing1."""
        store, notifier = store_and_notifier
        async with mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing2"), "thing2") as thing2:
            await thing2.subscribe(notify_topic("thing2"))

            tunnel = store.open_tunnel(thing_name="thing2", services=["SSH"])
            message = await _next(thing2)
        leaked = await _quiet(thing1, notifier)

        assert json.loads(message.payload)["clientAccessToken"] == tunnel.destination.token
        assert leaked == []

    async def test_token_never_logged(self, store_and_notifier, thing1):
        """Publishing logs the tunnel and thing but never the access token."""
        store, notifier = store_and_notifier

        with capture_logs() as logs:
            tunnel = store.open_tunnel(thing_name="thing1", services=["SSH"])
            await _next(thing1)
            await notifier.flush()

        published = [e for e in logs if e["event"] == "notification_published"]
        assert published == [
            {
                "event": "notification_published",
                "log_level": "info",
                "tunnel_id": tunnel.tunnel_id,
                "thing_name": "thing1",
                "subscribers": True,
            }
        ]
        assert tunnel.destination.token not in repr(logs)

    async def test_queued_while_broker_restarts(self, store_and_notifier, broker, mqtt_pki):
        """A notification issued while the broker is down is delivered after it returns."""
        store, notifier = store_and_notifier
        pair = mqtt_pki.thing("thing1")
        async with mqtt_client(mqtt_pki, broker.port, pair, "thing1", session_expiry=3600) as c:
            await c.subscribe(notify_topic("thing1"))
        await broker.stop()

        tunnel = store.open_tunnel(thing_name="thing1", services=["SSH"])
        await broker.start()
        async with asyncio.timeout(10 * SCALE):
            await notifier.flush()
        async with mqtt_client(mqtt_pki, broker.port, pair, "thing1", session_expiry=3600) as c:
            message = await _next(c)

        assert json.loads(message.payload)["clientAccessToken"] == tunnel.destination.token
        assert notifier.published == 1

    async def test_stop_unsubscribes_from_store(self, broker, mqtt_pki):
        """After stop() the notifier no longer listens to the store."""
        store = TunnelStore()
        notifier = Notifier(
            store,
            host=broker.host,
            port=broker.port,
            identity=mqtt_pki.admin,
            ca_file=mqtt_pki.ca_file,
        )
        await notifier.start()
        listening = len(store.listeners)
        await notifier.stop()

        assert listening == 1
        assert store.listeners == []
