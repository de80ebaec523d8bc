"""Tests for the shadow topics (agent/emulator/shadow_mqtt.py) on a real mosquitto with its ACL."""

from __future__ import annotations

import asyncio
import json

import pytest
from structlog.testing import capture_logs

from agent.emulator.mqtt_client import MqttConnectError
from agent.emulator.shadow_mqtt import ShadowService, parse_request_topic, shadow_topic
from agent.emulator.shadows import ShadowStore
from tests.emulator import fixtures
from tests.emulator.fixtures import SCALE, mqtt_client


broker = fixtures.broker
mqtt_pki = fixtures.mqtt_pki

GRANTED_QOS_1 = 1
NOT_AUTHORIZED = 135
PREFIX = "$aws/things/thing1/shadow/name/tunnel-agent"
RESPONSES = [
    "update/accepted",
    "update/rejected",
    "update/documents",
    "update/delta",
    "get/accepted",
    "get/rejected",
    "delete/accepted",
    "delete/rejected",
]


@pytest.fixture
async def service(broker, mqtt_pki):
    instance = ShadowService(
        ShadowStore(),
        host=broker.host,
        port=broker.port,
        identity=mqtt_pki.admin,
        ca_file=mqtt_pki.ca_file,
    )
    async with instance:
        yield instance


@pytest.fixture
async def thing1(broker, mqtt_pki, service):  # noqa: ARG001 - serving before requests
    """thing1, subscribed to every response topic of its shadow "tunnel-agent"."""
    client = mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing1"), "thing1")
    async with client:
        for suffix in RESPONSES:
            assert await client.subscribe(f"{PREFIX}/{suffix}") == [GRANTED_QOS_1]
        yield client


async def _next(client):
    async with asyncio.timeout(5 * SCALE):
        message = await client.receive()
    return message.topic.removeprefix(PREFIX + "/"), json.loads(message.payload)


async def _quiet(client, service):
    await service.flush()
    await asyncio.sleep(0.2 * SCALE)
    return client.pending()


def _doc(value) -> bytes:
    return json.dumps(value).encode()


class TestTopics:
    def test_request_topics(self):
        """Named and classic request topics split into thing, name and operation; others don't."""
        assert parse_request_topic(f"{PREFIX}/update") == ("thing1", "tunnel-agent", "update")
        assert parse_request_topic("$aws/things/t/shadow/get") == ("t", None, "get")
        assert parse_request_topic(f"{PREFIX}/update/accepted") is None
        assert parse_request_topic("$aws/things/t/shadow/name/a/b/delete") is None
        assert shadow_topic("t", None, "get/accepted") == "$aws/things/t/shadow/get/accepted"


class TestRequests:
    async def test_update(self, thing1, service):
        """An update gets accepted, documents and delta, in that order, with the client token."""
        request = {"state": {"desired": {"a": 2}, "reported": {"a": 1}}, "clientToken": "u1"}

        puback = await thing1.publish(f"{PREFIX}/update", _doc(request))
        messages = [await _next(thing1) for _ in range(3)]
        extra = await _quiet(thing1, service)
        stored = service.shadows.shadow("thing1", "tunnel-agent")

        assert puback == 0
        assert [topic for topic, _ in messages] == [
            "update/accepted",
            "update/documents",
            "update/delta",
        ]
        accepted, documents, delta = (doc for _, doc in messages)
        assert accepted["state"] == request["state"]
        assert (accepted["version"], accepted["clientToken"]) == (1, "u1")
        assert documents["previous"] is None
        assert documents["current"]["state"] == request["state"]
        assert (delta["state"], delta["version"], delta["clientToken"]) == ({"a": 2}, 1, "u1")
        assert extra == []
        assert stored is not None
        assert (stored.desired, stored.reported, stored.version) == ({"a": 2}, {"a": 1}, 1)

    async def test_get(self, thing1, service):
        """A get answers the whole document with its delta and the request's client token."""
        service.shadows.update("thing1", "tunnel-agent", _doc({"state": {"desired": {"x": 1}}}))
        await _next(thing1), await _next(thing1), await _next(thing1)

        await thing1.publish(f"{PREFIX}/get", _doc({"clientToken": "g1"}))
        topic, document = await _next(thing1)

        assert topic == "get/accepted"
        assert document["state"] == {"desired": {"x": 1}, "delta": {"x": 1}}
        assert (document["version"], document["clientToken"]) == (1, "g1")
        assert isinstance(document["timestamp"], int)

    async def test_get_missing(self, thing1):
        """A get of a shadow that does not exist is rejected with 404 and the client token."""
        await thing1.publish(f"{PREFIX}/get", _doc({"clientToken": "g2"}))
        topic, document = await _next(thing1)

        assert topic == "get/rejected"
        assert document["code"] == 404
        assert document["message"] == "No shadow exists with name: 'thing1~tunnel-agent'"
        assert document["clientToken"] == "g2"

    async def test_delete(self, thing1, service):
        """A delete (empty payload) is accepted with its version; the shadow is then gone."""
        await thing1.publish(f"{PREFIX}/update", _doc({"state": {"reported": {"a": 1}}}))
        await _next(thing1), await _next(thing1)

        await thing1.publish(f"{PREFIX}/delete", b"")
        deleted = await _next(thing1)
        await thing1.publish(f"{PREFIX}/get", b"")
        after = await _next(thing1)

        assert deleted[0] == "delete/accepted"
        assert deleted[1]["version"] == 1
        assert "clientToken" not in deleted[1]
        assert (after[0], after[1]["code"]) == ("get/rejected", 404)
        assert service.shadows.list_named("thing1") == []

    @pytest.mark.parametrize(
        ("payload", "code", "message", "token"),
        [
            (b"{oops", 400, "Invalid JSON", None),
            (
                b'{"state": {"desired": {"a": 1}}, "version": 7, "clientToken": "v"}',
                409,
                "Version conflict",
                "v",
            ),
            (b'{"clientToken": "m"}', 400, "Missing required node: state", "m"),
        ],
    )
    async def test_update_rejected(self, thing1, service, payload, code, message, token):
        """A refused update gets an error document on update/rejected and changes nothing."""
        await thing1.publish(f"{PREFIX}/update", payload)
        topic, document = await _next(thing1)
        extra = await _quiet(thing1, service)

        assert topic == "update/rejected"
        assert (document["code"], document["message"]) == (code, message)
        assert document.get("clientToken") == token
        assert extra == []
        assert service.shadows.shadow("thing1", "tunnel-agent") is None

    async def test_version_sequence(self, thing1, service):
        """Versions grow by one per update, and the expected version guards the next one."""
        for version in (None, 1, 2):
            request = {"state": {"reported": {"n": version}}}
            if version is not None:
                request["version"] = version
            await thing1.publish(f"{PREFIX}/update", _doc(request))
        accepted = [
            doc["version"]
            for topic, doc in [await _next(thing1) for _ in range(6)]
            if topic == "update/accepted"
        ]

        assert accepted == [1, 2, 3]

    async def test_classic_shadow(self, broker, mqtt_pki, service):
        """The classic shadow's topics work the same way, without /name/<name>."""
        client = mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing2"), "thing2")
        async with client:
            await client.subscribe("$aws/things/thing2/shadow/update/accepted")
            await client.publish("$aws/things/thing2/shadow/update", _doc({"state": {}}))
            async with asyncio.timeout(5 * SCALE):
                message = await client.receive()

        assert message.topic == "$aws/things/thing2/shadow/update/accepted"
        assert json.loads(message.payload)["version"] == 1
        assert service.shadows.shadow("thing2", None) is not None

    async def test_store_changes_published(self, thing1, service):
        """A change made directly in the store (as the HTTP API does) is published as well."""
        service.shadows.update("thing1", "tunnel-agent", _doc({"state": {"reported": {"r": 1}}}))
        service.shadows.delete("thing1", "tunnel-agent")

        topics = [(await _next(thing1))[0] for _ in range(3)]

        assert topics == ["update/accepted", "update/documents", "delete/accepted"]

    async def test_unexpected_topic(self, service):
        """A PUBLISH on a topic that is not a request is logged and ignored."""
        with capture_logs() as logs:
            service.handle("$aws/things/thing1/shadow/name/x/update/accepted", b"{}")

        assert service.handled == 0
        assert [entry["event"] for entry in logs] == ["shadow_unexpected_topic"]


class TestAcl:
    @pytest.mark.parametrize(
        "topic_filter",
        [
            f"{PREFIX}/update/accepted",
            f"{PREFIX}/update/delta",
            "$aws/things/thing1/shadow/#",
            "$aws/things/thing1/shadow/get/accepted",
            "$aws/things/+/shadow/name/tunnel-agent/update/delta",
            "$aws/things/+/shadow/#",
        ],
    )
    async def test_other_thing_cannot_subscribe(self, broker, mqtt_pki, topic_filter):
        """thing2 gets SUBACK 0x87 for any filter reaching thing1's shadow topics."""
        client = mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing2"), "thing2")
        async with client:
            codes = await client.subscribe(topic_filter)

        assert codes == [NOT_AUTHORIZED]

    @pytest.mark.parametrize(
        "topic_filter",
        [
            f"{PREFIX}/update/accepted",
            "$aws/things/thing1/shadow/name/+/update/delta",
            f"{PREFIX}/#",
        ],
    )
    async def test_own_topics_subscribable(self, broker, mqtt_pki, topic_filter):
        """A thing may subscribe to its own shadow responses, with wildcards below its prefix."""
        client = mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing1"), "thing1")
        async with client:
            codes = await client.subscribe(topic_filter)

        assert codes == [GRANTED_QOS_1]

    @pytest.mark.parametrize("operation", ["update", "get", "delete"])
    async def test_other_thing_cannot_publish(self, broker, mqtt_pki, thing1, service, operation):
        """thing2's request on thing1's shadow is refused (PUBACK 0x87) and never served."""
        service.shadows.update("thing1", "tunnel-agent", _doc({"state": {"reported": {"a": 1}}}))
        await _next(thing1), await _next(thing1)
        attacker = mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing2"), "thing2")
        async with attacker:
            puback = await attacker.publish(
                f"{PREFIX}/{operation}", _doc({"state": {"reported": {"a": 666}}})
            )
        extra = await _quiet(thing1, service)
        stored = service.shadows.shadow("thing1", "tunnel-agent")

        assert puback == NOT_AUTHORIZED
        assert extra == []
        assert service.handled == 0
        assert stored is not None
        assert (stored.reported, stored.version) == ({"a": 1}, 1)

    @pytest.mark.parametrize(
        "topic",
        [
            f"{PREFIX}/update/accepted",
            f"{PREFIX}/update/delta",
            "$aws/things/thing1/shadow/get/accepted",
        ],
    )
    async def test_thing_cannot_forge_responses(self, broker, mqtt_pki, thing1, topic):
        """Only the service publishes responses: a thing's PUBLISH there is refused and dropped."""
        puback = await thing1.publish(topic, b'{"state": {"forged": true}}')
        await asyncio.sleep(0.2 * SCALE)

        assert puback == NOT_AUTHORIZED
        assert thing1.pending() == []


class TestLifecycle:
    async def test_needs_privileged_identity(self, broker, mqtt_pki):
        """With a thing's certificate the request subscriptions are refused and start fails."""
        instance = ShadowService(
            ShadowStore(),
            host=broker.host,
            port=broker.port,
            identity=mqtt_pki.thing("thing1"),
            ca_file=mqtt_pki.ca_file,
        )

        with pytest.raises(MqttConnectError, match="refused"):
            await instance.start()

        assert instance.shadows.listeners == []

    async def test_stop_stops_publishing(self, broker, mqtt_pki):
        """After stop, store changes are no longer published and the listener is gone."""
        shadows = ShadowStore()
        instance = ShadowService(
            shadows,
            host=broker.host,
            port=broker.port,
            identity=mqtt_pki.admin,
            ca_file=mqtt_pki.ca_file,
        )
        await instance.start()
        listening = list(shadows.listeners)
        await instance.stop()
        shadows.update("thing1", "x", b'{"state": {}}')

        assert listening == [instance._on_event]
        assert shadows.listeners == []
        assert instance.published == 0
