"""The agent's notifications through a real Mosquitto: hostile input, bursts, restarts, blips.

No notification the broker delivered may be lost: bursts, an agent killed mid-handling and
broker restarts each end with every valid notification handled (a proxy started for its
token). Proxies here are a shell script that records its token and sleeps, so fifty of them
cost nothing; the figures (handling rate, reconnect times) are printed (`pytest -s`).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agent.emulator.mqtt_client import AsyncMqttClient
from tests.integration.test_agent_e2e import ROOT, SCALE, World, alive, wait_until


if TYPE_CHECKING:
    from pathlib import Path


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


def publisher(world: World, client_id: str) -> AsyncMqttClient:
    """An MQTT client with the emulator's own identity, which may publish on any notify topic."""
    emulator = world.emulator
    host, port = emulator.mqtt_endpoint
    return AsyncMqttClient(
        endpoint=host,
        port=port,
        cert=emulator.privileged.cert,
        key=emulator.privileged.key,
        ca=emulator.ca_file,
        client_id=client_id,
    )


def publish_burst(world: World, payloads: list[bytes]) -> None:
    """Publish every payload at once (QoS 1) and wait for the broker's PUBACKs."""

    async def run() -> None:
        client = publisher(world, "burst-publisher")
        topic = f"$aws/things/{world.thing}/tunnels/notify"
        async with client:
            futures = [client.publish_nowait(topic, payload) for payload in payloads]
            await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))

    asyncio.run(run())


def publish_many(world: World, payloads: list[bytes], pause_every: int = 20) -> None:
    """Publish many payloads, each acknowledged (PUBACK) before the next, gently paced."""

    async def run() -> None:
        client = publisher(world, "hostile-publisher")
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


class CheapProxy:
    """A stand-in proxy binary: records its access token (0600), then sleeps until stopped."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.path = directory / "proxy.sh"
        self.path.write_text(
            "#!/bin/sh\numask 077\n"
            f'printf %s "$AWSIOT_TUNNEL_ACCESS_TOKEN" > "{directory}/token.$$"\n'
            "exec sleep 600\n"
        )
        self.path.chmod(0o755)

    @property
    def args(self) -> tuple[str, ...]:
        """Agent flags: this binary and room for every tunnel of a test."""
        return ("--proxy-binary", str(self.path), "--limits-max-concurrent-tunnels", "60")

    def tokens(self) -> list[str]:
        """The access token of every proxy started so far."""
        return [path.read_text() for path in sorted(self.directory.glob("token.*"))]

    def wait_tokens(self, count: int, timeout: float = 60) -> list[str]:
        """Wait for ``count`` proxies to have recorded a token; return them all."""

        def ready() -> list[str] | None:
            tokens = self.tokens()
            return tokens if len(tokens) >= count and all(tokens) else None

        return wait_until(ready, timeout, f"{count} proxies started")


def stamp(event: dict) -> float:
    """An agent log event's time, seconds since the epoch."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def valid(index: int, prefix: str = "Burst") -> bytes:
    """A valid notification for SSH with a token of its own."""
    return notification(clientAccessToken=f"AQGAAXi{prefix}-{index:04d}-{os.urandom(8).hex()}")


def invalid(index: int) -> bytes:
    """One of ten kinds of notification the agent must refuse."""
    kinds = [
        lambda: notification(services=["RDP"]),
        lambda: notification(clientMode="source"),
        lambda: notification(region="us-east-1.evil.example"),
        lambda: notification(services=[]),
        lambda: notification(services=["SSH", "SSH"]),
        lambda: notification(clientAccessToken="bad token with spaces"),
        lambda: b'{"clientAccessToken": ',
        lambda: b"[1, 2, 3]",
        lambda: b"\xff\xfe" + os.urandom(32),
        lambda: b"{" + b" " * 20_000 + b"}",
    ]
    return kinds[index % len(kinds)]()


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


def windows(value: str) -> set[str]:
    """Every 8-character piece of ``value``."""
    return {value[i : i + 8] for i in range(len(value) - 7)}


def agent_words() -> set[str]:
    """
    Every 8-character piece of every string literal in the agent's code.

    Hypothesis draws text from the project's own string constants too (its "local
    constants"): a drawn "endpoint" then shows in the log as a key the agent always writes.
    A word the agent has of its own is not something the payload carried. The tests' words
    are not in it: the look-alikes are theirs, and the agent must never write those.
    """
    found: set[str] = set()
    for path in (ROOT / "agent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found |= windows(node.value)
    return found


def pieces(document: dict[str, object]) -> set[str]:
    """Every 8-character piece of every string value sent, as sent and as JSON escapes it."""
    values = [v for v in document.values() if isinstance(v, str)]
    values += [v for v in document["services"] if isinstance(v, str)]  # type: ignore[union-attr]
    found: set[str] = set()
    for value in values:
        if value in ("destination", "us-east-1", TOKEN):
            continue  # the agent's own vocabulary, or the valid token it registers as a secret
        for form in (value, json.dumps(value)[1:-1]):
            found |= windows(form)
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
        """Hypothesis payloads through Mosquitto: each received and refused, nothing spawned."""
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
            lambda: len(agent.events("notification_received")) == len(payloads),
            60,
            "every payload received",
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
        before = agent.text  # the agent's own words for this run: topic, endpoint, paths

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
        own = agent_words() | windows(before)
        leaked = sorted(p for d in documents for p in pieces(d) - own if p in text)

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


class StuckAgent:
    """A real daemon on the real MQTT source whose proxy launches hang (tests/fakes.py)."""

    def __init__(self, world: World, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.marker = directory / "launching"
        self.log_path = directory / "stuck-agent.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes", "agent-stuck", str(world.bundle.config),
             str(self.marker)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            # Records off: the restarted agent must get the tunnel from the broker's
            # redelivery, not from the record the stuck agent wrote.
            env={**os.environ, "TUNNEL_AGENT_TUNNELS__PERSIST": "false"},
        )  # fmt: skip

    def events(self, name: str) -> list[dict]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


class TestNothingLost:
    def test_fifty_published_while_the_agent_was_down(self, world, tmp_path):
        """50 tunnels opened while the agent is stopped: all 50 proxies start when it returns."""
        proxy = CheapProxy(tmp_path / "proxy")
        first = world.agent(*proxy.args)
        assert first.terminate() == 0  # the broker keeps its session and queues for it

        tunnels = [world.open(["SSH"]) for _ in range(50)]
        second = world.agent(*proxy.args, ready=False)
        tokens = proxy.wait_tokens(50)
        second.wait_event("notification_handled", 50, timeout=60)
        time.sleep(0.5 * SCALE)  # a 51st proxy would show now
        received = second.events("notification_received")
        handled = second.events("notification_handled")
        rate = len(handled) / max(1e-3, stamp(handled[-1]) - stamp(received[0]))
        print(f"\noffline backlog: 50 notifications handled at {rate:.0f}/s")

        assert sorted(proxy.tokens()) == sorted(tokens)
        assert sorted(tokens) == sorted(t["destinationAccessToken"] for t in tunnels)
        assert [e["outcome"] for e in handled] == ["started"] * 50
        assert len(received) == 50
        assert [e["session_present"] for e in second.events("mqtt_connected")] == [True]

    def test_burst_of_fifty_valid_among_five_hundred_invalid(self, world, tmp_path):
        """A live burst of 550: every valid one starts its proxy, no invalid one does."""
        proxy = CheapProxy(tmp_path / "proxy")
        agent = world.agent(*proxy.args)
        good = [valid(i) for i in range(50)]
        payloads = good + [invalid(i) for i in range(500)]
        random.Random(11).shuffle(payloads)  # noqa: S311 - test order

        publish_burst(world, payloads)
        tokens = proxy.wait_tokens(50)
        wait_until(
            lambda: len(agent.events("notification_received")) >= len(payloads),
            60,
            "550 notifications received",
            lambda: agent.text[-2000:],
        )
        agent.wait_event("notification_rejected", 500, timeout=30)
        time.sleep(0.5 * SCALE)
        received = agent.events("notification_received")
        rejected = agent.events("notification_rejected")
        handled = agent.events("notification_handled")
        last = max(stamp(e) for e in [*rejected, *handled])
        rate = len(payloads) / max(1e-3, last - stamp(received[0]))
        print(f"\nlive burst: 550 notifications (50 valid) handled at {rate:.0f}/s")

        expected = sorted(json.loads(p)["clientAccessToken"] for p in good)
        assert sorted(tokens) == expected
        assert len(proxy.tokens()) == 50
        assert len(received) == 550
        assert len(rejected) == 500
        assert [e["outcome"] for e in handled] == ["started"] * 50
        assert agent.events("notification_handling_failed") == []
        assert agent.process.poll() is None

    def test_killed_mid_handling_is_redelivered(self, world, tmp_path):
        """Killed (-9) after receiving, before handling: the restarted agent gets it again."""
        stuck = StuckAgent(world, tmp_path / "stuck")
        try:
            wait_until(lambda: stuck.events("mqtt_subscribed"), 30, "stuck agent subscribed")
            tunnel = world.open(["SSH"])
            wait_until(stuck.marker.exists, 30, "a proxy launch in progress")
            stuck.process.send_signal(signal.SIGKILL)
            stuck.process.wait(10)
            interrupted = (
                stuck.events("notification_received"),
                stuck.events("notification_handled"),
            )
        finally:
            stuck.close()
        proxy = CheapProxy(tmp_path / "proxy")

        agent = world.agent(
            *proxy.args, env={"TUNNEL_AGENT_TUNNELS__PERSIST": "false"}, ready=False
        )
        (token,) = proxy.wait_tokens(1, timeout=30)
        (connected,) = agent.events("mqtt_connected")

        assert (len(interrupted[0]), interrupted[1]) == (1, [])
        assert token == tunnel["destinationAccessToken"]
        assert connected["session_present"] is True
        assert agent.events("notification_received")[0]["size"] == interrupted[0][0]["size"]


class TestBrokerBlips:
    # Up to 20 s of backoff per outage (the default cap) times ten: minutes, not seconds.
    @pytest.mark.slow
    @pytest.mark.timeout(900)
    def test_ten_restarts_reconnect_within_thirty_seconds(self, world, tmp_path):
        """10 broker outages of 1-4 s: back within 30 s each time; every notification handled."""
        proxy = CheapProxy(tmp_path / "proxy")
        agent = world.agent(*proxy.args)  # the default reconnect settings
        broker = world.emulator.broker
        rng = random.Random(4)  # noqa: S311 - test timing
        reconnects: list[float] = []
        sent: list[str] = []
        for round_ in range(10):
            world.thread.run(broker.stop())
            time.sleep(rng.uniform(1.0, 4.0))
            world.thread.run(broker.start())
            back = time.time()
            payload = valid(round_, prefix="Blip")
            sent.append(json.loads(payload)["clientAccessToken"])
            publish(world, [payload])  # queued in the agent's session until it reconnects
            (connected, *_) = agent.wait_event("mqtt_connected", round_ + 2, timeout=40)[
                round_ + 1 :
            ]
            reconnects.append(stamp(connected) - back)
            proxy.wait_tokens(round_ + 1, timeout=40)
        figures = sorted(reconnects)
        print(
            "\nreconnect after broker blips (s): "
            f"min {figures[0]:.1f} median {statistics.median(figures):.1f} "
            f"max {figures[-1]:.1f}; all {[round(r, 1) for r in reconnects]}"
        )

        assert max(reconnects) < 30
        assert sorted(proxy.tokens()) == sorted(sent)
        assert [e["session_present"] for e in agent.events("mqtt_connected")] == [False] + [
            True
        ] * 10
        assert agent.process.poll() is None
