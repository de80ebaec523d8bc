"""
Real-socket harness for data-plane tests: a relay in a background thread, proxy processes, services.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.emulator.pki import CertificateAuthority, KeyPair
from agent.emulator.relay import Relay
from agent.emulator.store import Tunnel, TunnelStore
from agent.emulator.targets import stop_process


if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterator
    from pathlib import Path

SCALE = float(os.environ.get("TEST_TIME_SCALE", "1"))
PROXY = [sys.executable, "-m", "agent.proxy"]


@dataclass
class TunnelTokens:
    tunnel_id: str
    source: str
    destination: str
    services: tuple[str, ...]


class RelayThread:
    """
    A TunnelStore and a Relay serving TLS on 127.0.0.1, run by an event loop in a thread.
    """

    def __init__(
        self,
        directory: Path,
        *,
        tls: bool = True,
        clock: Callable[[], float] = time.time,
        **relay_kwargs: Any,
    ) -> None:
        self.directory = directory
        self.clock = clock
        self.tls = tls
        self.relay_kwargs = relay_kwargs
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.store: TunnelStore | None = None
        self.relay: Relay | None = None
        self.port = 0
        ca = CertificateAuthority(directory / "ca")
        ca.load_or_create()
        self.ca_file = ca.cert_file
        self.server = ca.issue_server(KeyPair(directory / "relay.crt", directory / "relay.key"))

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout * SCALE)

    def start(self, port: int = 0) -> RelayThread:
        if not self.thread.is_alive():
            self.thread.start()

        async def start() -> None:
            if self.store is None:
                self.store = TunnelStore(clock=self.clock)
            context = None
            if self.tls:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                context.load_cert_chain(self.server.cert, self.server.key)
            self.relay = Relay(self.store, port=port, ssl_context=context, **self.relay_kwargs)
            await self.relay.start()
            self.port = self.relay.port

        self.call(start())
        return self

    def stop(self, *, abort: bool = False) -> None:
        async def stop() -> None:
            if self.relay is not None:
                await self.relay.close(abort=abort)

        self.call(stop())

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def run(self, fn: Callable[[TunnelStore], Any]) -> Any:
        async def run() -> Any:
            assert self.store is not None
            return fn(self.store)

        return self.call(run())

    def open_tunnel(self, services: tuple[str, ...] = ("SSH",), **kwargs: Any) -> TunnelTokens:
        def open_(store: TunnelStore) -> TunnelTokens:
            tunnel = store.open_tunnel(services=list(services), **kwargs)
            return TunnelTokens(
                tunnel.tunnel_id, tunnel.source.token, tunnel.destination.token, services
            )

        return self.run(open_)  # type: ignore[no-any-return]

    def tunnel(self, tunnel_id: str) -> Tunnel:
        return self.run(lambda store: store.get(tunnel_id))  # type: ignore[no-any-return]

    def close_tunnel(self, tunnel_id: str) -> None:
        self.run(lambda store: store.close_tunnel(tunnel_id))


class ProxyProcess:
    """
    A ``tunnel-localproxy`` process whose stderr goes to a file we can search.
    """

    def __init__(
        self,
        args: list[str],
        *,
        token: str,
        client_token: str | None = None,
        log_file: Path,
        binary: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWSIOT_TUNNEL")}
        env.pop("https_proxy", None)
        env.pop("HTTPS_PROXY", None)
        env["AWSIOT_TUNNEL_ACCESS_TOKEN"] = token
        if client_token:
            env["AWSIOT_TUNNEL_CLIENT_TOKEN"] = client_token
        env.update(extra_env or {})
        self.log_file = log_file
        self.started = time.monotonic()
        with log_file.open("wb") as log:
            self.proc = subprocess.Popen(
                [*(binary or PROXY), *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        deadline = time.monotonic() + timeout * SCALE
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log)
            if match:
                return match
            if self.proc.poll() is not None:
                match = re.search(pattern, self.log)
                if match:
                    return match
                raise AssertionError(f"proxy exited {self.proc.returncode}:\n{self.log}")
            time.sleep(0.01)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.log}")

    def port(self, service: str = "", timeout: float = 10) -> int:
        label = service or "-"
        match = self.wait_for(
            rf"Listening for new connection on port (\d+) service={label}\b", timeout
        )
        return int(match.group(1))

    def wait(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout * SCALE)

    def stop(self) -> None:
        stop_process(self.proc)


def proxy_args(relay: RelayThread, *mode: str) -> list[str]:
    """
    The endpoint and TLS flags for a proxy talking to ``relay``.
    """
    args = ["-e", f"127.0.0.1:{relay.port}", *mode, "--connect-retry-delay", "0.2"]
    return [*args, "-c", str(relay.ca_file)] if relay.tls else [*args, "--no-tls"]


class ThreadedServer:
    """
    A TCP server on 127.0.0.1 with one thread per connection.
    """

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        self.threads: list[threading.Thread] = []
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.handler(conn)

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept() on Linux.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(2)


def echo(conn: socket.socket) -> None:
    while data := conn.recv(262144):
        conn.sendall(data)


def pattern_bytes(size: int, seed: int = 0) -> Iterator[bytes]:
    """
    Deterministic pseudo-random chunks, cheap to generate (hash chain expanded by repetition).
    """
    block = b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(2048))
    sent = 0
    i = 0
    while sent < size:
        chunk = block[i % 7 :] + block[: i % 7]
        chunk = chunk[: size - sent]
        sent += len(chunk)
        i += 1
        yield chunk


def connect(port: int, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout * SCALE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    parts = []
    while size:
        data = sock.recv(min(size, 1 << 20))
        if not data:
            raise EOFError(f"connection closed with {size} bytes missing")
        parts.append(data)
        size -= len(data)
    return b"".join(parts)


class ConnectProxy:
    """
    A minimal HTTP CONNECT proxy on 127.0.0.1 that records the request heads it sees.
    """

    def __init__(self) -> None:
        self.heads: list[str] = []
        self.server = ThreadedServer(self._handle)
        self.port = self.server.port

    def _handle(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = conn.recv(4096)
            if not data:
                return
            head += data
        text = head.decode("latin-1")
        self.heads.append(text)
        target = text.split(" ", 2)[1]
        host, _, port = target.rpartition(":")
        upstream = socket.create_connection((host.strip("[]"), int(port)))
        conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        thread = threading.Thread(target=pipe, args=(upstream, conn), daemon=True)
        thread.start()
        pipe(conn, upstream)
        thread.join(30)
        upstream.close()

    def close(self) -> None:
        self.server.close()
