"""
The README's device IoT policy against the emulator's broker rules.

The policy is read from the README's ``json`` block and evaluated as AWS IoT does for the
parts it uses (``Allow`` statements, ``${iot:Connection.Thing.ThingName}``, ``*`` and ``?``
in resources, ``topicfilter/`` matched against the filter string itself). The broker rules
are the emulator's dynamic-security role of a thing, evaluated as Mosquitto does, and then
asked of a real Mosquitto. Both must allow what the agent does and refuse another thing.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import re
from pathlib import Path

import pytest

from agent.emulator.broker import _thing_role, notify_topic
from tests.emulator import fixtures
from tests.emulator.fixtures import SCALE, mqtt_client


broker = fixtures.broker
mqtt_pki = fixtures.mqtt_pki

README = Path(__file__).parent.parent.parent / "README.md"
ARN = "arn:aws:iot:REGION:ACCOUNT:"
GRANTED_QOS_1, NOT_AUTHORIZED = 1, 135

THING, OTHER = "thing1", "thing2"
SHADOW = f"$aws/things/{THING}/shadow/name/tunnel-agent"
# What the agent does on AWS IoT Core: (policy action, topic or filter).
AGENT_NEEDS = [
    ("iot:Subscribe", notify_topic(THING)),
    ("iot:Receive", notify_topic(THING)),
    ("iot:Publish", f"{SHADOW}/update"),
    ("iot:Publish", f"{SHADOW}/get"),
    ("iot:Subscribe", f"{SHADOW}/update/accepted"),
    ("iot:Subscribe", f"{SHADOW}/update/rejected"),
    ("iot:Subscribe", f"{SHADOW}/get/accepted"),
    ("iot:Subscribe", f"{SHADOW}/update/delta"),
    ("iot:Receive", f"{SHADOW}/update/accepted"),
    ("iot:Receive", f"{SHADOW}/get/rejected"),
]
# What neither may allow: another thing, wildcards over things, the policy's other shadows.
REFUSED = [
    ("iot:Subscribe", notify_topic(OTHER)),
    ("iot:Receive", notify_topic(OTHER)),
    ("iot:Subscribe", "$aws/things/+/tunnels/notify"),
    ("iot:Subscribe", "#"),
    ("iot:Publish", notify_topic(THING)),
    ("iot:Publish", f"$aws/things/{OTHER}/shadow/name/tunnel-agent/update"),
    ("iot:Subscribe", f"$aws/things/{OTHER}/shadow/name/tunnel-agent/update/accepted"),
]


def readme_policy() -> dict:
    """The JSON block of the README's "Device IoT policy" section."""
    section = README.read_text().split("### Device IoT policy", 1)[1]
    block = re.search(r"```json\n(.*?)\n```", section, re.DOTALL)
    assert block, "no ```json block under ### Device IoT policy"
    return json.loads(block.group(1))


def policy_allows(policy: dict, action: str, resource: str, thing: str) -> bool:
    """AWS IoT's evaluation of Allow statements, with the thing's policy variable."""
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"  # a Deny would need the full evaluation order
        actions = statement["Action"]
        if action not in ([actions] if isinstance(actions, str) else actions):
            continue
        resources = statement["Resource"]
        for written in [resources] if isinstance(resources, str) else resources:
            pattern = written.replace("${iot:Connection.Thing.ThingName}", thing)
            # IoT policy wildcards are * and ?; [ has no special meaning, so escape it.
            if fnmatch.fnmatchcase(resource, pattern.replace("[", "[[]")):
                return True
    return False


def policy_resource(action: str, topic: str) -> str:
    kind = "topicfilter" if action == "iot:Subscribe" else "topic"
    return f"{ARN}{kind}/{topic}"


def mqtt_match(pattern: str, topic: str) -> bool:
    """Whether the MQTT filter ``pattern`` matches ``topic`` (+ one level, # the rest)."""
    pattern_levels, topic_levels = pattern.split("/"), topic.split("/")
    for index, level in enumerate(pattern_levels):
        if level == "#":
            return True
        if index >= len(topic_levels) or level not in ("+", topic_levels[index]):
            return False
    return len(pattern_levels) == len(topic_levels)


def broker_allows(action: str, topic: str, thing: str) -> bool:
    """Mosquitto's dynamic-security evaluation of the emulator's role for ``thing``."""
    acl_types = {
        "iot:Subscribe": ("subscribeLiteral", "subscribePattern"),
        "iot:Receive": ("publishClientReceive",),
        "iot:Publish": ("publishClientSend",),
    }[action]
    for acl in _thing_role(thing)["acls"]:
        if acl["acltype"] not in acl_types or not acl["allow"]:
            continue
        if acl["acltype"] == "subscribeLiteral":
            if acl["topic"] == topic:
                return True
        elif acl["acltype"] == "subscribePattern":
            # A subscription is allowed when the role's pattern covers the whole filter.
            if "#" not in topic and "+" not in topic and mqtt_match(acl["topic"], topic):
                return True
        elif mqtt_match(acl["topic"], topic):
            return True
    return False


class TestRules:
    def test_connect_as_the_thing_only(self):
        """The policy lets a device connect with its own thing name as client id only."""
        policy = readme_policy()

        assert policy_allows(policy, "iot:Connect", f"{ARN}client/{THING}", THING)
        assert not policy_allows(policy, "iot:Connect", f"{ARN}client/{OTHER}", THING)
        assert not policy_allows(policy, "iot:Connect", f"{ARN}client/{THING}-2", THING)

    @pytest.mark.parametrize(("action", "topic"), AGENT_NEEDS)
    def test_both_allow_what_the_agent_does(self, action, topic):
        """Every operation of the agent is allowed by the policy and by the broker rules."""
        policy = readme_policy()

        assert policy_allows(policy, action, policy_resource(action, topic), THING)
        assert broker_allows(action, topic, THING)

    @pytest.mark.parametrize(("action", "topic"), REFUSED)
    def test_both_refuse_the_rest(self, action, topic):
        """Another thing's topics, wildcards and publishing notifications are refused by both."""
        policy = readme_policy()

        assert not policy_allows(policy, action, policy_resource(action, topic), THING)
        assert not broker_allows(action, topic, THING)

    def test_policy_is_within_the_broker_rules(self):
        """Each grant of the policy, made concrete, is one the emulator's broker also grants."""
        policy = readme_policy()
        concrete = {
            "*": ["update/accepted", "get/rejected", "update/documents", "delete/accepted"],
        }
        checked = 0
        for statement in policy["Statement"]:
            actions = statement["Action"]
            for action in [actions] if isinstance(actions, str) else actions:
                if action == "iot:Connect":
                    continue
                for resource in statement["Resource"]:
                    topic = resource.split("/", 1)[1].replace(
                        "${iot:Connection.Thing.ThingName}", THING
                    )
                    for suffix in concrete["*"] if topic.endswith("/*") else [""]:
                        example = topic[:-1] + suffix if suffix else topic
                        assert broker_allows(action, example, THING), (action, example)
                        checked += 1

        assert checked >= 10


class TestRealBroker:
    async def test_the_agents_operations(self, broker, mqtt_pki):
        """A real Mosquitto set up by the emulator grants the agent's operations, not others'."""
        own = [topic for action, topic in AGENT_NEEDS if action == "iot:Subscribe"]
        async with mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing(THING), THING) as device:
            granted = [await device.subscribe(topic) for topic in own]
            foreign = await device.subscribe(notify_topic(OTHER))
            async with asyncio.timeout(5 * SCALE):
                puback = await device.publish(f"{SHADOW}/get", b"{}")
                forged = await device.publish(f"$aws/things/{OTHER}/shadow/name/x/update", b"{}")

        assert granted == [[GRANTED_QOS_1]] * len(own)
        assert foreign == [NOT_AUTHORIZED]
        assert puback != NOT_AUTHORIZED
        assert forged == NOT_AUTHORIZED
