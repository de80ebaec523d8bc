"""
Fixtures for integration tests: real relay, real proxies, real services on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import pytest

from agent.emulator.targets import Sshd
from tests.integration.dataplane import RelayThread, ThreadedServer, echo


if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.integration.test_agent_e2e import World

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


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """OpenSSH's sshd on a loopback port, with a generated host key and user key."""
    if shutil.which("ssh") is None:
        pytest.fail("openssh-client is required (make deps installs it)")
    server = Sshd(tmp_path / "sshd")
    yield server
    server.stop()


@pytest.fixture
def world(tmp_path: Path, echo_server: ThreadedServer) -> Iterator[World]:
    """An emulator and a device agent's world whose ECHO service is a real echo server.

    Modules that need other services define their own ``world``, which overrides this one.
    """
    from tests.integration.test_agent_e2e import World

    made = World(tmp_path, {"ECHO": str(echo_server.port)})
    try:
        yield made
    finally:
        made.close()
