"""The agent's health, seen from outside: its named shadow (HTTP and aws CLI) and `status --json`.

Everything is real: the emulator (control plane, relay, Mosquitto, shadow service), `tunnel-agent
run` as a child process, the bundled proxies, a TCP echo service, boto3's iot-data client.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_agent_e2e import ROOT, SCALE, World, wait_until


pytestmark = pytest.mark.integration

SHADOW = "tunnel-agent"
AWS = Path(sys.executable).with_name("aws")


def reported(world: World) -> dict[str, Any] | None:
    """The agent's shadow through the HTTP data-plane API (boto3 iot-data)."""
    client = world.emulator.data_client()
    try:
        response = client.get_thing_shadow(thingName=world.thing, shadowName=SHADOW)
    except client.exceptions.ResourceNotFoundException:
        return None
    finally:
        client.close()
    return json.loads(response["payload"].read())["state"]["reported"]


def status_json(agent) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--json", "--runtime-dir", str(agent.runtime)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(result.stdout)


def echo(sock: socket.socket, size: int) -> None:
    """Send ``size`` bytes and read them all back."""
    data = bytes(range(256)) * (size // 256)
    sock.sendall(data)
    got = 0
    while got < len(data):
        chunk = sock.recv(65536)
        assert chunk, "echo connection closed early"
        got += len(chunk)


class TestShadow:
    def test_running_agent_reports_itself(self, world):
        """The shadow names the services, the limits and a live MQTT session; no tunnel yet."""
        agent = world.agent()
        state = wait_until(lambda: reported(world), 10, "a shadow report", lambda: agent.text)

        assert state["state"] == "running"
        assert state["services"] == ["ECHO"]
        assert state["limits"]["max_concurrent_tunnels"] >= 1
        assert state["mqtt_session_start"] <= time.time()
        assert state["tunnels"] == []
        assert "last_rejection" not in state  # null in an update removes the key

    def test_refused_service_is_reported_without_the_token(self, world):
        """OpenTunnel(VNC) on a device without VNC: the shadow says which, why, and when."""
        agent = world.agent()
        opened = time.time()
        tunnel = world.open(["VNC"])
        state = wait_until(
            lambda: (s := reported(world)) and s.get("last_rejection") and s,
            5,
            "a reported rejection",
            lambda: agent.text,
        )
        rejection = state["last_rejection"]

        assert rejection["services"] == ["VNC"]
        assert "not in the services map" in rejection["reason"]
        assert rejection["at"] >= opened - 1
        assert tunnel["destinationAccessToken"] not in json.dumps(state)
        document = status_json(agent)
        assert document["last_notification"]["outcome"] == "rejected"
        assert document["last_rejection"]["services"] == ["VNC"]

    @pytest.mark.skipif(not AWS.exists(), reason="aws CLI not installed in the venv")
    def test_aws_cli_reads_the_report(self, world, tmp_path):
        """`aws iot-data get-thing-shadow` with operator.env only sees the running agent."""
        agent = world.agent()
        wait_until(lambda: reported(world), 10, "a shadow report", lambda: agent.text)
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AWS_PAGER": ""}
        for line in world.emulator.operator_env.read_text().splitlines():
            if line and not line.startswith("#"):
                name, value = line.split("=", 1)
                env[name] = value
        env["AWS_CONFIG_FILE"] = str(tmp_path / "no-config")
        env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "no-credentials")
        out = tmp_path / "shadow.json"
        result = subprocess.run(
            [str(AWS), "iot-data", "get-thing-shadow", "--thing-name", world.thing,
             "--shadow-name", SHADOW, str(out)],
            env=env, capture_output=True, text=True, timeout=60 * SCALE, check=False,
        )  # fmt: skip

        assert result.returncode == 0, result.stderr
        assert json.loads(out.read_text())["state"]["reported"]["services"] == ["ECHO"]

    def test_clean_stop_marks_offline(self, world):
        """SIGTERM: the last report says offline, with no tunnel."""
        agent = world.agent()
        wait_until(lambda: reported(world), 10, "a shadow report", lambda: agent.text)
        stopped = time.time()
        assert agent.terminate() == 0
        state = wait_until(
            lambda: (s := reported(world)) and s["state"] == "offline" and s, 5, "offline"
        )

        assert state["tunnels"] == []
        assert state["offline_since"] >= stopped - 1


class TestFiguresWhileBytesFlow:
    def test_status_and_shadow_count_what_was_sent(self, world):
        """Connections and bytes grow by exactly what went through, within one report interval."""
        agent = world.agent()
        tunnel = world.open(["ECHO"])
        world.wait_connected(tunnel["tunnelId"])
        source = world.source(tunnel["sourceAccessToken"], ["ECHO"])
        sock = socket.create_connection(("127.0.0.1", source.port("ECHO")), timeout=10 * SCALE)
        try:
            echo(sock, 100 * 1024)

            def figures(expected: int) -> dict[str, Any] | None:
                (t,) = status_json(agent)["tunnels"]
                return t if t["bytes_in"] == expected and t["bytes_out"] == expected else None

            first = wait_until(lambda: figures(100 * 1024), 1.5, "100 KiB in the status")
            echo(sock, 50 * 1024)
            second = wait_until(lambda: figures(150 * 1024), 1.5, "150 KiB in the status")
            shadow = wait_until(
                lambda: (
                    (s := reported(world))
                    and s["tunnels"]
                    and s["tunnels"][0]["bytes_in"] == 150 * 1024
                    and s
                ),
                3,
                "150 KiB in the shadow",
            )
        finally:
            sock.close()
        document = status_json(agent)

        assert first["connections"] == second["connections"] == 1
        assert first["connected"] is True
        assert first["last_error"] is None
        assert document["mqtt"]["state"] == "connected"
        assert document["mqtt"]["since"] <= time.time()
        assert document["last_notification"]["outcome"] == "started"
        (row,) = shadow["tunnels"]
        assert row["services"] == ["ECHO"]
        assert row["connected"] is True
        assert row["bytes_out"] == 150 * 1024
        assert row["restarts"] == 0
        closed = wait_until(
            lambda: status_json(agent)["tunnels"][0]["connections"] == 0, 2, "connection closed"
        )
        assert closed


def connect_env(world: World) -> dict[str, str]:
    """The operator's environment: operator.env only (control plane, iot-data, relay, CA)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS", "TUNNEL"))}
    for line in world.emulator.operator_env.read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("=", 1)
            env[name] = value
    return env


def connect(world: World, *args: str, timeout: float = 30) -> tuple[int, str, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "agent", "connect", world.thing, *args],
        env=connect_env(world), capture_output=True, text=True, timeout=timeout * SCALE,
        check=False, cwd=ROOT,
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


class TestConnectExplains:
    def test_refused_service_exits_3_with_the_reason(self, world):
        """VNC is not in the device's map: connect says so within 5 s and closes the tunnel."""
        world.agent()
        code, out, took = connect(world, "-s", "VNC", "--wait", "20")

        assert code == 3, out
        assert f"error: {world.thing} refused the tunnel: " in out
        assert "not in the services map" in out
        assert took < 5 * SCALE
        assert re.search(r"tunnel \S+ closed", out)

    def test_no_agent_exits_3_after_wait(self, world):
        """Nobody answers: after --wait 3 connect says so, and that the agent never reported."""
        code, out, took = connect(world, "-s", "ECHO", "--wait", "3")

        assert code == 3, out
        assert f"error: no tunnel agent answered on {world.thing} within 3 s" in out
        assert "never reported" in out
        assert 3 <= took < 15 * SCALE

    def test_offline_agent_is_named(self, world):
        """An agent that stopped cleanly: connect says since when it is offline."""
        agent = world.agent()
        wait_until(lambda: reported(world), 10, "a shadow report", lambda: agent.text)
        assert agent.terminate() == 0
        wait_until(lambda: (s := reported(world)) and s["state"] == "offline", 5, "offline")
        code, out, _ = connect(world, "-s", "ECHO", "--wait", "2")

        assert code == 3, out
        assert "its agent is offline since " in out


class TestConnectPerConnection:
    def test_closed_service_port_is_named_per_connection(self, tmp_path):
        """The device's SSH port is closed: connect prints the refusal for that connection."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]  # nothing listens here once closed
        world = World(tmp_path, {"SSH": str(closed)})
        try:
            world.agent()
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "connect", world.thing, "-s", "SSH"],
                env=connect_env(world), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, cwd=ROOT,
            )  # fmt: skip
            lines: list[str] = []
            assert proc.stdout is not None
            port = None
            for line in proc.stdout:
                lines.append(line)
                if match := re.search(r"ssh -p (\d+)", line):
                    port = int(match.group(1))
                if "destination CONNECTED" in line:
                    break
            assert port, "".join(lines)
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                for line in proc.stdout:
                    lines.append(line)
                    if "refused" in line or "closed," in line:
                        break
            proc.send_signal(signal.SIGINT)
            proc.wait(15 * SCALE)
            proc.stdout.close()
        finally:
            world.close()
        out = "".join(lines)

        assert "SSH #1: opened" in out
        assert "SSH #1: the device's SSH service refused the connection" in out
