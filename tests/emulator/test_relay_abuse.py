"""
The relay under abuse: a deadline and limits for connections that never upgrade, and memory back.

The limits and the deadline are checked in-process on a plain relay. The burst test runs the relay
in its own process (tests/bench/relay_server.py), so that its RSS is its own, under both event
loops the relay runs on (the emulator's asyncio, the benchmarks' uvloop).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from websockets.sync.client import ClientConnection, connect

from agent.emulator import cli
from agent.emulator.relay import Relay
from agent.emulator.store import TunnelStore
from agent.exceptions import EXIT_USAGE
from agent.protocol import (
    DATA,
    STREAM_START,
    Message,
    MessageType,
)
from tests.integration.dataplane import SCALE, RelayThread
from tests.protocol.helpers import decode_frames, encode_frames


if TYPE_CHECKING:
    from collections.abc import Iterator


V3 = "aws.iot.securetunneling-3.0"
RELAY_SERVER = Path(__file__).parent.parent / "bench" / "relay_server.py"
# A request that never ends: the slowloris kind.
HALF_REQUEST = b"GET /tunnel?local-proxy-mode=source HTTP/1.1\r\nHost: 127.0.0.1\r\n"


def open_ws(
    port: int,
    mode: str,
    token: str,
    *,
    context: ssl.SSLContext | None = None,
    sock: socket.socket | None = None,
) -> ClientConnection:
    scheme = "wss" if context else "ws"
    return connect(
        f"{scheme}://127.0.0.1:{port}/tunnel?local-proxy-mode={mode}",
        ssl=context,
        sock=sock,
        additional_headers={"access-token": token},
        subprotocols=[V3],  # type: ignore[list-item]
        open_timeout=5 * SCALE,
        close_timeout=2,
        max_size=131076,
        ping_interval=None,
    )


def data_frames(payload: bytes, chunk: int = 16384) -> list[bytes]:
    """DATA frames on stream 1 of SSH carrying ``payload``, one WebSocket message each."""
    return [
        encode_frames(
            Message(
                DATA,
                stream_id=1,
                service_id="SSH",
                connection_id=1,
                payload=payload[i : i + chunk],
            )
        )
        for i in range(0, len(payload), chunk)
    ]


def received_data(ws: ClientConnection, size: int) -> bytes:
    """DATA payloads received until ``size`` bytes, joined (other tunnel messages skipped)."""
    got = bytearray()
    while len(got) < size:
        for message in decode_frames(ws.recv(timeout=5 * SCALE)):  # type: ignore[arg-type]
            if message.type is DATA:
                got += message.payload
    return bytes(got)


def carry(sender: ClientConnection, receiver: ClientConnection, size: int) -> bool:
    """Send ``size`` random bytes as DATA; whether the receiver got exactly them (SHA-256)."""
    payload = os.urandom(size)
    for message in data_frames(payload):
        sender.send(message)
    return hashlib.sha256(received_data(receiver, size)).digest() == (
        hashlib.sha256(payload).digest()
    )


@contextlib.contextmanager
def tunnel_pair(
    port: int, tokens: dict[str, str], context: ssl.SSLContext | None = None
) -> Iterator[tuple[ClientConnection, ClientConnection, list[float]]]:
    """Destination and source of a tunnel, past SERVICE_IDS, with stream 1 started."""
    connected = []
    started = time.monotonic()
    with open_ws(port, "destination", tokens["destination"], context=context) as dst:
        connected.append(time.monotonic() - started)
        started = time.monotonic()
        with open_ws(port, "source", tokens["source"], context=context) as src:
            connected.append(time.monotonic() - started)
            dst.recv(timeout=5 * SCALE)
            src.recv(timeout=5 * SCALE)
            src.send(
                encode_frames(Message(STREAM_START, stream_id=1, service_id="SSH", connection_id=1))
            )
            first = decode_frames(dst.recv(timeout=5 * SCALE))  # type: ignore[arg-type]
            assert [m.type for m in first] == [MessageType.STREAM_START]
            yield dst, src, connected


def closed_within(sock: socket.socket, timeout: float) -> bool:
    """Whether the peer closes ``sock`` (EOF or reset) within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def closed_now(sock: socket.socket) -> bool:
    """Whether the peer has closed ``sock`` already (without waiting)."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable) and closed_within(sock, 0.1)


def raw_connection(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(
        ("127.0.0.1", port), timeout=5 * SCALE, source_address=(source, 0)
    )


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Sockets the test opens; all closed at the end."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def plain_relay(tmp_path: Path, **kwargs: Any) -> RelayThread:
    return RelayThread(tmp_path, tls=False, **kwargs).start()


class TestLimits:
    def test_per_ip_limit_refuses_new_ones_and_upgraded_do_not_count(self, tmp_path, sockets):
        """Past the per-IP limit new connections are closed at once; tunnels take no place."""
        relay = plain_relay(tmp_path, max_unauthenticated_per_ip=2)
        try:
            with contextlib.ExitStack() as stack:
                tunnels = [
                    stack.enter_context(open_ws(relay.port, "source", relay.open_tunnel().source))
                    for _ in range(3)
                ]
                sockets.extend(raw_connection(relay.port) for _ in range(3))
                sockets.append(raw_connection(relay.port, "127.0.0.2"))
                verdicts = [closed_within(sock, 0.5 * SCALE) for sock in sockets]
                alive = [ws.recv(timeout=5 * SCALE) is not None for ws in tunnels]
            counted = relay.relay.admission.refused if relay.relay else None
        finally:
            relay.shutdown()

        assert alive == [True, True, True]
        assert verdicts == [False, False, True, False]
        assert counted == 1

    def test_relay_limit_drops_the_oldest(self, tmp_path, sockets):
        """At the relay-wide limit the oldest unauthenticated connection makes room."""
        relay = plain_relay(tmp_path, max_unauthenticated=3)
        try:
            for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
                sockets.append(raw_connection(relay.port, source))
                time.sleep(0.05)  # accepted in this order
            assert not closed_within(sockets[0], 0.3 * SCALE)
            sockets.append(raw_connection(relay.port, "127.0.0.5"))
            verdicts = [closed_within(sock, 1.0 * SCALE) for sock in sockets]
        finally:
            relay.shutdown()

        assert verdicts == [True, False, False, False]

    def test_deadline_closes_slow_connections_but_not_tunnels(self, tmp_path, sockets):
        """A half request and a silent socket are aborted at the deadline; a tunnel stays."""
        deadline = 0.5 * SCALE
        relay = plain_relay(tmp_path, handshake_timeout=deadline)
        try:
            tokens = relay.open_tunnel(("SSH",))
            pair = {"source": tokens.source, "destination": tokens.destination}
            with tunnel_pair(relay.port, pair) as (dst, src, _):
                started = time.monotonic()
                silent = raw_connection(relay.port)
                half = raw_connection(relay.port)
                sockets.extend((silent, half))
                half.sendall(HALF_REQUEST)
                time.sleep(0.5 * deadline)
                early = [closed_now(sock) for sock in sockets]
                late = [closed_within(sock, deadline + 1.0 * SCALE) for sock in sockets]
                waited = time.monotonic() - started
                time.sleep(max(0.0, 2 * deadline - waited))
                carried = carry(src, dst, 100_000)
        finally:
            relay.shutdown()

        assert early == [False, False]
        assert late == [True, True]
        assert waited < deadline + 1.0 * SCALE
        assert carried

    def test_deadline_covers_a_tls_handshake_never_started(self, tmp_path, sockets):
        """A TCP connection to the TLS relay that never sends a ClientHello is aborted too."""
        deadline = 0.5 * SCALE
        relay = RelayThread(tmp_path, handshake_timeout=deadline).start()
        try:
            sockets.append(raw_connection(relay.port))
            time.sleep(0.5 * deadline)
            early = closed_now(sockets[0])
            late = closed_within(sockets[0], deadline + 1.0 * SCALE)
            pending = relay.call(_pending(relay.relay))
        finally:
            relay.shutdown()

        assert (early, late) == (False, True)
        assert pending == 0

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"handshake_timeout": 0},
            {"handshake_timeout": float("inf")},
            {"max_unauthenticated": 0},
            {"max_unauthenticated_per_ip": 0},
        ],
    )
    def test_bad_limits(self, kwargs):
        """A deadline that is not a positive number of seconds, or a limit below 1, is refused."""
        with pytest.raises(ValueError):
            Relay(TunnelStore(), **kwargs)


class TestCommandLine:
    def test_flag_sets_the_emulators_deadline(self, tmp_path, sockets):
        """`tunnel-agent emulator --relay-handshake-timeout` reaches the relay."""
        deadline = 0.5 * SCALE
        argv = [sys.executable, "-m", "agent.emulator", "--dir", str(tmp_path / "emu")]
        argv += ["--relay-handshake-timeout", str(deadline)]
        with (tmp_path / "stderr").open("wb") as err:
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            assert process.stdout is not None
            lines = []
            while not lines or not lines[-1].startswith("Ctrl-C"):
                line = process.stdout.readline()
                assert line, (tmp_path / "stderr").read_text()
                lines.append(line)
            endpoint = next(line.split()[2] for line in lines if "data plane" in line)
            sockets.append(raw_connection(int(endpoint.rpartition(":")[2])))
            time.sleep(0.5 * deadline)
            early = closed_now(sockets[0])
            late = closed_within(sockets[0], deadline + 1.0 * SCALE)
        finally:
            process.send_signal(signal.SIGTERM)
            code = process.wait(30 * SCALE)
            if process.stdout is not None:
                process.stdout.close()

        assert (early, late) == (False, True)
        assert code == 0

    @pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "soon"])
    def test_bad_flag_values(self, value, capsys):
        """A deadline that is not a positive number of seconds is a usage error."""
        code = cli.main(["--relay-handshake-timeout", value])

        assert code == EXIT_USAGE
        assert "--relay-handshake-timeout" in capsys.readouterr().err


async def _pending(relay: Relay | None) -> int:
    assert relay is not None
    return relay.admission.pending


class RelayProcess:
    """The relay in its own process: tokens and counters over a pipe, RSS from /proc."""

    def __init__(self, directory: Path, *, event_loop: str, handshake_timeout: float) -> None:
        env = dict(os.environ, TUNNEL_AGENT_EVENT_LOOP=event_loop)
        # Measured as it runs: asyncio's debug mode (`make pytest`) keeps a traceback per callback.
        env.pop("PYTHONASYNCIODEBUG", None)
        self.log_file = directory / "relay.log"
        with self.log_file.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(RELAY_SERVER),
                    "--dir",
                    str(directory),
                    "--handshake-timeout",
                    str(handshake_timeout),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
            )
        hello = self._answer()
        self.port: int = hello["port"]
        self.context = ssl.create_default_context(cafile=hello["ca"])

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, self.log_file.read_text()
        return json.loads(line)  # type: ignore[no-any-return]

    def command(self, line: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def rss(self) -> int:
        """Resident set size in kB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line[:6] == "VmRSS:")

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10 * SCALE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class Slow:
    """One abusive connection: when it was opened and when the relay closed it."""

    sock: socket.socket
    opened: float
    closed: float | None = None


def open_slow(relay: RelayProcess, source: str, *, tls: bool = True, half: bool = False) -> Slow:
    """A connection from ``source`` that finishes TLS (or never starts it) and asks nothing."""
    opened = time.monotonic()
    raw = raw_connection(relay.port, source)
    if not tls:
        return Slow(raw, opened)
    try:
        sock = relay.context.wrap_socket(raw, server_hostname="127.0.0.1")
    except OSError:
        raw.close()  # refused before TLS: the relay closed it at once
        return Slow(raw, opened, time.monotonic())
    if half:
        sock.sendall(HALF_REQUEST)
    return Slow(sock, opened)


class Sampler(threading.Thread):
    """Samples a process's RSS every 20 ms; ``peak`` is the highest seen."""

    def __init__(self, relay: RelayProcess) -> None:
        super().__init__(daemon=True)
        self.relay = relay
        self.peak = relay.rss()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, self.relay.rss())

    def stop(self) -> None:
        self._done.set()
        self.join(5)


def watch_closes(slow: list[Slow], until: float) -> None:
    """Record when the relay closes each open connection (EOF or reset), until ``until``."""
    selector = selectors.DefaultSelector()
    for conn in slow:
        if conn.closed is None:
            conn.sock.setblocking(False)  # noqa: FBT003 - the socket API
            selector.register(conn.sock, selectors.EVENT_READ, conn)
    while selector.get_map() and time.monotonic() < until:
        for key, _ in selector.select(0.05):
            conn = key.data
            try:
                if conn.sock.recv(1):
                    continue  # the relay never writes to these: cannot happen
            except (ssl.SSLWantReadError, BlockingIOError):
                continue  # a TLS 1.3 session ticket, not a close
            except OSError:
                pass
            conn.closed = time.monotonic()
            selector.unregister(conn.sock)
    selector.close()


EVENT_LOOPS = ["asyncio", "uvloop"]


@pytest.mark.slow
@pytest.mark.parametrize("event_loop", EVENT_LOOPS)
def test_300_slow_connections(tmp_path, event_loop):
    """300 slow connections: a tunnel still connects at once, all are closed, RSS comes back."""
    if event_loop == "uvloop":
        pytest.importorskip("uvloop")
    deadline = 3.0 * SCALE
    relay = RelayProcess(tmp_path, event_loop=event_loop, handshake_timeout=deadline)
    slow: list[Slow] = []
    sampler: Sampler | None = None
    try:
        # Warm up: a tunnel and a few slow connections, then the trim after their close.
        with tunnel_pair(relay.port, relay.command("open SSH"), relay.context) as (dst, src, _):
            assert carry(src, dst, 300_000)
        for _ in range(5):
            open_slow(relay, "127.0.0.9").sock.close()
        time.sleep(2.0 * SCALE)
        before = relay.rss()
        sampler = Sampler(relay)
        sampler.start()

        burst = time.monotonic()
        # 100 from one address: 64 get in, 36 are refused at once.
        slow += [open_slow(relay, "127.0.0.2") for _ in range(100)]
        # 150 from three more (10 with half a request), 50 that never start TLS: 264 in all,
        # past the relay-wide 256, so the oldest make room.
        for source in ("127.0.0.3", "127.0.0.4", "127.0.0.5"):
            slow += [open_slow(relay, source, half=i < 4) for i in range(50)]
        for source in ("127.0.0.6", "127.0.0.7"):
            slow += [open_slow(relay, source, tls=False) for _ in range(25)]
        burst_time = time.monotonic() - burst
        during = relay.command("stats")

        tokens = relay.command("open SSH")
        tunnel_started = time.monotonic()
        with tunnel_pair(relay.port, tokens, relay.context) as (dst, src, connect_times):
            first = carry(src, dst, 1_000_000) and carry(dst, src, 1_000_000)
            watch_closes(slow, until=burst + burst_time + deadline + 2.0 * SCALE)
            all_closed = time.monotonic() - burst
            # The tunnel outlives the deadline: upgraded connections are not counted.
            time.sleep(max(0.0, tunnel_started + deadline + 0.5 - time.monotonic()))
            second = carry(src, dst, 1_000_000) and carry(dst, src, 1_000_000)
        stats = relay.command("stats")
        returned = time.monotonic() + 5.0 * SCALE
        after = relay.rss()
        while after > before * 1.1 and time.monotonic() < returned:
            time.sleep(0.1)
            after = relay.rss()
        sampler.stop()
    finally:
        for conn in slow:
            conn.sock.close()
        if sampler is not None:
            sampler.stop()
        relay.stop()

    lifetimes = [c.closed - c.opened for c in slow if c.closed is not None]
    print(
        f"\n[{event_loop}] burst of {len(slow)} in {burst_time:.2f}s "
        f"(pending {during['pending']}); "
        f"tunnel connected in {connect_times[0] * 1000:.0f} + {connect_times[1] * 1000:.0f} ms; "
        f"all slow closed {all_closed:.2f}s after the burst began (deadline {deadline:.1f}s, "
        f"longest life {max(lifetimes):.2f}s); refused {stats['refused']}, dropped "
        f"{stats['dropped']}, expired {stats['expired']}; RSS before {before} kB, peak "
        f"{sampler.peak} kB, after {after} kB"
    )
    assert first
    assert second
    assert all(seconds < 1.0 * SCALE for seconds in connect_times), connect_times
    assert during["pending"] >= 200, during
    assert len(lifetimes) == len(slow) == 300
    assert max(lifetimes) < deadline + 1.0 * SCALE
    assert sum(life > 0.8 * deadline for life in lifetimes) >= 200
    assert stats["refused"] == 36
    assert stats["dropped"] >= 1
    assert stats["pending"] == 0
    assert sampler.peak > before * 1.1, "the burst did not use memory: nothing to give back"
    assert after <= before * 1.1
