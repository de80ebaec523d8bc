"""
Fixtures for integration tests: real relay, real proxies, real services on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.integration.dataplane import RelayThread, ThreadedServer, echo


if TYPE_CHECKING:
    from collections.abc import Iterator

PAGE = b"<html><body>" + hashlib.sha256(b"page").hexdigest().encode() * 2000 + b"</body></html>"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayThread]:
    """A TLS relay with its own store, in a background thread."""
    thread = RelayThread(tmp_path / "relay").start()
    try:
        yield thread
    finally:
        thread.shutdown()


@pytest.fixture
def echo_server() -> Iterator[ThreadedServer]:
    """A TCP echo service."""
    server = ThreadedServer(echo)
    yield server
    server.close()


class _PageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def http_server() -> Iterator[int]:
    """An HTTP server on a loopback port serving PAGE."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()
    thread.join(5)


class Sshd:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.host_key = directory / "host_ed25519"
        self.user_key = directory / "id_ed25519"
        for key in (self.host_key, self.user_key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
        authorized = directory / "authorized_keys"
        authorized.write_bytes(self.user_key.with_suffix(".pub").read_bytes())
        authorized.chmod(0o600)
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.user = os.environ.get("USER") or "root"
        if os.geteuid() == 0:
            self.user = "root"
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        config = directory / "sshd_config"
        config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"AuthorizedKeysFile {authorized}\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            f"PidFile {directory / 'sshd.pid'}\nStrictModes no\nUsePAM no\n"
            "Subsystem sftp internal-sftp\n"
        )
        with (directory / "sshd.log").open("wb") as log:
            self.proc = subprocess.Popen(
                ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError((directory / "sshd.log").read_text())

    def ssh_args(self, port: int) -> list[str]:
        """Ssh options to log in through ``port`` with the generated key."""
        return [
            "-p", str(port), "-i", str(self.user_key), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """OpenSSH's sshd on a loopback port, with a generated host key and user key."""
    if not Path("/usr/sbin/sshd").exists() or shutil.which("ssh") is None:
        pytest.fail("openssh-server and openssh-client are required (make deps installs them)")
    server = Sshd(tmp_path / "sshd")
    yield server
    server.stop()
