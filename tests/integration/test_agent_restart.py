"""No tunnel lost across agent restarts, crashes, reboots and reloads (real processes).

The emulator (control plane, relay, Mosquitto) runs in a thread; `tunnel-agent run` is a
child process with the emulator bundle's configuration (its tunnel records live in the
bundle's state directory); the operator side is a real source `tunnel-localproxy`, and the
device's service is a TCP echo server. Bytes are hashed end to end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import stat
import statistics
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

from agent.daemon.handoff import HANDOFF_ENV
from tests.integration.dataplane import connect, pattern_bytes, recv_exactly
from tests.integration.test_agent_e2e import (
    ROOT,
    SCALE,
    Agent,
    World,
    alive,
    children,
    wait_until,
)


if TYPE_CHECKING:
    from pathlib import Path


pytestmark = pytest.mark.integration

# Within this long of the new agent's start, the destination must be CONNECTED again.
RECONNECT_BUDGET = 5.0


def state_dir(world: World) -> Path:
    return world.bundle.directory / "state"


def record_files(world: World) -> list[Path]:
    directory = state_dir(world)
    return sorted(directory.glob("tunnel-*.json")) if directory.is_dir() else []


def destination(world: World, tunnel_id: str) -> dict[str, Any]:
    return world.client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]["destinationConnectionState"]


def stored_destination_token(world: World, tunnel_id: str) -> str:
    """The destination token the emulator holds now (a rotation would have replaced it)."""
    return world.emulator.store.get(tunnel_id).endpoint("destination").token


def wait_state(world: World, tunnel_id: str, state: str, timeout: float = 15) -> dict[str, Any]:
    return wait_until(
        lambda: (d := destination(world, tunnel_id))["status"] == state and d,
        timeout,
        f"destination {state}",
    )


def roundtrip(port: int, size: int = 256 * 1024, seed: int = 0) -> tuple[bytes, bytes]:
    """Send ``size`` bytes through a new connection and return (sent, received) SHA-256."""
    with connect(port) as sock:
        return exchange(sock, size, seed)


def exchange(sock: socket.socket, size: int, seed: int) -> tuple[bytes, bytes]:
    """Send ``size`` bytes on ``sock`` while reading the echo; return both SHA-256 digests."""
    sent = hashlib.sha256()

    def send() -> None:
        for chunk in pattern_bytes(size, seed):
            sent.update(chunk)
            sock.sendall(chunk)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = hashlib.sha256(recv_exactly(sock, size))
    sender.join(10 * SCALE)
    return sent.digest(), received.digest()


def started_agent(world: World) -> tuple[Agent, float]:
    """A new agent process and the wall-clock time it was started."""
    started = time.time()
    return world.agent(ready=False), started


def reconnect_delay(world: World, tunnel_id: str, started: float) -> float:
    """Seconds from ``started`` to the destination's CONNECTED (the emulator's timestamp)."""
    state = wait_state(world, tunnel_id, "CONNECTED", timeout=RECONNECT_BUDGET * 3)
    return state["lastUpdatedAt"].timestamp() - started


def kill_everything(agent: Agent) -> list[int]:
    """A power cut: SIGKILL the proxies first (no close frame), then the agent."""
    proxies = children(agent.pid)
    for pid in proxies:
        os.kill(pid, signal.SIGKILL)
    agent.process.kill()
    agent.process.wait()
    wait_until(lambda: not any(alive(p) for p in proxies), 5, "proxies gone")
    return proxies


class TestRestart:
    @pytest.mark.parametrize("how", ["sigterm", "kill-9", "reboot"])
    def test_destination_reconnects_without_rotation(self, world, how):
        """After SIGTERM, kill -9 or a power cut the next agent reconnects the same tunnel."""
        first = world.agent()
        tunnel = world.open(["ECHO"])
        world.wait_connected(tunnel["tunnelId"])
        source = world.source(tunnel["sourceAccessToken"], ["ECHO"])
        port = source.port("ECHO")
        before = roundtrip(port, seed=1)
        (record,) = record_files(world)
        mode = stat.S_IMODE(record.stat().st_mode)
        owner = record.stat().st_uid

        if how == "sigterm":
            assert first.terminate() == 0
        elif how == "kill-9":
            first.process.kill()
            first.process.wait()
        else:
            kill_everything(first)
            # A file another tool left behind must not stop the boot.
            (state_dir(world) / "tunnel-0badf00d.json").write_bytes(b"\x00garbage")
            (state_dir(world) / "tunnel-0badf00d.json").chmod(0o600)
        wait_state(world, tunnel["tunnelId"], "DISCONNECTED")
        kept = [p.name for p in record_files(world)]
        second, started = started_agent(world)
        delay = reconnect_delay(world, tunnel["tunnelId"], started)
        after = roundtrip(port, seed=2)
        second.ready()
        logs = first.text + second.text

        assert mode == 0o600
        assert owner == os.getuid()
        assert record.name in kept
        assert before[0] == before[1]
        assert after[0] == after[1]
        assert delay < RECONNECT_BUDGET * SCALE, f"reconnected after {delay:.2f}s"
        assert source.proc.poll() is None
        assert (
            stored_destination_token(world, tunnel["tunnelId"])
            == (tunnel["destinationAccessToken"])
        )
        assert [e["tunnel_key"] for e in second.events("tunnel_restored")] == [
            record.stem.removeprefix("tunnel-")
        ]
        assert second.events("tunnel_started") == []
        assert tunnel["destinationAccessToken"] not in logs
        assert json.loads(record.read_text())["client_token"] not in logs
        if how == "reboot":
            (ignored,) = second.events("tunnel_record_ignored")
            assert ignored["path"].endswith("tunnel-0badf00d.json")
            assert ignored["reason"] == "not valid UTF-8 JSON"

    def test_record_removed_when_the_tunnel_ends(self, world):
        """CloseTunnel after a restart: the restored proxy exits 0 and its record is deleted."""
        first = world.agent()
        tunnel = world.open(["ECHO"])
        world.wait_connected(tunnel["tunnelId"])
        first.terminate()
        world.client.close_tunnel(tunnelId=tunnel["tunnelId"])
        held = record_files(world)

        second = world.agent()
        (ended,) = second.wait_event("tunnel_ended")

        assert len(held) == 1
        assert ended["reason"] == "ended"
        assert record_files(world) == []
        assert second.status()["tunnels"] == []

    def test_ten_tunnels_reconnect(self, tmp_path, echo_server, capsys):
        """Ten tunnels: every destination is CONNECTED again within budget; p50 reported."""
        # Ten service sets: a second tunnel for the same services would be a rotation.
        names = [f"ECHO{i}" for i in range(10)]
        world = World(tmp_path / "ten", dict.fromkeys(names, str(echo_server.port)))
        try:
            self._ten_tunnels(world, names, capsys)
        finally:
            world.close()

    @staticmethod
    def _ten_tunnels(world: World, names: list[str], capsys) -> None:
        first = world.agent()
        tunnels = [world.open([name]) for name in names]
        for tunnel in tunnels:
            world.wait_connected(tunnel["tunnelId"])
        wait_until(lambda: len(record_files(world)) == 10, 10, "10 records")
        first.process.kill()
        first.process.wait()
        for tunnel in tunnels:
            wait_state(world, tunnel["tunnelId"], "DISCONNECTED")

        second, started = started_agent(world)
        delays = sorted(reconnect_delay(world, t["tunnelId"], started) for t in tunnels)
        second.ready()
        # A forked proxy can connect before the agent has logged its start: wait for the lines.
        wait_until(lambda: len(second.events("tunnel_restored")) >= 10, 10, "10 restored lines")
        p50 = statistics.median(delays)
        with capsys.disabled():
            print(f"\nreconnect after restart, 10 tunnels: p50 {p50:.2f}s max {delays[-1]:.2f}s")

        assert len(second.events("tunnel_restored")) == 10
        assert delays[-1] < RECONNECT_BUDGET * SCALE, delays


def listen(sock: socket.socket, into: list[str]) -> None:
    """Collect sd_notify assignments until the socket is shut down."""
    while data := sock.recv(4096):
        into += data.decode().split("\n")


def rewrite_services(world: World, services: dict[str, str]) -> None:
    config = world.bundle.config
    text = config.read_text().split("[services]")[0]
    lines = [f'{name} = "{target}"' for name, target in services.items()]
    config.write_text(text + "[services]\n" + "\n".join(lines) + "\n")


class TestReload:
    def test_sighup_keeps_the_session_and_runs_the_new_configuration(
        self, world, echo_server, tmp_path
    ):
        """SIGHUP: same pid, same proxy, the open TCP session carries data before and after."""
        # A stand-in for systemd's notify socket, read as it comes (a full queue blocks).
        systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        systemd.bind(str(tmp_path / "notify.sock"))
        notified: list[str] = []
        listener = threading.Thread(target=listen, args=(systemd, notified), daemon=True)
        listener.start()
        agent = world.agent(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
        tunnel = world.open(["ECHO"])
        world.wait_connected(tunnel["tunnelId"])
        source = world.source(tunnel["sourceAccessToken"], ["ECHO"])
        port = source.port("ECHO")
        (proxy,) = agent.proxy_pids()
        session = connect(port)
        before = exchange(session, 128 * 1024, seed=3)
        rewrite_services(world, {"ECHO": str(echo_server.port), "EXTRA": "127.0.0.1:9"})

        os.kill(agent.pid, signal.SIGHUP)
        started = agent.wait_event("agent_started", 2)[-1]
        during = exchange(session, 128 * 1024, seed=4)
        fresh = roundtrip(port, seed=5)
        # The adopted proxy's output still reaches the log (its pipes were handed over):
        # the connection opened after the reload is the tunnel's second one.
        (output,) = wait_until(
            lambda: [e for e in agent.events("proxy_output") if "connection=2" in e["line"]],
            10,
            "the adopted proxy's output",
        )
        world.client.close_tunnel(tunnelId=tunnel["tunnelId"])
        (ended,) = agent.wait_event("tunnel_ended")
        session.close()
        systemd.shutdown(socket.SHUT_RDWR)
        listener.join(5)
        systemd.close()

        assert before[0] == before[1]
        assert during[0] == during[1]
        assert fresh[0] == fresh[1]
        assert agent.process.poll() is None
        assert agent.status()["pid"] == agent.pid
        # systemd hears READY=1, RELOADING=1 (with the time), READY=1 from the new image.
        assert [n for n in notified if n in {"READY=1", "RELOADING=1"}] == [
            "READY=1",
            "RELOADING=1",
            "READY=1",
        ]
        assert any(n.startswith("MONOTONIC_USEC=") for n in notified)
        assert started["services"] == ["ECHO", "EXTRA"]
        assert agent.events("agent_started")[0]["services"] == ["ECHO"]
        assert agent.events("tunnels_adopted")[0]["running"] == 1
        assert [e["pid"] for e in agent.events("tunnel_adopted")] == [proxy]
        assert output["pid"] == proxy
        assert output["tunnel_key"] == agent.events("tunnel_adopted")[0]["tunnel_key"]
        # Its exit is seen too: CloseTunnel ends it with status 0 and drops its record.
        assert ended["reason"] == "ended"
        assert agent.events("proxy_exited")[-1]["returncode"] == 0
        assert record_files(world) == []
        assert tunnel["destinationAccessToken"] not in agent.text

    def test_adopted_proxies_die_with_the_agent(self, world):
        """After a reload, a kill -9 of the agent still takes its (adopted) proxies with it."""
        agent = world.agent()
        tunnel = world.open(["ECHO"])
        world.wait_connected(tunnel["tunnelId"])
        (proxy,) = agent.proxy_pids()
        os.kill(agent.pid, signal.SIGHUP)
        agent.wait_event("agent_started", 2)
        wait_until(lambda: agent.status()["state"] == "running", 5, "running again")
        adopted = agent.proxy_pids()
        # The proxy itself, or the launcher that forked it (proxy.launcher, the default).
        ours = children(agent.pid)

        agent.process.kill()
        agent.process.wait()
        wait_until(lambda: not alive(proxy), 5, "the adopted proxy gone")
        wait_until(lambda: not any(alive(pid) for pid in ours), 5, "the agent's children gone")

        assert adopted == [proxy]
        assert ours
        assert not alive(proxy)

    def test_failed_preflight_keeps_the_old_code_running(self, world, echo_server):
        """A configuration the new image would refuse: the old one carries on, tunnel intact."""
        agent = world.agent()
        tunnel = world.open(["ECHO"])
        world.wait_connected(tunnel["tunnelId"])
        source = world.source(tunnel["sourceAccessToken"], ["ECHO"])
        port = source.port("ECHO")
        rewrite_services(world, {"ECHO": "not a target"})

        os.kill(agent.pid, signal.SIGHUP)
        (failed,) = agent.wait_event("agent_reload_failed", timeout=30)
        after = roundtrip(port, seed=6)
        code = agent.terminate()

        assert failed["stage"] == "preflight"
        assert "services.ECHO" in failed["reason"]
        assert after[0] == after[1]
        assert len(agent.events("agent_started")) == 1
        assert agent.events("agent_reexecuting") == []
        assert code == 0


def test_no_persistence_when_turned_off(world):
    """[tunnels] persist = false: no record is written, and a restart restores nothing."""
    first = world.agent("--no-tunnels-persist")
    tunnel = world.open(["ECHO"])
    world.wait_connected(tunnel["tunnelId"])
    written = record_files(world)
    first.terminate()
    second = world.agent("--no-tunnels-persist")
    with contextlib.suppress(AssertionError):
        wait_state(world, tunnel["tunnelId"], "CONNECTED", timeout=3)

    assert written == []
    assert second.events("tunnel_restored") == []
    assert destination(world, tunnel["tunnelId"])["status"] == "DISCONNECTED"


def test_unreadable_handoff_stops_stray_children(world, tmp_path):
    """A re-exec whose hand-off cannot be read: the children nobody supervises are stopped."""
    log = tmp_path / "stray-agent.log"
    with log.open("wb") as out:
        # sh starts a child, then becomes the agent: the child is the agent's, unknown to it.
        process = subprocess.Popen(
            [
                "sh", "-c", 'sleep 300 & echo "stray $!"; exec "$@"', "sh",
                sys.executable, "-m", "agent", "run", "--config", str(world.bundle.config),
                "--runtime-dir", str(tmp_path / "run"), "--logging-format", "json",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, HANDOFF_ENV: "99"},
        )  # fmt: skip
    try:
        stray = int(wait_until(lambda: re.search(r"stray (\d+)", log.read_text()), 10).group(1))
        wait_until(lambda: '"agent_started"' in log.read_text(), 15, "agent started")
        wait_until(lambda: not alive(stray), 10, "stray stopped")
        events = [json.loads(line) for line in log.read_text().splitlines() if line[:1] == "{"]
        named = {e["event"]: e for e in events}
    finally:
        process.terminate()
        process.wait(10)

    assert named["handoff_unreadable"]["reason"] == "Bad file descriptor"
    assert named["stray_child_stopping"]["pid"] == stray
    assert process.returncode == 0
