"""The agent's notifications through a real Mosquitto: hostile input, broker restart, offline."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agent.emulator.mqtt_client import AsyncMqttClient
from tests.integration.test_agent_e2e import World, alive, wait_until


pytestmark = pytest.mark.integration

TOKEN = "AQGAAXiHostileTestToken-0123456789abcdef"


def publish(world: World, payloads: list[bytes]) -> None:
    """Publish raw payloads on the thing's notify topic as the service identity (QoS 1)."""
    emulator = world.emulator
    host, port = emulator.mqtt_endpoint
    base = [
        "mosquitto_pub", "-V", "mqttv5", "-h", host, "-p", str(port), "-q", "1",
        "--cafile", str(emulator.ca_file), "--cert", str(emulator.privileged.cert),
        "--key", str(emulator.privileged.key), "-i", "hostile-publisher",
        "-t", f"$aws/things/{world.thing}/tunnels/notify",
    ]  # fmt: skip
    for payload in payloads:
        subprocess.run([*base, "-s"], input=payload, check=True, timeout=30)


def publish_many(world: World, payloads: list[bytes], pause_every: int = 20) -> None:
    """Publish many payloads, each acknowledged (PUBACK) before the next, gently paced."""
    emulator = world.emulator
    host, port = emulator.mqtt_endpoint

    async def run() -> None:
        client = AsyncMqttClient(
            endpoint=host,
            port=port,
            cert=emulator.privileged.cert,
            key=emulator.privileged.key,
            ca=emulator.ca_file,
            client_id="hostile-publisher",
        )
        async with client:
            for index, payload in enumerate(payloads):
                await client.publish(f"$aws/things/{world.thing}/tunnels/notify", payload)
                if index % pause_every == 0:
                    await asyncio.sleep(0.005)

    asyncio.run(run())


def notification(**overrides: object) -> bytes:
    body = {"clientAccessToken": TOKEN, "clientMode": "destination", "region": "us-east-1"}
    body["services"] = ["SSH"]
    return json.dumps(body | overrides).encode()


@pytest.fixture
def world(tmp_path):
    made = World(tmp_path, {"SSH": "22", "HTTP": "127.0.0.1:8080"})
    try:
        yield made
    finally:
        made.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=10,
)
hostile = (
    st.binary(max_size=120).filter(lambda b: b"\n" not in b and b"\r" not in b)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries(
        {},
        optional={
            "clientAccessToken": st.text(max_size=40),
            "clientMode": st.sampled_from(["destination", "source", "DESTINATION"]),
            "region": st.sampled_from(["us-east-1", "eu-west-1", "evil.example", ""]),
            # Never a fully valid request: SSH+RDP and friends name unknown services.
            "services": st.lists(
                st.sampled_from(["RDP", "VNC", "a:b", ""]), min_size=1, max_size=3
            ),
        },
    ).map(lambda v: json.dumps(v).encode())
)


# Values a sender could slip into any field: token-shaped strings, Unicode digits and
# look-alike letters. None of their 8-character pieces may reach the agent's log.
TOKEN_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~+/="
LOOK_ALIKES = ["d\u0435stination", "destinati\u043en", "\u0455SH-tunnel", "us-\u0435ast-1"]
# The rules' own words: a log line may name the rule a value broke.
VOCABULARY = "clientMode is not 'destination'; an AWS region such as us-east-1"
sneaky_text = (
    st.text(alphabet=TOKEN_CHARS, min_size=8, max_size=80)
    | st.builds(lambda d: f"us-east-{d}", st.sampled_from(["\u0661", "\u0967", "\uff11", "\u06f1"]))
    | st.builds(
        lambda t, c: t + c,
        st.sampled_from(
            ["d\u0435stination", "destinati\u043en", "\u0455SH-tunnel", "us-\u0435ast-1"]
        ),
        st.text(alphabet=TOKEN_CHARS, max_size=20),
    )
)
sneaky = st.fixed_dictionaries(
    {
        "clientAccessToken": sneaky_text | st.sampled_from([TOKEN]),
        "clientMode": sneaky_text | st.just("destination"),
        "region": sneaky_text | st.just("us-east-1"),
        "services": st.lists(sneaky_text | st.just("SSH"), min_size=1, max_size=3),
    }
).filter(lambda d: not (d["clientMode"] == "destination" and d["region"] == "us-east-1"))


def pieces(document: dict[str, object]) -> set[str]:
    """Every 8-character piece of every string value sent, as sent and as JSON escapes it."""
    values = [v for v in document.values() if isinstance(v, str)]
    values += [v for v in document["services"] if isinstance(v, str)]  # type: ignore[union-attr]
    found: set[str] = set()
    for value in values:
        if value in ("destination", "us-east-1", TOKEN):
            continue  # the agent's own vocabulary, or the valid token it registers as a secret
        for form in (value, json.dumps(value)[1:-1]):
            found.update(form[i : i + 8] for i in range(len(form) - 7))
    return {piece for piece in found if piece not in VOCABULARY}


class TestHostileInput:
    def test_invalid_notifications_spawn_nothing(self, world):
        """Unknown service, source mode, bad region, malformed JSON and 1 MB: nothing spawned."""
        agent = world.agent()

        unknown = world.open(["RDP"])
        publish(
            world,
            [
                notification(clientMode="source"),
                notification(region="us-east-1.evil.example"),
                b'{"clientAccessToken": "x", "clientMode": ',
                b"{" + b" " * (1024 * 1024) + b"}",
            ],
        )
        rejected = agent.wait_event("notification_rejected", 4)
        reasons = [e["reason"] for e in rejected]
        valid = world.open(["SSH"])
        world.wait_connected(valid["tunnelId"])

        assert reasons[0] == (
            "services[0] is not in the services map (this device offers: HTTP, SSH)"
        )
        assert reasons[1].startswith("clientMode is not 'destination' (6 characters, sha256 ")
        assert reasons[2].startswith("region does not look like an AWS region such as us-east-1")
        assert "evil" not in reasons[2]
        assert reasons[3] == "payload is not valid JSON"
        assert len(agent.events("tunnel_started")) == 1
        assert unknown["destinationAccessToken"] not in agent.text
        assert TOKEN not in agent.text
        assert agent.process.poll() is None

    def test_random_payloads_through_the_broker(self, world):
        """Hypothesis payloads through Mosquitto: each parsed or dropped, nothing spawned."""
        payloads: list[bytes] = []

        @settings(
            max_examples=1000, database=None, deadline=None, suppress_health_check=list(HealthCheck)
        )
        @given(hostile)
        def collect(payload: bytes) -> None:
            payloads.append(payload)

        collect()
        agent = world.agent()

        publish_many(world, payloads)
        wait_until(
            lambda: (
                len(agent.events("notification_received"))
                + len(agent.events("notification_dropped"))
                == len(payloads)
            ),
            60,
            "every payload parsed or dropped",
            lambda: agent.text[-2000:],
        )
        valid = world.open(["SSH"])
        world.wait_connected(valid["tunnelId"])

        assert (
            len(agent.events("notification_rejected"))
            == len(agent.events("notification_received")) - 1
        )
        assert agent.events("notification_handling_failed") == []
        assert len(agent.events("tunnel_started")) == 1
        assert agent.process.poll() is None

    def test_rejections_never_quote_a_field(self, world):
        """Token-shaped, Unicode-digit and look-alike values in every field never reach the log."""
        documents: list[dict[str, object]] = []

        @settings(
            max_examples=150, database=None, deadline=None, suppress_health_check=list(HealthCheck)
        )
        @given(sneaky)
        def collect(document: dict[str, object]) -> None:
            documents.append(document)

        collect()
        agent = world.agent()

        publish_many(world, [json.dumps(d).encode() for d in documents])
        wait_until(
            lambda: (
                len(agent.events("notification_received"))
                + len(agent.events("notification_dropped"))
                == len(documents)
            ),
            60,
            "every payload parsed or dropped",
            lambda: agent.text[-2000:],
        )
        text = agent.text
        leaked = sorted(p for d in documents for p in pieces(d) if p in text)

        assert len(agent.events("notification_rejected")) == len(
            agent.events("notification_received")
        )
        assert leaked == []
        assert agent.events("tunnel_started") == []


class TestConnection:
    def test_broker_restart(self, world):
        """After a broker restart the agent reconnects and the next notification is handled."""
        agent = world.agent()

        world.thread.run(world.emulator.broker.restart())
        agent.wait_event("mqtt_connected", 2, timeout=30)
        # The emulator's publisher queues QoS 1 while it reconnects too.
        tunnel = world.open(["SSH"])
        world.wait_connected(tunnel["tunnelId"], timeout=30)

        assert len(agent.events("tunnel_started")) == 1
        assert agent.process.poll() is None

    def test_notification_while_agent_down(self, world):
        """A notification published while the agent is stopped is delivered when it comes back."""
        first = world.agent()
        assert first.terminate() == 0

        tunnel = world.open(["SSH"])
        second = world.agent(ready=False)
        second.wait_event("tunnel_started", timeout=30)
        world.wait_connected(tunnel["tunnelId"])
        (connected,) = second.events("mqtt_connected")

        assert connected["session_present"] is True
        assert alive(second.proxy_pids()[0])
