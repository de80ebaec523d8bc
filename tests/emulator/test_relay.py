"""
Tests for the emulator's relay with a raw WebSocket client: handshake checks, framing, closes.
"""

from __future__ import annotations

import contextlib
import secrets
from typing import TYPE_CHECKING

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from agent.protocol import (
    DATA,
    SERVICE_IDS,
    STREAM_RESET,
    STREAM_START,
    Message,
)
from tests.integration.dataplane import RelayThread, TunnelTokens
from tests.protocol.helpers import decode_frames, encode_frames


if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

V3 = "aws.iot.securetunneling-3.0"


@pytest.fixture
def plain_relay(tmp_path: Path) -> Iterator[RelayThread]:
    relay = RelayThread(tmp_path, tls=False).start()
    yield relay
    relay.shutdown()


def open_ws(
    relay: RelayThread,
    mode: str,
    token: str,
    *,
    client_token: str | None = None,
    subprotocols: tuple[str, ...] = (V3,),
    path: str | None = None,
) -> ClientConnection:
    headers = {"access-token": token}
    if client_token:
        headers["client-token"] = client_token
    return connect(
        f"ws://127.0.0.1:{relay.port}{path or f'/tunnel?local-proxy-mode={mode}'}",
        additional_headers=headers,
        subprotocols=list(subprotocols),  # type: ignore[arg-type]
        open_timeout=5,
        close_timeout=2,
        max_size=131076,
        ping_interval=None,
    )


def refusal(relay, mode, token, **kwargs) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as info:
        open_ws(relay, mode, token, **kwargs)
    response = info.value.response
    return response.status_code, response.body.decode()


class TestHandshake:
    def test_service_ids_come_first_and_state_is_connected(self, plain_relay):
        """After 101 the relay sends SERVICE_IDS and marks the mode CONNECTED."""
        tokens = plain_relay.open_tunnel(("SSH", "HTTP"))

        with open_ws(plain_relay, "destination", tokens.destination) as ws:
            first = ws.recv(timeout=5)
            connected = plain_relay.tunnel(tokens.tunnel_id).destination.connected

        assert decode_frames(first) == [Message(SERVICE_IDS, available_service_ids=("SSH", "HTTP"))]
        assert ws.response.headers["sec-websocket-protocol"] == V3
        assert ws.response.headers["channel-id"]
        assert connected is True

    @pytest.mark.parametrize(
        ("path", "reason"),
        [
            ("/other?local-proxy-mode=source", "Invalid path"),
            ("/tunnel?local-proxy-mode=both", "Invalid local-proxy-mode"),
            ("/tunnel", "Invalid local-proxy-mode"),
        ],
    )
    def test_bad_path_or_mode(self, plain_relay, path, reason):
        """Paths other than /tunnel and unknown modes get 400 with the reason."""
        tokens = plain_relay.open_tunnel()

        assert refusal(plain_relay, "source", tokens.source, path=path) == (400, reason)

    def test_wrong_mode_and_unknown_token(self, plain_relay):
        """A token of the other mode, or an unknown one, is refused with 400."""
        tokens = plain_relay.open_tunnel()

        status, _ = refusal(plain_relay, "destination", tokens.source)
        unknown, _ = refusal(plain_relay, "source", "nope")

        assert status == 400
        assert unknown == 400

    def test_client_token_binding(self, plain_relay):
        """A CAT bound to a client token reconnects with it and is refused with another."""
        tokens = plain_relay.open_tunnel()
        bound = secrets.token_hex(20)
        with open_ws(plain_relay, "source", tokens.source, client_token=bound):
            pass

        with open_ws(plain_relay, "source", tokens.source, client_token=bound) as ws:
            reconnected = ws.recv(timeout=5)
        status, reason = refusal(
            plain_relay, "source", tokens.source, client_token=secrets.token_hex(20)
        )

        assert decode_frames(reconnected)[0].type is SERVICE_IDS
        assert status == 400
        assert "does not match" in reason

    def test_no_common_subprotocol_keeps_the_token(self, plain_relay):
        """Offering only unknown subprotocols is refused before the token is spent."""
        tokens = plain_relay.open_tunnel()

        status, reason = refusal(plain_relay, "source", tokens.source, subprotocols=("other-1.0",))

        assert (status, reason) == (400, "No supported sec-websocket-protocol")
        assert plain_relay.tunnel(tokens.tunnel_id).source.used is False

    def test_v1_gets_no_service_ids(self, plain_relay):
        """A 1.0 client receives no SERVICE_IDS (a choice, docs/protocol.md §6.2)."""
        tokens = plain_relay.open_tunnel()
        v1 = "aws.iot.securetunneling-1.0"

        with open_ws(plain_relay, "source", tokens.source, subprotocols=(v1,)) as ws:
            with pytest.raises(TimeoutError):
                ws.recv(timeout=0.3)
            subprotocol = ws.subprotocol

        assert subprotocol == v1


def start_and_data(payload: bytes) -> tuple[bytes, bytes]:
    """A STREAM_START frame and a DATA frame on stream 1 of SSH."""
    start = encode_frames(Message(STREAM_START, stream_id=1, service_id="SSH", connection_id=1))
    data = encode_frames(
        Message(DATA, stream_id=1, service_id="SSH", connection_id=1, payload=payload)
    )
    return start, data


@contextlib.contextmanager
def attached_pair(
    relay: RelayThread, tokens: TunnelTokens | None = None
) -> Iterator[tuple[ClientConnection, ClientConnection]]:
    """A destination and a source on an SSH tunnel (a new one by default), past SERVICE_IDS."""
    tokens = tokens or relay.open_tunnel(("SSH",))
    with (
        open_ws(relay, "destination", tokens.destination) as dst,
        open_ws(relay, "source", tokens.source) as src,
    ):
        dst.recv(timeout=5)
        src.recv(timeout=5)
        yield dst, src


def recv_bytes(ws: ClientConnection, size: int) -> bytes:
    """Binary messages received until ``size`` bytes, joined."""
    got = b""
    while len(got) < size:
        got += ws.recv(timeout=5)
    return got


class TestForwarding:
    def test_frames_cross_byte_for_byte_and_violations_close_1008(self, plain_relay):
        """Valid frames reach the peer unchanged; a destination STREAM_START closes it (1008)."""
        start, data = start_and_data(b"x" * 9000)
        with attached_pair(plain_relay) as (dst, src):
            src.send(start + data)
            got = recv_bytes(dst, len(start + data))
            dst.send(encode_frames(Message(STREAM_START, stream_id=2, service_id="SSH")))
            with pytest.raises(ConnectionClosed):
                dst.recv(timeout=5)

        assert got == start + data
        assert dst.close_code == 1008

    def test_fragmented_messages_are_forwarded_and_frames_after_them_too(self, plain_relay):
        """A message in fragments, cut inside a tunnel frame, arrives whole; so does the next."""
        start, data = start_and_data(b"y" * 700)
        with attached_pair(plain_relay) as (dst, src):
            src.send(iter([start[:5], start[5:] + data[:100], data[100:]]))
            src.send(data)
            got = recv_bytes(dst, len(start + data + data))

        assert got == start + data + data

    def test_pings_between_data_are_answered(self, plain_relay):
        """A ping among data frames gets its pong at once, and the data still crosses."""
        start, data = start_and_data(b"z" * 300)
        with attached_pair(plain_relay) as (dst, src):
            src.send(start + data)
            answered = [src.ping(b"p1"), src.ping(b"p2")]
            src.send(data)
            got = recv_bytes(dst, len(start + data + data))
            pongs = [event.wait(timeout=5) for event in answered]

        assert got == start + data + data
        assert pongs == [True, True]

    def test_text_frame_closes_1003_and_oversize_1009(self, plain_relay):
        """Text frames and messages over 131076 bytes close the connection."""
        tokens = plain_relay.open_tunnel(("SSH",))
        with open_ws(plain_relay, "source", tokens.source, client_token="a" * 32) as ws:
            ws.recv(timeout=5)
            ws.send("hello")
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=5)
        with open_ws(plain_relay, "source", tokens.source, client_token="a" * 32) as big:
            big.recv(timeout=5)
            big.send(b"\x00" * 131077)
            with pytest.raises(ConnectionClosed):
                big.recv(timeout=5)

        assert ws.close_code == 1003
        assert big.close_code == 1009

    def test_reconnecting_source_resets_the_destinations_streams(self, plain_relay):
        """A reconnecting source replaces the old socket; the destination gets STREAM_RESET."""
        tokens = plain_relay.open_tunnel(("SSH",))
        token = secrets.token_hex(20)
        with open_ws(plain_relay, "destination", tokens.destination) as dst:
            dst.recv(timeout=5)
            with open_ws(plain_relay, "source", tokens.source, client_token=token) as old:
                old.recv(timeout=5)
                start = Message(STREAM_START, stream_id=5, service_id="SSH", connection_id=1)
                old.send(encode_frames(start))
                dst.recv(timeout=5)
                with open_ws(plain_relay, "source", tokens.source, client_token=token) as new:
                    new.recv(timeout=5)
                    reset = dst.recv(timeout=5)
                    with pytest.raises(ConnectionClosed):
                        old.recv(timeout=5)

        assert decode_frames(reset) == [Message(STREAM_RESET, stream_id=5, service_id="SSH")]
        assert old.close_code == 1000

    def test_close_tunnel_sends_1000_to_both(self, plain_relay):
        """CloseTunnel closes both WebSockets with 1000 and marks both DISCONNECTED."""
        tokens = plain_relay.open_tunnel(("SSH",))
        with attached_pair(plain_relay, tokens) as (dst, src):
            plain_relay.close_tunnel(tokens.tunnel_id)
            for ws in (src, dst):
                with pytest.raises(ConnectionClosed):
                    ws.recv(timeout=5)
        tunnel = plain_relay.tunnel(tokens.tunnel_id)

        assert (src.close_code, dst.close_code) == (1000, 1000)
        assert src.close_reason == "tunnel closed"
        assert not tunnel.source.connected
        assert not tunnel.destination.connected
