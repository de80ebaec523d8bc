"""
Bytes through a real tunnel: source proxy -> relay -> destination proxy -> local services, and back.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader
from websockets.utils import accept_key

from agent.protocol import (
    DATA,
    SERVICE_IDS,
    STREAM_START,
    Message,
    Mode,
    ProtocolVersion,
)
from tests.integration.conftest import PAGE
from tests.integration.dataplane import (
    SCALE,
    ProxyProcess,
    RelayThread,
    ThreadedServer,
    TunnelTokens,
    connect,
    echo,
    pattern_bytes,
    proxy_args,
    recv_exactly,
)
from tests.protocol.helpers import decode_frames, encode_frames


if TYPE_CHECKING:
    from collections.abc import Iterator

    from agent.emulator.targets import Sshd

pytestmark = pytest.mark.integration


def client_token() -> str:
    return secrets.token_hex(20)


class Pair:
    """A destination and a source proxy on one tunnel, destination first."""

    def __init__(
        self,
        relay: RelayThread,
        tmp_path: Path,
        tokens: TunnelTokens,
        destination_map: str,
        source_map: str,
        *,
        source_flags: tuple[str, ...] = (),
        destination_flags: tuple[str, ...] = (),
        client_tokens: bool = True,
    ) -> None:
        self.destination = ProxyProcess(
            [*proxy_args(relay, "-d", destination_map), *destination_flags],
            token=tokens.destination,
            client_token=client_token() if client_tokens else None,
            log_file=tmp_path / "destination.log",
        )
        self.destination.wait_for("connected to the tunnel")
        self.source = ProxyProcess(
            [*proxy_args(relay, "-s", source_map), *source_flags],
            token=tokens.source,
            client_token=client_token() if client_tokens else None,
            log_file=tmp_path / "source.log",
        )

    def stop(self) -> None:
        self.source.stop()
        self.destination.stop()


@pytest.fixture
def pairs() -> Iterator[list[Pair]]:
    made: list[Pair] = []
    yield made
    for pair in made:
        pair.stop()


def echo_roundtrip(port: int, size: int, seed: int = 0) -> tuple[str, str]:
    """Send ``size`` bytes to an echo service through ``port``; return (sent, received) sha256."""
    sent = hashlib.sha256()
    received = hashlib.sha256()
    with connect(port) as sock:

        def reader() -> None:
            left = size
            while left:
                data = sock.recv(262144)
                if not data:
                    break
                received.update(data)
                left -= len(data)

        thread = threading.Thread(target=reader)
        thread.start()
        for chunk in pattern_bytes(size, seed):
            sent.update(chunk)
            sock.sendall(chunk)
        thread.join(60 * SCALE)
    return sent.hexdigest(), received.hexdigest()


class Sink:
    """A service that hashes what it receives; optionally waits before reading."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.delay = delay
        self.digests: list[str] = []
        self.sizes: list[int] = []
        self.done = threading.Event()
        self.server = ThreadedServer(self._handle)
        self.port = self.server.port

    def _handle(self, conn: socket.socket) -> None:
        time.sleep(self.delay)
        digest = hashlib.sha256()
        size = 0
        while data := conn.recv(1 << 20):
            digest.update(data)
            size += len(data)
        self.digests.append(digest.hexdigest())
        self.sizes.append(size)
        self.done.set()


def send_stream(port: int, size: int) -> str:
    digest = hashlib.sha256()
    with connect(port, timeout=120) as sock:
        for chunk in pattern_bytes(size, 7):
            digest.update(chunk)
            sock.sendall(chunk)
    return digest.hexdigest()


def sink_pair(
    relay: RelayThread, tmp_path: Path, pairs: list[Pair], service: str = "BULK", delay: float = 0.0
) -> tuple[Sink, Pair]:
    """A new tunnel whose one service is a fresh :class:`Sink`, with its pair of proxies."""
    sink = Sink(delay=delay)
    tokens = relay.open_tunnel((service,))
    pair = Pair(relay, tmp_path, tokens, f"{service}={sink.port}", f"{service}=0")
    pairs.append(pair)
    return sink, pair


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


class TestServices:
    def test_http_echo_and_ssh_share_one_tunnel(
        self, relay, http_server, echo_server, sshd: Sshd, tmp_path, pairs
    ):
        """An HTTP page, echoed bytes and an SSH command with scp all cross one tunnel intact."""
        tokens = relay.open_tunnel(("HTTP", "ECHO", "SSH"))
        pair = Pair(
            relay,
            tmp_path,
            tokens,
            f"HTTP={http_server},ECHO={echo_server.port},SSH={sshd.port}",
            "HTTP=0,ECHO=0,SSH=0",
        )
        pairs.append(pair)
        http_port = pair.source.port("HTTP")
        echo_port = pair.source.port("ECHO")
        ssh_port = pair.source.port("SSH")

        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=10) as response:
            body = response.read()
        sent, received = echo_roundtrip(echo_port, 3 * 1024 * 1024)
        ssh = subprocess.run(
            ["ssh", *sshd.ssh_options(ssh_port), f"{sshd.user}@127.0.0.1", "echo ok; uname -s"],
            capture_output=True,
            timeout=30 * SCALE,
            check=False,
        )
        payload = tmp_path / "payload.bin"
        payload.write_bytes(os.urandom(5 * 1024 * 1024))
        copied = tmp_path / "copied.bin"
        scp = subprocess.run(
            ["scp", *sshd.scp_options(ssh_port), str(payload), f"{sshd.user}@127.0.0.1:{copied}"],
            capture_output=True,
            timeout=60 * SCALE,
            check=False,
        )  # fmt: skip

        assert hashlib.sha256(body).digest() == hashlib.sha256(PAGE).digest()
        assert sent == received
        assert ssh.returncode == 0, ssh.stderr
        assert ssh.stdout.decode().split() == ["ok", "Linux"]
        assert scp.returncode == 0, scp.stderr
        assert (
            hashlib.sha256(copied.read_bytes()).digest()
            == hashlib.sha256(payload.read_bytes()).digest()
        )

    def test_local_bind_address_in_both_modes(self, relay, tmp_path, pairs):
        """-b sets where the source listens and, at the destination, where connections come from."""
        peers: list[str] = []

        def recording_echo(conn: socket.socket) -> None:
            peers.append(conn.getpeername()[0])
            echo(conn)

        server = ThreadedServer(recording_echo)
        tokens = relay.open_tunnel(("ECHO",))
        pair = Pair(
            relay,
            tmp_path,
            tokens,
            f"ECHO={server.port}",
            "ECHO=0",
            source_flags=("--local-bind-address", "127.0.0.3"),
            destination_flags=("-b", "127.0.0.2"),
        )
        pairs.append(pair)
        port = pair.source.port("ECHO")
        with socket.create_connection(("127.0.0.3", port), timeout=10) as sock:
            sock.sendall(b"ping")
            reply = recv_exactly(sock, 4)
        refused = socket.socket()
        with refused, pytest.raises(ConnectionRefusedError):
            refused.connect(("127.0.0.1", port))
        server.close()

        assert reply == b"ping"
        assert peers == ["127.0.0.2"]

    def test_twenty_simultaneous_connections_on_one_service(
        self, relay, echo_server, tmp_path, pairs
    ):
        """Twenty concurrent V3 connections on one service each get their own bytes back."""
        tokens = relay.open_tunnel(("ECHO",))
        pair = Pair(relay, tmp_path, tokens, f"ECHO={echo_server.port}", "ECHO=0")
        pairs.append(pair)
        port = pair.source.port("ECHO")

        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda i: echo_roundtrip(port, 1024 * 1024, i), range(20)))

        assert len({sent for sent, _ in results}) == 20
        assert all(sent == received for sent, received in results)
        assert echo_server.accepted == 20

    def test_short_connections_deliver_everything_before_the_reset(self, relay, tmp_path, pairs):
        """Connections that send and close at once lose nothing, even before the local connect."""
        sink, pair = sink_pair(relay, tmp_path, pairs)
        port = pair.source.port("BULK")
        sizes = [1, 1000, 64512, 64513, 200_000] * 8

        with ThreadPoolExecutor(10) as pool:
            sent = list(pool.map(lambda size: send_stream(port, size), sizes))
        deadline = time.monotonic() + 20 * SCALE
        while len(sink.digests) < len(sizes) and time.monotonic() < deadline:
            time.sleep(0.01)

        assert sorted(sink.sizes) == sorted(sizes)
        assert sorted(sink.digests) == sorted(sent)
        sink.server.close()

    @pytest.mark.slow
    def test_256_mib_one_way_arrives_intact(self, relay, tmp_path, pairs):
        """256 MiB sent through the tunnel hash the same at the sink."""
        sink, pair = sink_pair(relay, tmp_path, pairs)
        port = pair.source.port("BULK")

        sent = send_stream(port, 256 * 1024 * 1024)
        assert sink.done.wait(60 * SCALE)

        assert sink.sizes == [256 * 1024 * 1024]
        assert sink.digests == [sent]
        sink.server.close()

    @pytest.mark.slow
    def test_reader_pausing_30_s_loses_nothing_and_memory_stays_bounded(
        self, relay, tmp_path, pairs
    ):
        """A service that stops reading for 30 s gets every byte afterwards; proxies stay small."""
        sink, pair = sink_pair(relay, tmp_path, pairs, "SLOW", delay=30 * SCALE)
        port = pair.source.port("SLOW")
        size = 64 * 1024 * 1024

        sent = send_stream(port, size)
        assert sink.done.wait(90 * SCALE)
        hwm = [vm_hwm_kb(p.proc.pid) for p in (pair.source, pair.destination)]

        assert sink.digests == [sent]
        assert max(hwm) < 40 * 1024, hwm
        sink.server.close()


class TestVersions:
    @pytest.mark.parametrize("version", [ProtocolVersion.V1, ProtocolVersion.V2])
    def test_older_source_formats_reach_our_destination(
        self, relay, echo_server, tmp_path, pairs, version
    ):
        """A source sending V1 or V2 messages (-y) talks to our V3 destination."""
        tokens = relay.open_tunnel(("ECHO",))
        pair = Pair(
            relay,
            tmp_path,
            tokens,
            f"ECHO={echo_server.port}",
            "ECHO=0",
            source_flags=("-y", version.name),
        )
        pairs.append(pair)
        port = pair.source.port("ECHO")

        first = echo_roundtrip(port, 512 * 1024, 1)
        second = echo_roundtrip(port, 512 * 1024, 2)

        assert first[0] == first[1]
        assert second[0] == second[1]
        assert echo_server.accepted == 2


class TestLifecycle:
    def test_relay_restart_reconnects_proxies_with_client_tokens(
        self, relay, echo_server, tmp_path, pairs
    ):
        """After an abrupt relay restart both proxies reconnect and new connections work."""
        tokens = relay.open_tunnel(("ECHO",))
        pair = Pair(relay, tmp_path, tokens, f"ECHO={echo_server.port}", "ECHO=0")
        pairs.append(pair)
        port = pair.source.port("ECHO")
        before = echo_roundtrip(port, 256 * 1024, 1)

        relay.stop(abort=True)
        relay.start(port=relay.port)
        pair.destination.wait_for(r"connected to the tunnel[^\n]*\n(.|\n)*connected to the tunnel")
        pair.source.wait_for(r"connected to the tunnel[^\n]*\n(.|\n)*connected to the tunnel")
        after = echo_roundtrip(port, 256 * 1024, 2)

        assert before[0] == before[1]
        assert after[0] == after[1]
        assert pair.source.proc.poll() is None
        assert pair.destination.proc.poll() is None

    def test_closing_the_tunnel_stops_both_proxies_with_status_0(
        self, relay, echo_server, tmp_path, pairs
    ):
        """CloseTunnel ends both proxies with exit status 0 within 2 seconds."""
        tokens = relay.open_tunnel(("ECHO",))
        pair = Pair(relay, tmp_path, tokens, f"ECHO={echo_server.port}", "ECHO=0")
        pairs.append(pair)
        pair.source.port("ECHO")

        started = time.monotonic()
        relay.close_tunnel(tokens.tunnel_id)
        codes = (pair.source.wait(5), pair.destination.wait(5))
        elapsed = time.monotonic() - started

        assert codes == (0, 0)
        assert elapsed < 2 * SCALE
        assert "tunnel closed by the service code=1000" in pair.source.log

    def test_lifetime_expiry_ends_both_proxies(self, tmp_path, echo_server, pairs):
        """A tunnel of maxLifetimeTimeoutMinutes=1 closes at expiry and both proxies exit 0."""
        now = [time.time()]
        relay = RelayThread(tmp_path / "clocked", clock=lambda: now[0]).start()
        try:
            tokens = relay.open_tunnel(("ECHO",), max_lifetime_minutes=1)
            pair = Pair(relay, tmp_path, tokens, f"ECHO={echo_server.port}", "ECHO=0")
            pairs.append(pair)
            sent, received = echo_roundtrip(pair.source.port("ECHO"), 64 * 1024)
            now[0] += 59
            early = relay.run(lambda store: store.expire_due())
            now[0] += 2
            expired = relay.run(lambda store: store.expire_due())
            codes = (pair.source.wait(5), pair.destination.wait(5))
            status = relay.tunnel(tokens.tunnel_id).status
        finally:
            relay.shutdown()

        assert sent == received
        assert early == []
        assert [t.tunnel_id for t in expired] == [tokens.tunnel_id]
        assert codes == (0, 0)
        assert status == "CLOSED"

    def test_sigterm_closes_the_websocket_and_exits_0(self, relay, echo_server, tmp_path, pairs):
        """SIGTERM makes a proxy send a close frame and exit 0; the relay marks it disconnected."""
        tokens = relay.open_tunnel(("ECHO",))
        pair = Pair(relay, tmp_path, tokens, f"ECHO={echo_server.port}", "ECHO=0")
        pairs.append(pair)
        pair.source.port("ECHO")

        pair.destination.proc.terminate()
        code = pair.destination.wait(5)
        deadline = time.monotonic() + 5
        while relay.tunnel(tokens.tunnel_id).destination.connected and time.monotonic() < deadline:
            time.sleep(0.01)

        assert code == 0
        assert relay.tunnel(tokens.tunnel_id).destination.connected is False


class Receiver:
    """
    An application that reads one connection to its end and records how it ended.

    It stops reading after ``pause_after`` bytes until ``resume`` is set, so a test can cut the
    tunnel while the transfer is surely in flight.
    """

    def __init__(self, *, pause_after: int | None = None) -> None:
        self.pause_after = pause_after
        self.midway = threading.Event()
        self.resume = threading.Event()
        self.done = threading.Event()
        self.size = 0
        self.digest = ""
        self.end = ""  # "eof", "reset" or the unexpected exception

    def read(self, sock: socket.socket) -> None:
        sock.settimeout(60 * SCALE)
        digest = hashlib.sha256()
        try:
            with sock:
                while data := sock.recv(1 << 20):
                    digest.update(data)
                    self.size += len(data)
                    if self.pause_after is not None and self.size >= self.pause_after:
                        self.pause_after = None
                        self.midway.set()
                        self.resume.wait(30 * SCALE)
        except ConnectionResetError:
            self.end = "reset"
        except OSError as exc:
            self.end = repr(exc)
        else:
            self.end = "eof"
        finally:
            self.digest = digest.hexdigest()
            self.done.set()


def send_all(sock: socket.socket, size: int, outcome: list[str]) -> None:
    """Send ``size`` pattern bytes, then close normally; record the digest or the error."""
    digest = hashlib.sha256()
    try:
        with sock:
            for chunk in pattern_bytes(size, 3):
                sock.sendall(chunk)
                digest.update(chunk)
        outcome.append(digest.hexdigest())
    except OSError as exc:
        outcome.append(repr(exc))


def session_reset(relay: RelayThread, tunnel_id: str, mode: Mode) -> None:
    """Have the relay send SESSION_RESET to one mode's proxy (it has no reason of its own)."""

    async def send() -> None:
        assert relay.relay is not None
        peer = relay.relay.sessions[tunnel_id].peers[mode]
        assert peer.tunnel is not None
        peer.tunnel.send_session_reset()
        peer.flush()

    relay.call(send())


def transfer(
    relay: RelayThread, tmp_path: Path, pairs: list[Pair], direction: str, size: int, *,
    pause_after: int | None = None,
) -> tuple[Receiver, list[str], Pair, TunnelTokens, threading.Thread]:  # fmt: skip
    """
    Start ``size`` bytes through a new tunnel: "up" from the client to the service, "down" back.

    Returns:
        The receiving application, the sender's outcome, the proxies, the tunnel, and the
        thread of the client's end (the sender up, the receiver down).
    """
    receiver = Receiver(pause_after=pause_after)
    sent: list[str] = []
    if direction == "up":
        server = ThreadedServer(receiver.read)
    else:
        server = ThreadedServer(lambda conn: send_all(conn, size, sent))
    tokens = relay.open_tunnel(("BULK",))
    pair = Pair(relay, tmp_path, tokens, f"BULK={server.port}", "BULK=0")
    pairs.append(pair)
    client = connect(pair.source.port("BULK"), timeout=60)
    if direction == "up":
        thread = threading.Thread(target=send_all, args=(client, size, sent), daemon=True)
    else:
        thread = threading.Thread(target=receiver.read, args=(client,), daemon=True)
    thread.start()
    return receiver, sent, pair, tokens, thread


class TestAbnormalEnd:
    """
    How a transfer ends is what the receiving application learns (docs/protocol.md §10.4).

    A normal end is an EOF after every byte. A tunnel cut mid-transfer (relay gone, SESSION_RESET,
    the proxy stopped) makes the application's next read fail with ECONNRESET: never an EOF
    short of the data.
    """

    @pytest.mark.parametrize("direction", ["up", "down"])
    def test_a_normal_end_is_eof_after_every_byte(self, relay, tmp_path, pairs, direction):
        """64 MiB sent and closed arrive whole, then EOF."""
        size = 64 * 1024 * 1024
        receiver, sent, _, _, thread = transfer(relay, tmp_path, pairs, direction, size)

        assert receiver.done.wait(60 * SCALE)
        thread.join(10 * SCALE)
        print(f"{direction}, normal end: {receiver.end} after {receiver.size} of {size} bytes")

        assert (receiver.end, receiver.size) == ("eof", size)
        assert [receiver.digest] == sent

    @pytest.mark.parametrize("direction", ["up", "down"])
    @pytest.mark.parametrize("cut", ["relay killed", "proxy stopped", "session reset"])
    def test_a_cut_transfer_is_a_reset(self, relay, tmp_path, pairs, direction, cut):
        """
        Cut mid-transfer, the receiving application's read fails with ECONNRESET.

        The receiver pauses after 2 MiB of 128 MiB, so the cut lands mid-transfer; it resumes
        once its proxy has reacted, and reads what was delivered, then the reset.
        """
        size = 128 * 1024 * 1024
        receiver, _, pair, tokens, thread = transfer(
            relay, tmp_path, pairs, direction, size, pause_after=2 * 1024 * 1024
        )
        near = pair.destination if direction == "up" else pair.source
        mode = Mode.DESTINATION if direction == "up" else Mode.SOURCE
        assert receiver.midway.wait(30 * SCALE)

        if cut == "relay killed":
            relay.stop(abort=True)
            near.wait_for("connection lost")
        elif cut == "proxy stopped":
            near.proc.terminate()
            near.wait(10)
        else:
            session_reset(relay, tokens.tunnel_id, mode)
            near.wait_for("session reset")
        receiver.resume.set()
        assert receiver.done.wait(30 * SCALE)
        pair.stop()
        thread.join(10 * SCALE)
        print(f"{direction}, {cut}: {receiver.end} after {receiver.size} of {size} bytes")

        assert receiver.end == "reset"
        assert 2 * 1024 * 1024 <= receiver.size < size
        assert ": reset 1 local connection(s)" in near.log
        if cut == "proxy stopped":
            assert near.proc.returncode == 0


class TestRefusals:
    def _refused(self, relay, tmp_path, token, mode_flags, name="p") -> ProxyProcess:
        proxy = ProxyProcess(
            proxy_args(relay, *mode_flags), token=token, log_file=tmp_path / f"{name}.log"
        )
        proxy.wait(5)
        return proxy

    def test_unknown_token_exits_0_with_the_reason(self, relay, tmp_path):
        """A token the service does not know ends the proxy at once with status 0."""
        relay.open_tunnel(("ECHO",))

        proxy = self._refused(relay, tmp_path, "not-a-real-token", ("-d", "ECHO=9"))

        assert proxy.proc.returncode == 0
        assert proxy.log.count("tunnel refused the connection: 400") == 1

    def test_spent_token_without_client_token_is_refused(self, relay, echo_server, tmp_path):
        """A destination token used once without a client token cannot be used again."""
        tokens = relay.open_tunnel(("ECHO",))
        first = ProxyProcess(
            proxy_args(relay, "-d", f"ECHO={echo_server.port}"),
            token=tokens.destination,
            log_file=tmp_path / "first.log",
        )
        first.wait_for("connected to the tunnel")
        first.stop()

        second = self._refused(relay, tmp_path, tokens.destination, ("-d", "ECHO=9"), "second")

        assert second.proc.returncode == 0
        assert "previously used" in second.log

    def test_token_of_the_other_mode_is_refused(self, relay, tmp_path):
        """A source token presented by a destination is refused with status 0."""
        tokens = relay.open_tunnel(("ECHO",))

        proxy = self._refused(relay, tmp_path, tokens.source, ("-d", "ECHO=9"))

        assert proxy.proc.returncode == 0
        assert "tunnel refused the connection: 400" in proxy.log

    def test_no_common_subprotocol_is_refused(self, tmp_path):
        """A relay that only speaks 1.0 refuses our 3.0 proxy without spending the token."""
        relay = RelayThread(tmp_path / "v1", versions=(ProtocolVersion.V1,)).start()
        try:
            tokens = relay.open_tunnel(("ECHO",))
            proxy = self._refused(relay, tmp_path, tokens.destination, ("-d", "ECHO=9"))
            used = relay.tunnel(tokens.tunnel_id).destination.used
        finally:
            relay.shutdown()

        assert proxy.proc.returncode == 0
        assert "sec-websocket-protocol" in proxy.log
        assert used is False

    def test_token_never_appears_in_argv(self, relay, echo_server, tmp_path):
        """The proxy's command line does not contain the access or client token."""
        tokens = relay.open_tunnel(("ECHO",))
        ct = client_token()
        proxy = ProxyProcess(
            proxy_args(relay, "-d", f"ECHO={echo_server.port}"),
            token=tokens.destination,
            client_token=ct,
            log_file=tmp_path / "d.log",
        )
        try:
            proxy.wait_for("connected to the tunnel")
            cmdline = Path(f"/proc/{proxy.proc.pid}/cmdline").read_bytes()
        finally:
            proxy.stop()

        assert tokens.destination.encode() not in cmdline
        assert ct.encode() not in cmdline
        assert tokens.destination not in proxy.log
        assert ct not in proxy.log


def recv_all(sock: socket.socket, size: int) -> bytes:
    return recv_exactly(sock, size)


class TestOutboundProxy:
    def test_destination_reaches_the_relay_through_https_proxy(
        self, relay, echo_server, tmp_path, pairs
    ):
        """With https_proxy set, the proxy tunnels TLS through CONNECT with basic auth."""
        from tests.integration.dataplane import ConnectProxy

        connect_proxy = ConnectProxy()
        try:
            tokens = relay.open_tunnel(("ECHO",))
            destination = ProxyProcess(
                proxy_args(relay, "-d", f"ECHO={echo_server.port}"),
                token=tokens.destination,
                log_file=tmp_path / "d.log",
                extra_env={"https_proxy": f"http://user:s%40cret@127.0.0.1:{connect_proxy.port}"},
            )
            try:
                destination.wait_for("connected to the tunnel")
                source = ProxyProcess(
                    proxy_args(relay, "-s", "ECHO=0"),
                    token=tokens.source,
                    log_file=tmp_path / "s.log",
                )
                try:
                    sent, received = echo_roundtrip(source.port("ECHO"), 256 * 1024)
                finally:
                    source.stop()
            finally:
                destination.stop()
        finally:
            connect_proxy.close()

        assert sent == received
        assert len(connect_proxy.heads) == 1
        assert connect_proxy.heads[0].startswith(f"CONNECT 127.0.0.1:{relay.port} HTTP/1.1\r\n")
        assert "Proxy-Authorization: Basic dXNlcjpzQGNyZXQ=" in connect_proxy.heads[0]


class TestRetries:
    def test_unreachable_endpoint_is_retried_with_backoff_until_it_appears(
        self, tmp_path, relay, echo_server
    ):
        """A proxy started before the service retries (not in a storm) and then connects."""
        port = relay.port
        relay.stop()
        tokens = relay.open_tunnel(("ECHO",))
        proxy = ProxyProcess(
            proxy_args(relay, "-d", f"ECHO={echo_server.port}"),
            token=tokens.destination,
            log_file=tmp_path / "d.log",
        )
        try:
            time.sleep(1.5 * SCALE)
            attempts = proxy.log.count("retrying")
            relay.start(port=port)
            proxy.wait_for("connected to the tunnel", timeout=10)
        finally:
            proxy.stop()

        assert 2 <= attempts <= 12
        assert "Connection refused" in proxy.log or "Connect call failed" in proxy.log

    def test_5xx_handshake_is_retried_and_4xx_is_not(self, tmp_path):
        """A 503 answer is retried; a 400 answer ends the proxy with status 0."""
        answers = iter([b"503 Service Unavailable", b"503 Service Unavailable", b"400 Bad Request"])
        seen: list[str] = []

        def http(conn: socket.socket) -> None:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            seen.append(head.split(b"\r\n", 1)[0].decode())
            status = next(answers)
            body = b"Invalid access token"
            conn.sendall(
                b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )

        server = ThreadedServer(http)
        try:
            proxy = ProxyProcess(
                ["-e", f"127.0.0.1:{server.port}", "--no-tls", "-d", "9"],
                token="t",
                log_file=tmp_path / "p.log",
            )
            code = proxy.wait(15)
        finally:
            server.close()

        assert code == 0
        assert len(seen) == 3
        assert all(line.startswith("GET /tunnel?local-proxy-mode=destination ") for line in seen)
        assert proxy.log.count("handshake failed, retrying: 503") == 2
        assert "tunnel refused the connection: 400 Invalid access token" in proxy.log

    def test_unverified_certificate_is_refused_by_default(self, relay, tmp_path):
        """Without -c the emulator's self-signed chain fails verification; nothing connects."""
        tokens = relay.open_tunnel(("ECHO",))
        proxy = ProxyProcess(
            ["-e", f"127.0.0.1:{relay.port}", "-d", "9"],
            token=tokens.destination,
            log_file=tmp_path / "p.log",
        )
        try:
            proxy.wait_for("CERTIFICATE_VERIFY_FAILED")
        finally:
            proxy.stop()

        assert relay.tunnel(tokens.tunnel_id).destination.used is False


class TestLocalSide:
    def test_unreachable_service_resets_the_stream_after_retries(self, relay, tmp_path, pairs):
        """The destination retries the local connect, then resets; the source closes the client."""
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
        closed.close()
        tokens = relay.open_tunnel(("ECHO",))
        destination = ProxyProcess(
            [*proxy_args(relay, "-d", f"ECHO={dead_port}"), "--connect-retries", "2"],
            token=tokens.destination,
            log_file=tmp_path / "d.log",
        )
        destination.wait_for("connected to the tunnel")
        source = ProxyProcess(
            proxy_args(relay, "-s", "ECHO=0"), token=tokens.source, log_file=tmp_path / "s.log"
        )
        try:
            with connect(source.port("ECHO")) as client:
                client.sendall(b"hello")
                eof = client.recv(10)
        finally:
            source.stop()
            destination.stop()

        assert eof == b""
        assert destination.log.count(f"connect to 127.0.0.1:{dead_port} failed") == 2
        assert "stream reset service=ECHO stream=1" in source.log

    def test_keepalive_pings_are_answered(self, relay, echo_server, tmp_path):
        """The proxy pings on its interval with epoch-ms payloads and reads the pongs."""
        tokens = relay.open_tunnel(("ECHO",))
        proxy = ProxyProcess(
            [*proxy_args(relay, "-d", f"ECHO={echo_server.port}"), "--ping-interval", "0.1",
             "-v", "5"],
            token=tokens.destination,
            log_file=tmp_path / "d.log",
        )  # fmt: skip
        try:
            proxy.wait_for(r"pong rtt_ms=\d+(.|\n)*pong rtt_ms=\d+")
        finally:
            proxy.stop()

        assert tokens.destination not in proxy.log


class ScriptedService:
    """
    The service end of one WebSocket, frame by frame over a raw socket.

    For frames the relay never sends (fragments, text), which the proxy must leave to websockets.
    """

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.reader = StreamReader()

    def accept_upgrade(self) -> str:
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.conn.recv(4096)
        request, _, rest = head.partition(b"\r\n\r\n")
        assert not rest
        headers = dict(
            line.split(": ", 1) for line in request.decode().split("\r\n")[1:] if ": " in line
        )
        key = headers["Sec-WebSocket-Key"]
        self.conn.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key).encode() + b"\r\n"
            b"Sec-WebSocket-Protocol: aws.iot.securetunneling-3.0\r\n\r\n"
        )
        return request.split(b"\r\n", 1)[0].decode()

    def send(self, *frames: Frame) -> None:
        self.conn.sendall(b"".join(frame.serialize(mask=False) for frame in frames))

    def receive(self) -> Frame:
        parser = Frame.parse(self.reader.read_exact, mask=True)
        while True:
            try:
                next(parser)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            data = self.conn.recv(65536)
            assert data, "the proxy closed the connection"
            self.reader.feed_data(data)


class TestUnusualFrames:
    def test_fragments_pings_and_text_from_the_service(self, echo_server, tmp_path):
        """
        Fragments and text from the service reach websockets; data still flows both ways.

        A ping is answered on the fast path; a fragmented message hands the stream to websockets,
        which still delivers the tunnel's data both ways; a text frame then closes with 1003 and
        the proxy reconnects once, with backoff, to be refused.
        """
        outcome: dict[str, object] = {}

        def service(conn: socket.socket) -> None:
            if "request" in outcome:
                # Later connections: the token is spent, as on AWS.
                body = b"Invalid access token"
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 20\r\n\r\n" + body)
                return
            ws = ScriptedService(conn)
            outcome["request"] = ws.accept_upgrade()
            ws.send(Frame(Opcode.PING, b"1700000000000"))
            outcome["pong"] = ws.receive()
            ids = encode_frames(Message(SERVICE_IDS, available_service_ids=("ECHO",)))
            ws.send(
                Frame(Opcode.BINARY, ids[:3], fin=False),
                Frame(Opcode.CONT, ids[3:]),
                Frame(
                    Opcode.BINARY,
                    encode_frames(
                        Message(STREAM_START, stream_id=1, service_id="ECHO", connection_id=1),
                        Message(
                            DATA, stream_id=1, service_id="ECHO", connection_id=1, payload=b"hi!"
                        ),
                    ),
                ),
            )
            echoed = b""
            while echoed != b"hi!":
                frame = ws.receive()
                assert frame.opcode is Opcode.BINARY
                for message in decode_frames(frame.data):
                    if message.type == DATA:
                        echoed += message.payload
            outcome["echoed"] = echoed
            ws.send(Frame(Opcode.TEXT, b"not binary"))
            outcome["close"] = Close.parse(ws.receive().data)
            # The proxy closes the TCP connection right after its close frame: nothing to answer.

        server = ThreadedServer(service)
        proxy = ProxyProcess(
            ["-e", f"127.0.0.1:{server.port}", "--no-tls", "-d", f"ECHO={echo_server.port}"],
            token="t",
            log_file=tmp_path / "d.log",
        )
        try:
            code = proxy.wait(15)
        finally:
            proxy.stop()
            server.close()

        assert outcome["request"] == "GET /tunnel?local-proxy-mode=destination HTTP/1.1"
        assert outcome["pong"] == Frame(Opcode.PONG, b"1700000000000")
        assert outcome["echoed"] == b"hi!"
        assert outcome["close"] == Close(1003, "")
        # A violation ends the session like a drop: one reconnection, refused, exit 0.
        assert "connection lost (text frame received), reconnecting" in proxy.log
        assert server.accepted == 2
        assert code == 0
