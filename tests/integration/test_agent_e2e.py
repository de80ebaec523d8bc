"""The agent end to end: OpenTunnel -> emulator MQTT -> agent -> destination proxy -> ssh/HTTP.

Everything is real: the emulator (control plane, relay, Mosquitto) on an event loop in a
thread, `tunnel-agent run` as a child process with the emulator's generated config, the
bundled `tunnel-localproxy` (or a wrapper script as an "external binary"), a source
proxy, a loopback sshd and an HTTP server.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from agent.daemon.capath import pem_certificates, subject_hash
from tests.emulator.fixtures import EmulatorThread
from tests.fakes import all_cmdlines
from tests.integration.conftest import PAGE
from tests.integration.dataplane import ProxyProcess


pytestmark = pytest.mark.integration

SCALE = float(os.environ.get("TEST_TIME_SCALE", "1.0"))
ROOT = Path(__file__).parent.parent.parent


# -- harness (also used by test_agent_notify.py and tests/bench/agent_bench.py) ----------------


def alive(pid: int) -> bool:
    """Tell whether ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def all_proc_files(name: str) -> list[bytes]:
    """``/proc/*/NAME`` of every process we may read."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                found.append((entry / name).read_bytes())
    return found


def children(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    found.append(int(entry.name))
    return found


def wait_until(predicate, timeout: float = 15, what: str = "condition", log: Any = None) -> Any:
    """Poll ``predicate`` until it returns a truthy value (scaled timeout)."""
    deadline = time.monotonic() + timeout * SCALE
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{log() if callable(log) else ''}"
            raise AssertionError(f"{what} not met within {timeout * SCALE:.1f}s{detail}")
        time.sleep(0.01)


class Agent:
    """`tunnel-agent run` as a child process, JSON logs in a file."""

    def __init__(self, config: Path, directory: Path, *args: str, env: dict | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.runtime = directory / "run"
        self.log_path = directory / f"agent-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "agent", "run", "--config", str(config),
                "--runtime-dir", str(self.runtime), "--logging-format", "json",
                "--proxy-restart-backoff-initial", "0.2", "--proxy-restart-backoff-max", "1",
                *args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        events = []
        for line in self.text.splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return [e for e in events if name is None or e.get("event") == name]

    def wait_event(self, name: str, count: int = 1, timeout: float = 15) -> list[dict[str, Any]]:
        def check():
            if self.process.poll() is not None and len(self.events(name)) < count:
                raise AssertionError(f"agent exited {self.process.returncode}:\n{self.text}")
            found = self.events(name)
            return found if len(found) >= count else None

        return wait_until(check, timeout, f"{count} x {name}", lambda: self.text)

    def ready(self) -> Agent:
        self.wait_event("mqtt_subscribed")
        self.wait_event("agent_started")
        return self

    def status(self) -> dict[str, Any]:
        (path,) = self.runtime.glob("status.*.json")  # status.<thing_name>.json
        return json.loads(path.read_text())

    def proxy_pids(self) -> list[int]:
        return [t["pid"] for t in self.status()["tunnels"] if t["pid"]]

    def terminate(self, timeout: float = 5) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def close(self) -> None:
        if self.process.poll() is None:
            pids = children(self.pid)
            self.process.kill()
            self.process.wait()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()


class World:
    """The emulator, one thing, and a boto3 client on its API."""

    def __init__(self, directory: Path, services: dict[str, str], thing: str = "dev-1") -> None:
        self.directory = directory
        self.thread = EmulatorThread(directory / "emulator")
        self.thing = thing
        self.bundle = self.thread.emulator.add_thing(thing, services=services)
        try:
            self.thread.start()
        except BaseException:
            self.thread.close_loop()
            raise
        emulator = self.thread.emulator
        self.client = emulator.api_client()
        self.agents: list[Agent] = []
        self.proxies: list[ProxyProcess] = []

    @property
    def emulator(self):
        return self.thread.emulator

    def agent(self, *args: str, env: dict | None = None, ready: bool = True) -> Agent:
        agent = Agent(self.bundle.config, self.directory / "agent", *args, env=env)
        self.agents.append(agent)
        return agent.ready() if ready else agent

    def open(self, services: list[str]) -> dict[str, Any]:
        return self.client.open_tunnel(
            destinationConfig={"thingName": self.thing, "services": services}
        )

    def destination_state(self, tunnel_id: str) -> str:
        tunnel = self.client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]
        return tunnel["destinationConnectionState"]["status"]

    def wait_connected(self, tunnel_id: str, timeout: float = 15) -> None:
        wait_until(
            lambda: self.destination_state(tunnel_id) == "CONNECTED",
            timeout,
            "destination CONNECTED",
        )

    def source(self, token: str, services: list[str], name: str = "source") -> ProxyProcess:
        mapping = ",".join(f"{s}=0" for s in services)
        proxy = ProxyProcess(
            ["-e", self.emulator.relay_endpoint, "-s", mapping, "-c", str(self.emulator.ca_file)],
            token=token,
            log_file=self.directory / f"{name}-{time.monotonic_ns()}.log",
        )
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.stop()
        for agent in self.agents:
            agent.close()
        self.client.close()
        self.thread.stop()


def ssh_run(
    sshd, port: int, command: str = "echo tunnel-ok; uname -s"
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ssh", *sshd.ssh_options(port), f"{sshd.user}@127.0.0.1", command],
        capture_output=True,
        timeout=30 * SCALE,
        check=False,
    )


def http_get(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10 * SCALE) as response:
        return response.read()


@pytest.fixture
def world(tmp_path, sshd, http_server):
    made = World(tmp_path, {"SSH": str(sshd.port), "HTTP": str(http_server)})
    try:
        yield made
    finally:
        made.close()


# -- tests ---------------------------------------------------------------------------------------


class TestEndToEnd:
    def test_ssh_and_http_through_the_bundled_proxy(self, world, sshd):
        """OpenTunnel(SSH, HTTP) ends with an ssh command and an HTTP page through the agent."""
        agent = world.agent()

        tunnel = world.open(["SSH", "HTTP"])
        world.wait_connected(tunnel["tunnelId"])
        source = world.source(tunnel["sourceAccessToken"], ["SSH", "HTTP"])
        ssh = ssh_run(sshd, source.port("SSH"))
        body = http_get(source.port("HTTP"))
        status = subprocess.run(
            [sys.executable, "-m", "agent", "status", "--runtime-dir", str(agent.runtime)],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
        (started,) = agent.events("tunnel_started")
        cmdlines = all_cmdlines()

        assert ssh.returncode == 0, ssh.stderr
        assert ssh.stdout.decode().split() == ["tunnel-ok", "Linux"]
        assert hashlib.sha256(body).digest() == hashlib.sha256(PAGE).digest()
        assert started["services"] == ["SSH", "HTTP"]
        assert status.returncode == 0
        assert "SSH,HTTP" in status.stdout
        assert tunnel["destinationAccessToken"].encode() not in cmdlines
        assert tunnel["sourceAccessToken"].encode() not in cmdlines
        assert tunnel["destinationAccessToken"] not in agent.text

    def test_tokens_in_no_proc_environ_or_cmdline(self, world):
        """While tunnels run, no /proc/*/environ or /proc/*/cmdline holds a destination token."""
        agent = world.agent()
        tunnels = [world.open(["SSH"]), world.open(["HTTP"])]
        for tunnel in tunnels:
            world.wait_connected(tunnel["tunnelId"])
        store = world.emulator.store
        secrets = [t["destinationAccessToken"].encode() for t in tunnels]
        secrets += [store.get(t["tunnelId"]).destination.client_token.encode() for t in tunnels]
        dumps = all_proc_files("environ") + all_proc_files("cmdline")
        proxies = agent.proxy_pids()

        assert len(proxies) == 2
        assert all(len(secret) >= 32 for secret in secrets)  # both bound: the scan means something
        # The scan can see the proxies' environments (same user): it would find a token there.
        assert all(Path(f"/proc/{pid}/environ").read_bytes() for pid in proxies)
        for secret in secrets:
            assert not any(secret in dump for dump in dumps)

    def test_external_binary_path(self, world, sshd, tmp_path):
        """proxy.binary = a path: the agent runs it, with the CA file made a hashed directory."""
        record = tmp_path / "wrapper-argv"
        wrapper = tmp_path / "localproxy-wrapper"
        wrapper.write_text(
            f'#!/bin/sh\nprintf \'%s\\n\' "$0" "$@" > {record}\n'
            f'[ -n "$AWSIOT_TUNNEL_ACCESS_TOKEN" ] && echo env-token-present >> {record}\n'
            f'exec {sys.executable} -m agent.proxy "$@"\n'
        )
        wrapper.chmod(0o755)
        agent = world.agent("--proxy-binary", str(wrapper))

        tunnel = world.open(["SSH"])
        world.wait_connected(tunnel["tunnelId"])
        source = world.source(tunnel["sourceAccessToken"], ["SSH"])
        ssh = ssh_run(sshd, source.port("SSH"))
        lines = record.read_text().splitlines()

        assert ssh.returncode == 0, ssh.stderr
        assert lines[0] == str(wrapper)
        assert lines[1:5] == ["-d", f"SSH={sshd.port}", "-e", world.emulator.relay_endpoint]
        assert lines[-1] == "env-token-present"
        assert tunnel["destinationAccessToken"] not in record.read_text()
        assert agent.events("tunnel_started")[0]["pid"] > 0
        capath = Path(lines[lines.index("-c") + 1])
        ca_hash = subject_hash(pem_certificates(world.emulator.ca_file.read_bytes())[0])
        assert capath.parent == agent.runtime / "ca"
        assert [p.name for p in capath.iterdir()] == [f"{ca_hash}.0"]
        assert "-k" not in lines
        assert agent.wait_event("proxy_connected")
        assert agent.status()["tunnels"][0]["connected"] is True

    def test_proxy_sigkill_restarted_and_works_again(self, world, sshd):
        """A destination proxy killed with SIGKILL is restarted; ssh works through it again."""
        agent = world.agent()
        tunnel = world.open(["SSH"])
        world.wait_connected(tunnel["tunnelId"])
        source = world.source(tunnel["sourceAccessToken"], ["SSH"])
        port = source.port("SSH")
        before = ssh_run(sshd, port)
        (pid,) = agent.proxy_pids()

        os.kill(pid, signal.SIGKILL)
        agent.wait_event("proxy_restarted")
        wait_until(lambda: agent.proxy_pids() and agent.proxy_pids()[0] != pid, what="new pid")
        world.wait_connected(tunnel["tunnelId"])
        after = wait_until(
            lambda: (r := ssh_run(sshd, port)).returncode == 0 and r, 20, "ssh again"
        )

        assert before.returncode == 0, before.stderr
        assert after.stdout.decode().split() == ["tunnel-ok", "Linux"]
        assert agent.events("proxy_exited")[0]["returncode"] == -signal.SIGKILL
        assert agent.status()["tunnels"][0]["restarts"] == 1
        assert not alive(pid)

    def test_close_tunnel_ends_the_proxy(self, world):
        """CloseTunnel closes the WebSocket; the proxy exits 0 and is not restarted."""
        agent = world.agent()
        tunnel = world.open(["SSH"])
        world.wait_connected(tunnel["tunnelId"])
        (pid,) = agent.proxy_pids()

        world.client.close_tunnel(tunnelId=tunnel["tunnelId"])
        (ended,) = agent.wait_event("tunnel_ended")
        time.sleep(0.5)

        assert ended["reason"] == "ended"
        assert agent.events("proxy_exited")[0]["returncode"] == 0
        assert agent.events("proxy_restarted") == []
        assert agent.status()["tunnels"] == []
        assert not alive(pid)

    def test_rotation_starts_a_new_proxy(self, world, sshd):
        """RotateTunnelAccessToken(DESTINATION) starts a new proxy; the old one exits 0."""
        agent = world.agent()
        tunnel = world.open(["SSH"])
        world.wait_connected(tunnel["tunnelId"])
        (old,) = agent.proxy_pids()

        rotated = world.client.rotate_tunnel_access_token(
            tunnelId=tunnel["tunnelId"],
            clientMode="ALL",
            destinationConfig={"thingName": world.thing, "services": ["SSH"]},
        )
        agent.wait_event("tunnel_started", 2)
        agent.wait_event("tunnel_ended")
        world.wait_connected(tunnel["tunnelId"])
        source = world.source(rotated["sourceAccessToken"], ["SSH"])
        ssh = ssh_run(sshd, source.port("SSH"))

        assert ssh.returncode == 0, ssh.stderr
        assert agent.events("tunnel_ended")[0]["reason"] == "ended"
        assert agent.proxy_pids() != [old]
        assert len(agent.proxy_pids()) == 1


class TestAgentLifecycle:
    def test_sigterm_exits_0_within_5s_no_child_left(self, world):
        """SIGTERM with a running tunnel: exit 0 within 5 s, MQTT disconnected, no child left."""
        agent = world.agent()
        tunnel = world.open(["SSH"])
        world.wait_connected(tunnel["tunnelId"])
        pids = agent.proxy_pids()
        started = time.monotonic()

        code = agent.terminate(timeout=10)
        elapsed = time.monotonic() - started

        assert code == 0
        assert elapsed < 5
        assert pids
        assert not any(alive(p) for p in pids)
        assert agent.events("mqtt_disconnected")
        assert agent.events("tunnel_ended")[0]["reason"] == "shutdown"

    def test_sigkill_leaves_no_proxy(self, world):
        """A kill -9 of the agent takes every proxy with it (PR_SET_PDEATHSIG)."""
        agent = world.agent()
        first = world.open(["SSH"])
        second = world.open(["HTTP"])
        world.wait_connected(first["tunnelId"])
        world.wait_connected(second["tunnelId"])
        pids = wait_until(
            lambda: len(agent.proxy_pids()) == 2 and agent.proxy_pids(), what="2 proxies"
        )

        agent.process.kill()
        agent.process.wait()
        wait_until(lambda: not any(alive(p) for p in pids), 5, "proxies gone")

        assert not any(alive(p) for p in pids)
