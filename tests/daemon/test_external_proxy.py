"""
An external proxy binary under a real agent process: CA directory, log levels, no-connect report.

The stand-in binary behaves as the AWS localproxy does where it matters here: it takes
``-c`` as a hashed CA *directory* only (an OpenSSL ``capath``), verifies the TLS server at
``-e`` with it, prints the AWS log format, and retries a failed handshake forever.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.cli import main
from agent.daemon.capath import pem_certificates, subject_hash
from agent.daemon.lifecycle import spawn_config_from
from agent.daemon.settings import load_settings
from agent.emulator.pki import CertificateAuthority, KeyPair
from tests.fakes import MS, notification, send_datagram


TOKEN = "AQGAAXiSecretTunnelAccessToken_external_0123456789"
FAKE_AWS_PROXY = """#!python
# Stands in for the AWS localproxy: -c must be a hashed CA directory.
import datetime, json, os, socket, ssl, sys, time

args = sys.argv[1:]
options = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("-")}
record = os.environ["FAKE_RECORD_DIR"] + f"/run-{os.getpid()}.json"
with open(record, "w") as file:
    json.dump({"argv": sys.argv, "pid": os.getpid()}, file)


def say(level, message):
    stamp = datetime.datetime.now().isoformat(timespec="microseconds")
    print(f"[{stamp}]{{{os.getpid()}}}" + f"[{level}]".ljust(9) + " " + message, flush=True)


say("info", "Starting proxy in destination mode")
say("warning", "No web proxy configured, connecting directly")
host, port = options["-e"].rsplit(":", 1)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
# load_verify_locations(capath=) is what boost::asio add_verify_path does: lookup by hash.
context.load_verify_locations(capath=options["-c"])
while True:
    try:
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                pass
    except (ssl.SSLError, OSError) as exc:
        token = os.environ.get("AWSIOT_TUNNEL_ACCESS_TOKEN", "") if os.environ.get("ECHO") else ""
        say("error", f"Could not perform SSL handshake with proxy server: {exc} {token}".strip())
        time.sleep(0.1)
        continue
    say("info", "Web socket session ID: 12871efffedc21d9")
    say("info", f"Successfully established websocket connection with proxy server: wss://{host}:{port}")
    while True:
        time.sleep(3600)
"""


class TlsServer:
    """Accepts TLS handshakes on 127.0.0.1 with a certificate for localhost, until closed."""

    def __init__(self, pair: KeyPair) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pair.cert, pair.key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handshakes = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with contextlib.suppress(ssl.SSLError, OSError), conn:
                self.context.wrap_socket(conn, server_side=True).close()
                self.handshakes += 1

    def close(self) -> None:
        self.listener.close()


class Agent:
    """A real agent process (SocketNotificationSource) running the stand-in binary."""

    def __init__(self, tmp_path: Path, *, ca: Path, port: int) -> None:
        self.runtime = tmp_path / "run"
        self.records = tmp_path / "records"
        self.records.mkdir()
        binary = tmp_path / "localproxy"
        binary.write_text(FAKE_AWS_PROXY.replace("#!python", f"#!{sys.executable}", 1))
        binary.chmod(0o755)
        self.socket = tmp_path / "notify.sock"
        config = tmp_path / "config.toml"
        config.write_text(
            f'thing_name = "dev-1"\nnotify = "greengrass"\nruntime_dir = "{self.runtime}"\n'
            "[services]\nSSH = 22\n"
            f'[proxy]\nbinary = "{binary}"\nca = "{ca}"\nendpoint = "localhost:{port}"\n'
            'connect_timeout = "1s"\nstop_grace = 1.0\n'
            f'extra_env = {{FAKE_RECORD_DIR = "{self.records}", ECHO = "1"}}\n'
            f'[tunnels]\nstate_dir = "{tmp_path}/state"\n'
        )
        self.log = tmp_path / "agent.log"
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes", "agent", str(config), str(self.socket)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[2],
        )
        self.wait_until(lambda: self.events("agent_started"))

    def events(self, name: str) -> list[dict]:
        found = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    def wait_until(self, predicate, timeout: float = 15_000 * MS) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timeout; log:\n{self.log.read_text()}")
            time.sleep(20 * MS)

    def runs(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.records.glob("run-*.json"))]

    def status(self, *flags: str) -> str:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["status", "--runtime-dir", str(self.runtime), *flags]) == 0
        return out.getvalue()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for run in self.runs():
            with contextlib.suppress(ProcessLookupError):
                os.kill(run["pid"], signal.SIGKILL)
        self._log_file.close()


@pytest.fixture
def pki(tmp_path):
    """The CA that signed the server, and an unrelated one."""
    signer = CertificateAuthority(tmp_path / "pki", common_name="Data Plane Test CA")
    signer.load_or_create()
    pair = signer.issue_server(
        KeyPair(tmp_path / "server.pem", tmp_path / "server.key"), hosts=["localhost"]
    )
    other = CertificateAuthority(tmp_path / "other", common_name="Some Other CA")
    other.load_or_create()
    server = TlsServer(pair)
    yield signer.cert_file, other.cert_file, server
    server.close()


@pytest.fixture
def agent(tmp_path):
    made: list[Agent] = []

    def factory(**kwargs) -> Agent:
        made.append(Agent(tmp_path, **kwargs))
        return made[-1]

    yield factory
    for item in made:
        item.close()


class TestExternalBinary:
    def test_ca_file_becomes_a_directory_it_can_verify_with(self, agent, pki):
        """Given the CA *file*, the binary gets -c <hashed dir>, verifies TLS and connects."""
        ca_file, _, server = pki
        a = agent(ca=ca_file, port=server.port)

        send_datagram(a.socket, notification(TOKEN))
        a.wait_until(lambda: a.events("proxy_connected"))
        [run] = a.runs()
        argv = run["argv"]
        directory = Path(argv[argv.index("-c") + 1])
        document = json.loads(a.status("--json"))
        table = a.status()

        expected = subject_hash(pem_certificates(ca_file.read_bytes())[0])
        assert directory.parent == a.runtime / "ca"
        assert [p.name for p in directory.iterdir()] == [f"{expected}.0"]
        assert server.handshakes >= 1
        [tunnel] = document["tunnels"]
        assert tunnel["connected"] is True
        assert tunnel["last_error"] is None
        assert " yes" in table.splitlines()[-1]
        assert a.events("proxy_not_connected") == []

    def test_not_connected_in_time_is_reported(self, agent, pki, tmp_path):
        """A binary that cannot verify the server: warning, status connected false + its error."""
        _, wrong_ca, server = pki
        a = agent(ca=wrong_ca, port=server.port)

        send_datagram(a.socket, notification(TOKEN))
        a.wait_until(lambda: a.events("proxy_not_connected"))
        a.wait_until(lambda: json.loads(a.status("--json"))["tunnels"][0]["connected"] is False)
        document = json.loads(a.status("--json"))
        table = a.status()
        [warning] = a.events("proxy_not_connected")
        outputs = a.events("proxy_output")
        log_text = a.log.read_text()

        [tunnel] = document["tunnels"]
        assert tunnel["state"] == "running"
        assert "certificate verify failed" in tunnel["last_error"]
        assert tunnel["last_error"].endswith("**********")
        assert warning["level"] == "warning"
        assert warning["timeout"] == 1.0
        assert "certificate verify failed" in warning["last_error"]
        assert "NO" in table
        assert "last error: Could not perform SSL handshake" in table
        by_level = {e["level"] for e in outputs if "SSL handshake" in e["line"]}
        assert by_level == {"error"}
        assert [e["level"] for e in outputs if "web proxy" in e["line"]] == ["warning"]
        assert [e["level"] for e in outputs if "Starting proxy" in e["line"]] == ["info"]
        # The token echoed by the binary reaches neither the log nor the status file.
        assert TOKEN not in log_text
        assert TOKEN not in (a.runtime / "status.dev-1.json").read_text()
        assert TOKEN not in table

    def test_check_config_warns(self, tmp_path, pki, capsys):
        """check-config: ok, plus one warning line saying what the agent will do at start."""
        ca_file, _, _ = pki
        binary = tmp_path / "localproxy"
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
        config = tmp_path / "config.toml"
        base = f'thing_name = "dev-1"\nnotify = "greengrass"\nruntime_dir = "{tmp_path}/rt"\n'
        config.write_text(base + f'[proxy]\nbinary = "{binary}"\nca = "{ca_file}"\n')

        code = main(["check-config", "--config", str(config)])
        captured = capsys.readouterr()
        config.write_text(base + f'[proxy]\nca = "{ca_file}"\n')
        bundled_code = main(["check-config", "--config", str(config)])
        bundled = capsys.readouterr()

        assert code == 0
        assert captured.out.startswith("configuration ok")
        [line] = captured.err.splitlines()
        assert line.startswith(f"tunnel-agent: warning: proxy.ca = '{ca_file}' is a file")
        assert "hashed CA directory" in line
        assert f"{tmp_path}/rt/ca/" in line
        assert not (tmp_path / "rt").exists()  # checking makes nothing
        assert (bundled_code, bundled.err) == (0, "")

    def test_check_config_refuses_unusable_ca_file(self, tmp_path, capsys):
        """An external binary with a CA file holding no certificate: exit 78, one clear line."""
        binary = tmp_path / "localproxy"
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
        ca = tmp_path / "ca.pem"
        ca.write_text("not a certificate\n")
        config = tmp_path / "config.toml"
        config.write_text(
            f'thing_name = "dev-1"\nnotify = "greengrass"\n'
            f'[proxy]\nbinary = "{binary}"\nca = "{ca}"\n'
        )

        code = main(["check-config", "--config", str(config)])

        assert code == 78
        assert (
            f"proxy.ca = '{ca}': no PEM certificate (-----BEGIN CERTIFICATE-----) in the file"
            in capsys.readouterr().err
        )

    def test_run_refuses_unusable_ca_file(self, tmp_path):
        """`run` stops at start, exit 78 (systemd does not restart it), naming the file."""
        binary = tmp_path / "localproxy"
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
        ca = tmp_path / "ca.pem"
        ca.write_text("-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n")
        config = tmp_path / "config.toml"
        config.write_text(
            f'thing_name = "dev-1"\nnotify = "greengrass"\nruntime_dir = "{tmp_path}/rt"\n'
            f'[proxy]\nbinary = "{binary}"\nca = "{ca}"\n'
        )

        result = subprocess.run(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=Path(__file__).parents[2],
        )

        assert result.returncode == 78, result.stderr
        assert (
            f"proxy.ca = '{ca}': not a valid PEM certificate (damaged or truncated)"
            in result.stderr
        )
        assert not (tmp_path / "rt" / "ca").exists()


class TestSpawnConfig:
    @pytest.mark.parametrize("kind", ["bundled", "external", "external_with_directory"])
    def test_ca_passed_as(self, tmp_path, pki, kind):
        """Bundled: the file as it is. External: a hashed directory, unless given one."""
        ca_file, _, _ = pki
        ca = tmp_path / "pki" if kind == "external_with_directory" else ca_file
        binary = "bundled" if kind == "bundled" else str(tmp_path / "localproxy")
        settings = load_settings(
            None,
            {
                "thing_name": "dev-1",
                "notify": "greengrass",
                "runtime_dir": str(tmp_path / "rt"),
                "proxy": {"binary": binary, "ca": str(ca), "connect_timeout": "2m"},
            },
        )

        options = spawn_config_from(settings)

        assert options.connect_timeout == 120.0
        if kind == "external":
            assert options.ca is not None
            assert options.ca.parent == tmp_path / "rt" / "ca"
        else:
            assert options.ca == ca
            assert not (tmp_path / "rt").exists()
