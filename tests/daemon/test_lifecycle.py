"""Tests for agent.daemon.lifecycle: signals, systemd notify, status, and a real agent process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from agent.daemon.lifecycle import (
    Daemon,
    build_daemon,
    build_source,
    limits_from,
    spawn_config_from,
)
from agent.daemon.sdnotify import SdNotifier
from agent.daemon.settings import load_settings
from agent.daemon.status import StatusFile
from agent.daemon.tunnels import Limits, SpawnConfig, TunnelManager
from agent.emulator.broker import notify_topic
from agent.exceptions import ConfigError
from agent.notify.mqtt import MqttNotificationSource
from tests.emulator import fixtures
from tests.fakes import (
    MS,
    FakeNotificationSource,
    FakeProxyLauncher,
    all_cmdlines,
    notification,
    read_runs,
    send_datagram,
    wait_for,
    write_fake_proxy,
)


SERVICES = {"SSH": "22", "HTTP": "127.0.0.1:8080"}
broker = fixtures.broker
mqtt_pki = fixtures.mqtt_pki
json_documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=4)
    ),
    max_leaves=10,
)
TOKEN = "AQGAAXiSecretTunnelAccessToken_0123456789"
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))


@pytest.fixture
def sd_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.setblocking(False)  # noqa: FBT003 - socket API
    yield sock, path
    sock.close()


def received(sock: socket.socket) -> list[str]:
    messages = []
    with contextlib.suppress(BlockingIOError):
        while True:
            messages.append(sock.recv(4096).decode())
    return messages


class Harness:
    """A Daemon over fakes, running as a task of the test's loop."""

    def __init__(
        self,
        tmp_path: Path,
        notify_path: Path | None = None,
        watchdog=None,
        reload=None,
        launcher: FakeProxyLauncher | None = None,
    ):
        self.source = FakeNotificationSource()
        self.launcher = launcher or FakeProxyLauncher()
        self.status = StatusFile(tmp_path / "run", thing_name="dev-1")
        self.manager = TunnelManager(
            launcher=self.launcher,
            services=SERVICES,
            limits=Limits(),
            options=SpawnConfig(command=("lp",)),
            on_change=lambda: self.daemon.changed(),  # noqa: PLW0108 - daemon made below
        )
        self.daemon = Daemon(
            source=self.source,
            manager=self.manager,
            status=self.status,
            reload=reload,
            notifier=SdNotifier(str(notify_path)) if notify_path else None,
            watchdog=watchdog,
        )
        self.task: asyncio.Task[int] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.daemon.run())
        await wait_for(lambda: self.source.entered)

    async def stop(self) -> int:
        assert self.task is not None
        self.daemon.request_stop()
        return await asyncio.wait_for(self.task, 5)


@pytest.fixture
async def harness(tmp_path):
    made: list[Harness] = []

    def factory(**kwargs) -> Harness:
        made.append(Harness(tmp_path, **kwargs))
        return made[-1]

    yield factory
    for item in made:
        if item.task is not None and not item.task.done():
            await item.stop()


class TestNotifications:
    async def test_valid_starts_tunnel(self, harness, capture):
        """A valid notification starts one proxy; the status file lists it (0600)."""
        h = harness()
        await h.start()

        h.source.publish(notification(TOKEN, ["SSH", "HTTP"]))
        await wait_for(lambda: h.launcher.proxies and h.manager.tunnels()[0].pid)
        document = json.loads(h.status.path.read_text())

        assert h.launcher.proxies[0].spec.argv[1:3] == ("-d", "SSH=22,HTTP=127.0.0.1:8080")
        assert document["tunnels"][0]["services"] == ["SSH", "HTTP"]
        assert document["tunnels"][0]["pid"] == h.launcher.proxies[0].pid
        assert h.status.path.stat().st_mode & 0o777 == 0o600
        assert capture.named("notification_received")[0]["size"] == len(
            notification(TOKEN, ["SSH", "HTTP"])
        )
        assert TOKEN not in capture.text

    @pytest.mark.parametrize(
        ("payload", "reason"),
        [
            (notification(TOKEN, ["SSH", "RDP"]), "services[1] is not in the services map"),
            (notification(TOKEN, mode="source"), "clientMode is not 'destination' (6 characters"),
            (notification(TOKEN, region="evil.example"), "region does not look like an AWS region"),
            (b'{"clientAccessToken": ', "payload is not valid JSON"),
            (b"{" + b" " * 1_000_000 + b"}", "payload is 1000002 bytes, more than 16384"),
        ],
    )
    async def test_invalid_dropped(self, harness, capture, payload, reason):
        """Invalid notifications are logged without the token and dropped; the daemon lives on."""
        h = harness()
        await h.start()

        h.source.publish(payload)
        await wait_for(lambda: capture.named("notification_rejected"))
        h.source.publish(notification(TOKEN))
        await wait_for(lambda: h.launcher.proxies)

        assert capture.named("notification_rejected")[0]["reason"].startswith(reason)
        assert len(h.launcher.proxies) == 1
        assert TOKEN not in capture.text

    async def test_handler_error_survived(self, harness, capture, monkeypatch):
        """An unexpected error while handling one notification is logged; the next is handled."""
        h = harness()
        await h.start()
        original = h.manager.open
        calls = []

        async def flaky(request):
            calls.append(request)
            if len(calls) == 1:
                raise RuntimeError("bug")
            return await original(request)

        monkeypatch.setattr(h.manager, "open", flaky)
        h.source.publish(notification("first-token-0123456789"))
        h.source.publish(notification("second-token-0123456789"))
        await wait_for(lambda: h.launcher.proxies)

        assert (
            capture.named("notification_handling_failed")[0]["exception"][0]["exc_value"] == "bug"
        )
        assert (
            h.launcher.proxies[0].spec.env["AWSIOT_TUNNEL_ACCESS_TOKEN"]
            == "second-token-0123456789"
        )


class GatedLauncher(FakeProxyLauncher):
    """A fake launcher whose launches wait for ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.waiting = 0

    async def launch(self, spec, *, log, on_change=None):
        self.waiting += 1
        await self.gate.wait()
        return await super().launch(spec, log=log)


class TestAcknowledgement:
    async def test_acknowledged_once_the_proxy_started(self, harness):
        """A valid notification is acknowledged only after its proxy was launched."""
        h = harness(launcher=GatedLauncher())
        await h.start()

        h.source.publish(notification(TOKEN))
        await wait_for(lambda: h.launcher.waiting)
        await asyncio.sleep(50 * MS)
        before = list(h.source.acked)
        h.launcher.gate.set()
        await wait_for(lambda: h.source.acked)

        assert before == []
        assert h.source.acked == [notification(TOKEN)]
        assert len(h.launcher.proxies) == 1

    async def test_every_final_outcome_is_acknowledged(self, harness, capture):
        """Started, duplicate, unknown service, invalid, over the limit: each acknowledged."""
        h = harness()
        h.manager.reconfigure(services=SERVICES, limits=Limits(max_concurrent=1))
        await h.start()
        payloads = [
            notification(TOKEN, ["SSH"]),
            notification(TOKEN, ["SSH"]),
            notification(TOKEN, ["RDP"]),
            b"not json",
            notification("another-token-0123456789", ["HTTP"]),
        ]

        for payload in payloads:
            h.source.publish(payload)
        await wait_for(lambda: len(h.source.acked) == len(payloads))
        outcomes = [e["outcome"] for e in capture.named("notification_handled")]

        assert h.source.acked == payloads
        assert outcomes == ["started", "duplicate", "refused_limit"]
        assert len(capture.named("notification_rejected")) == 2
        assert len(h.launcher.proxies) == 1

    async def test_handler_error_is_acknowledged(self, harness, capture, monkeypatch):
        """A notification whose handling raised is acknowledged: no endless redelivery."""
        h = harness()
        await h.start()

        async def broken(_request):
            raise RuntimeError("bug")

        monkeypatch.setattr(h.manager, "open", broken)
        h.source.publish(notification(TOKEN))
        await wait_for(lambda: h.source.acked)

        assert capture.named("notification_handling_failed")
        assert h.source.acked == [notification(TOKEN)]

    async def test_not_acknowledged_when_stopped_mid_handling(self, harness):
        """A stop while the proxy is still being launched leaves the notification unacknowledged."""
        h = harness(launcher=GatedLauncher())
        await h.start()
        h.source.publish(notification(TOKEN))
        await wait_for(lambda: h.launcher.waiting)

        code = await h.stop()

        assert code == 0
        assert h.source.acked == []


class TestRedelivery:
    async def test_redelivery_of_a_handled_notification_is_a_duplicate(
        self, broker, mqtt_pki, tmp_path, capture
    ):
        """Handled while the connection dropped: the broker's copy is ignored, then acknowledged."""
        pair = mqtt_pki.thing("thing1")

        def source() -> MqttNotificationSource:
            return MqttNotificationSource(
                thing_name="thing1",
                endpoint="127.0.0.1",
                port=broker.port,
                cert=pair.cert,
                key=pair.key,
                ca=mqtt_pki.ca_file,
                min_reconnect_delay=0.05,
                max_reconnect_delay=0.5,
            )

        mqtt = source()
        launcher = GatedLauncher()
        manager = TunnelManager(
            launcher=launcher, services=SERVICES, limits=Limits(), options=SpawnConfig(("lp",))
        )
        daemon = Daemon(source=mqtt, manager=manager, status=StatusFile(tmp_path, thing_name="t"))
        task = asyncio.create_task(daemon.run())
        await wait_for(lambda: mqtt.subscribed)
        async with fixtures.mqtt_client(mqtt_pki, broker.port, mqtt_pki.admin, "svc") as svc:
            await svc.publish(notify_topic("thing1"), notification(TOKEN))
        await wait_for(lambda: launcher.waiting)

        await broker.restart()  # the notification is being handled, not yet acknowledged
        await wait_for(lambda: mqtt.connections == 2 and mqtt.waiting == 1, timeout=10)
        launcher.gate.set()
        await wait_for(lambda: len(capture.named("notification_handled")) == 2)
        await wait_for(lambda: mqtt.unacknowledged == 0)
        await asyncio.sleep(0.2)  # the PUBACK on its way to the broker
        daemon.request_stop()
        assert await asyncio.wait_for(task, 10) == 0
        async with source() as later:
            await asyncio.sleep(0.5)
            left = later.waiting

        assert [e["outcome"] for e in capture.named("notification_handled")] == [
            "started",
            "duplicate",
        ]
        assert len(launcher.proxies) == 1
        assert left == 0


class TestLifecycle:
    async def test_sigterm_graceful(self, harness, sd_socket, capture):
        """SIGTERM stops taking notifications, stops proxies, closes the source, exits 0."""
        sock, path = sd_socket
        h = harness(notify_path=path)
        await h.start()
        h.source.publish(notification(TOKEN))
        await wait_for(lambda: h.launcher.proxies)
        started = time.monotonic()

        os.kill(os.getpid(), signal.SIGTERM)
        code = await asyncio.wait_for(h.task, 5)
        messages = received(sock)

        assert code == 0
        assert time.monotonic() - started < 5
        assert h.launcher.proxies[0].stopped
        assert h.source.exited == 1
        assert not h.status.path.exists()
        assert "READY=1" in messages
        assert "STOPPING=1\nSTATUS=stopping" in messages
        assert "STATUS=running: 1 active tunnel(s)" in messages
        assert capture.named("tunnel_ended")[0]["reason"] == "shutdown"
        assert capture.named("agent_stopped")

    async def test_sigint_graceful(self, harness):
        """SIGINT behaves as SIGTERM."""
        h = harness()
        await h.start()

        os.kill(os.getpid(), signal.SIGINT)

        assert await asyncio.wait_for(h.task, 5) == 0

    async def test_stop_while_connecting(self, harness):
        """A stop request while the source is still connecting exits at once with 0."""
        h = harness()
        h.source.block_enter = True
        h.task = asyncio.create_task(h.daemon.run())
        await asyncio.sleep(20 * MS)

        h.daemon.request_stop()

        assert await asyncio.wait_for(h.task, 2) == 0
        assert h.source.exited == 0

    async def test_source_failure_on_enter(self, harness, capture):
        """A source that cannot start makes run() return 1."""
        h = harness()
        h.source.fail_on_enter = OSError("broker unreachable")

        code = await asyncio.wait_for(h.daemon.run(), 5)

        assert code == 1
        assert "broker unreachable" in capture.named("notification_source_failed")[0]["error"]

    async def test_source_closed(self, harness, capture):
        """A source that ends by itself makes run() stop the proxies and return 1."""
        h = harness()
        await h.start()
        h.source.publish(notification(TOKEN))
        await wait_for(lambda: h.launcher.proxies)

        h.source.close()
        code = await asyncio.wait_for(h.task, 5)

        assert code == 1
        assert h.launcher.proxies[0].stopped
        assert capture.named("notification_source_closed")

    async def test_watchdog(self, harness, sd_socket):
        """WATCHDOG=1 is sent at the configured interval."""
        sock, path = sd_socket
        h = harness(notify_path=path, watchdog=30 * MS)
        await h.start()

        await asyncio.sleep(200 * MS)
        pings = [m for m in received(sock) if m == "WATCHDOG=1"]

        assert 3 <= len(pings) <= 10


class TestReload:
    async def test_sighup_reloads_keeping_tunnels(self, harness, capture):
        """SIGHUP applies a new services map and limits; running tunnels continue."""
        h = harness(reload=lambda: ({"VNC": "5900"}, Limits(max_concurrent=2)))
        await h.start()
        h.source.publish(notification(TOKEN))
        await wait_for(lambda: h.launcher.proxies)

        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: capture.named("tunnels_reconfigured"))
        h.source.publish(notification("another-token-0123456789", ["VNC"]))
        await wait_for(lambda: len(h.launcher.proxies) == 2)

        assert h.launcher.proxies[0].returncode is None
        assert h.manager.services == {"VNC": "5900"}
        assert h.manager.limits.max_concurrent == 2

    async def test_bad_reload_keeps_old(self, harness, capture):
        """A reload that fails validation is logged and the old settings stay."""

        def broken():
            raise ConfigError("services.SSH = 0: port must be an integer between 1 and 65535")

        h = harness(reload=broken)
        await h.start()

        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: capture.named("config_reload_failed"))

        assert h.manager.services == SERVICES
        assert "port must be" in capture.named("config_reload_failed")[0]["error"]


class TestWiring:
    def settings(self, tmp_path, **overrides):
        path = tmp_path / "c.toml"
        path.write_text(
            'thing_name = "dev-1"\nnotify = "mqtt"\n[services]\nSSH = 22\n'
            '[mqtt]\nendpoint = "127.0.0.1"\nport = 1883\ncert = "/c"\nkey = "/k"\n'
            '[proxy]\nendpoint = "127.0.0.1:8443"\nno_verify = true\nmax_restarts = 2\n'
            'extra_env = {A = "b"}\n'
            '[limits]\nmax_tunnel_lifetime = "30m"\non_limit = "stop_oldest"\n'
            f'[tunnels]\nstate_dir = "{tmp_path / "state"}"\n'
        )
        return load_settings(path, overrides)

    def test_plain_values_passed_down(self, tmp_path):
        """Settings become plain keyword values for the manager."""
        settings = self.settings(tmp_path, mqtt={"http_proxy": "http://p:3128"})

        limits = limits_from(settings)
        options = spawn_config_from(settings)

        assert limits == Limits(max_concurrent=10, max_lifetime=1800.0, on_limit="stop_oldest")
        assert options.command == (sys.executable, "-m", "agent.proxy")
        assert options.endpoint == "127.0.0.1:8443"
        assert options.no_verify is True
        assert options.max_restarts == 2
        assert options.extra_env == {"A": "b"}
        assert options.http_proxy == "http://p:3128"

    def test_build_source_mqtt(self, tmp_path):
        """notify=mqtt builds the MQTT source from [mqtt] without connecting."""
        source = build_source(self.settings(tmp_path))

        assert isinstance(source, MqttNotificationSource)
        assert source.topic == "$aws/things/dev-1/tunnels/notify"
        assert source.client_id == "dev-1"

    async def test_build_daemon(self, tmp_path, sd_socket):
        """build_daemon wires source, launcher, status dir and systemd from settings and env."""
        _, path = sd_socket
        settings = self.settings(tmp_path, runtime_dir=str(tmp_path / "rt"))
        source = FakeNotificationSource()
        launcher = FakeProxyLauncher()
        reloaded = self.settings(tmp_path, services={"VNC": "5900"})
        daemon = build_daemon(
            settings,
            reload=lambda: reloaded,
            source=source,
            launcher=launcher,
            environ={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"},
        )
        task = asyncio.create_task(daemon.run())
        await wait_for(lambda: source.entered)
        source.publish(notification(TOKEN))
        await wait_for(lambda: launcher.proxies)
        daemon.request_reload()
        services = dict(daemon._manager.services)
        daemon.request_stop()
        code = await asyncio.wait_for(task, 5)

        assert code == 0
        assert launcher.proxies[0].spec.argv[3:] == ("-d", "SSH=22", "-e", "127.0.0.1:8443", "-k")
        assert services == {"SSH": "22", "VNC": "5900"}
        assert daemon._watchdog == 0.5


# ---------------------------------------------------------------------------
# A real agent process: real SubprocessLauncher, real children, real signals.


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


class AgentProcess:
    def __init__(self, tmp_path: Path, *, echo_token: bool = True) -> None:
        self.dir = tmp_path
        self.proxy_dir = tmp_path / "proxy"
        binary = write_fake_proxy(self.proxy_dir)
        self.socket = tmp_path / "notify-in.sock"
        self.runtime = tmp_path / "run"
        self.config = tmp_path / "config.toml"
        echo = ', FAKE_PROXY_ECHO_TOKEN = "1"' if echo_token else ""
        self.config.write_text(
            f'thing_name = "dev-1"\nnotify = "greengrass"\nruntime_dir = "{self.runtime}"\n'
            '[services]\nSSH = 22\nHTTP = "127.0.0.1:8080"\n'
            f'[proxy]\nbinary = "{binary}"\nstop_grace = 1.0\n'
            f"restart_backoff_initial = 0.05\nrestart_backoff_max = 0.2\n"
            f'extra_env = {{FAKE_PROXY_DIR = "{self.proxy_dir}"{echo}}}\n'
            f'[tunnels]\nstate_dir = "{tmp_path / "state"}"\n'
        )
        self.log = tmp_path / "agent.log"
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes", "agent", str(self.config), str(self.socket)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[2],
        )

    def events(self, name: str | None = None) -> list[dict]:
        events = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return [e for e in events if name is None or e.get("event") == name]

    def count(self, name: str) -> int:
        """Count events by name without parsing every line (cheap on big logs)."""
        return self.log.read_text().count(f'"event": "{name}"')

    def wait_until(self, predicate, timeout: float = 10_000 * MS) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"agent exited {self.process.returncode}: {self.log.read_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"timeout; log:\n{self.log.read_text()}")
            time.sleep(10 * MS)

    def ready(self) -> None:
        self.wait_until(lambda: self.events("agent_started"))

    def send(self, payload: bytes) -> None:
        send_datagram(self.socket, payload)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for run in read_runs(self.proxy_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(run["pid"], signal.SIGKILL)
        self._log_file.close()


@pytest.fixture
def agent(tmp_path):
    made: list[AgentProcess] = []

    def factory(**kwargs) -> AgentProcess:
        made.append(AgentProcess(tmp_path, **kwargs))
        made[-1].ready()
        return made[-1]

    yield factory
    for item in made:
        item.close()


@pytest.mark.slow
class TestAgentProcess:
    def test_token_never_on_cmdline_or_in_logs(self, agent):
        """The token is in no /proc/*/cmdline and in no log line, though the proxy echoes it."""
        a = agent(echo_token=True)

        a.send(notification(TOKEN, ["SSH", "HTTP"]))
        a.wait_until(lambda: len(a.events("proxy_output")) >= 2)
        cmdlines = all_cmdlines()
        (run,) = read_runs(a.proxy_dir)

        assert run["env"]["AWSIOT_TUNNEL_ACCESS_TOKEN"] == TOKEN
        assert TOKEN.encode() not in cmdlines
        assert run["env"]["AWSIOT_TUNNEL_CLIENT_TOKEN"].encode() not in cmdlines
        assert TOKEN not in a.log.read_text()
        assert run["env"]["AWSIOT_TUNNEL_CLIENT_TOKEN"] not in a.log.read_text()
        assert "token is **********" in [e["line"] for e in a.events("proxy_output")]
        assert a.events("tunnel_started")[0]["thing_name"] == "dev-1"

    def test_sigterm_exit_0_no_child(self, agent):
        """SIGTERM: exit 0 within 5 s, the proxy got SIGTERM and no child is left."""
        a = agent()
        a.send(notification(TOKEN))
        a.wait_until(lambda: read_runs(a.proxy_dir))
        (run,) = read_runs(a.proxy_dir)
        a.wait_until((a.proxy_dir / f"ready-{run['pid']}").exists)
        started = time.monotonic()

        a.process.send_signal(signal.SIGTERM)
        code = a.process.wait(timeout=5)
        elapsed = time.monotonic() - started

        assert code == 0
        assert elapsed < 5
        assert not alive(run["pid"])
        assert (a.proxy_dir / f"term-{run['pid']}").exists()
        assert not (a.runtime / "status.dev-1.json").exists()

    def test_sigkill_no_orphan(self, agent):
        """SIGKILL of the agent leaves no proxy process behind."""
        a = agent()
        a.send(notification(TOKEN))
        a.send(notification("second-token-0123456789", ["HTTP"]))
        a.wait_until(lambda: len(read_runs(a.proxy_dir)) == 2)
        pids = [r["pid"] for r in read_runs(a.proxy_dir)]

        a.process.kill()
        a.process.wait()
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.01)

        assert not any(alive(p) for p in pids)

    def test_proxy_sigkill_restarted(self, agent):
        """A proxy killed with SIGKILL is restarted with the same tokens; status shows it."""
        a = agent()
        a.send(notification(TOKEN))
        a.wait_until(lambda: read_runs(a.proxy_dir))
        first = read_runs(a.proxy_dir)[0]

        os.kill(first["pid"], signal.SIGKILL)
        a.wait_until(lambda: len(read_runs(a.proxy_dir)) == 2)
        second = read_runs(a.proxy_dir)[1]
        a.wait_until(
            lambda: (
                json.loads((a.runtime / "status.dev-1.json").read_text())["tunnels"][0]["restarts"]
                == 1
            )
        )

        assert second["env"]["AWSIOT_TUNNEL_ACCESS_TOKEN"] == TOKEN
        assert (
            second["env"]["AWSIOT_TUNNEL_CLIENT_TOKEN"]
            == first["env"]["AWSIOT_TUNNEL_CLIENT_TOKEN"]
        )
        assert a.events("proxy_exited")[0]["returncode"] == -signal.SIGKILL

    def test_sighup_reload(self, agent):
        """SIGHUP re-reads the file: a new service becomes usable, the running proxy stays."""
        a = agent()
        a.send(notification(TOKEN))
        a.wait_until(lambda: read_runs(a.proxy_dir))
        a.config.write_text(
            a.config.read_text().replace("[services]\n", "[services]\nVNC = 5900\n")
        )

        a.process.send_signal(signal.SIGHUP)
        a.wait_until(lambda: a.events("tunnels_reconfigured"))
        a.send(notification("vnc-token-0123456789", ["VNC"]))
        a.wait_until(lambda: len(read_runs(a.proxy_dir)) == 2)

        assert alive(read_runs(a.proxy_dir)[0]["pid"])
        assert read_runs(a.proxy_dir)[1]["argv"][1:3] == ["-d", "VNC=5900"]

    def test_hostile_input_survived(self, agent):
        """Malformed, oversized and hostile payloads spawn nothing; the agent stays up."""
        a = agent()
        for payload in [
            b"\x00\xff" * 100,
            b"[" * 8000,
            notification(TOKEN, mode="source"),
            notification(TOKEN, ["RDP"]),
            notification(TOKEN, region="127.0.0.1:443"),
            b"{" + b" " * 60_000 + b"}",
        ]:
            a.send(payload)
        a.wait_until(lambda: len(a.events("notification_rejected")) == 6)

        assert read_runs(a.proxy_dir) == []
        assert a.process.poll() is None

    def test_random_payloads(self, agent):
        """Hypothesis payloads reach the real daemon: every one rejected, nothing spawned."""
        payloads: list[bytes] = []

        # 10,000 run against the pure parser (test_notification); generating them is the
        # slow part, so the process sees a 2,000 sample (FUZZ_EXAMPLES raises it).
        @settings(
            max_examples=FUZZ_EXAMPLES,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.binary(max_size=200) | json_documents.map(lambda d: json.dumps(d).encode()))
        def collect(payload: bytes) -> None:
            payloads.append(payload)

        collect()
        a = agent()

        for payload in payloads:
            a.send(payload)
        a.wait_until(lambda: a.count("notification_rejected") == len(payloads), 60)
        a.send(notification(TOKEN))
        a.wait_until(lambda: read_runs(a.proxy_dir))

        assert len(payloads) == FUZZ_EXAMPLES
        assert a.count("notification_handling_failed") == 0
        assert len(read_runs(a.proxy_dir)) == 1
        assert a.process.poll() is None
