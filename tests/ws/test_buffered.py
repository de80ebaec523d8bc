"""
Tests for the asyncio side of a WebSocket: routing what arrives, flushing, the close timeout.

A small client subclass talks over 127.0.0.1 to a server driven by websockets' sans-I/O
ServerProtocol, so each test decides what the server sends and whether it answers a close.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from agent.protocol import (
    CLIENT,
    DATA,
    DESTINATION,
    MAX_WS_MESSAGE_SIZE,
    SOURCE,
    STREAM_START,
    DataReceived,
    Message,
    StreamStarted,
    TunnelProtocol,
)
from agent.ws import buffered
from agent.ws.buffered import BufferedWebSocket
from tests.protocol.helpers import decode_frames, frame


if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from websockets.http11 import Response

    from agent.protocol import Event


class Client(BufferedWebSocket):
    """A client that records what the hooks see and sends nothing of its own accord."""

    def __init__(self, port: int, tunnel: TunnelProtocol) -> None:
        ws = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/"))
        super().__init__(ws, tunnel, max_size=MAX_WS_MESSAGE_SIZE, high_water=64 * 1024)
        self.opened: asyncio.Future[int] = self._loop.create_future()
        self.lost: asyncio.Future[Exception | None] = self._loop.create_future()
        self.events: list[Event] = []
        self.arrived = asyncio.Event()
        self.frames: list[Opcode] = []

    def _connected(self) -> None:
        self.ws.send_request(self.ws.connect())
        self._flush_ws()

    def _response_received(self, response: Response) -> None:
        self.opened.set_result(response.status_code)

    def _frame_received(self, frame: Frame) -> None:
        self.frames.append(frame.opcode)

    def _messages_received(self, tunnel: TunnelProtocol) -> None:
        self.events.extend(tunnel.events_received())
        self.arrived.set()

    def _disconnected(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


class Server:
    """websockets' sans-I/O server on the accepted socket; frames go out only when told."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.ws = ServerProtocol()
        self._frames: list[Frame] = []

    async def accept(self) -> None:
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            assert data, "client left during the handshake"
            self.ws.receive_data(data)
            for event in self.ws.events_received():
                if isinstance(event, Request):
                    self.ws.send_response(self.ws.accept(event))
                    self.writer.write(b"".join(self.ws.data_to_send()))
                    return

    async def frame(self) -> Frame:
        while not self._frames:
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            if not data:
                raise EOFError
            self.ws.receive_data(data)
            self._frames.extend(e for e in self.ws.events_received() if isinstance(e, Frame))
        return self._frames.pop(0)

    def send(self, *frames: Frame) -> None:
        """Write the frames with one write: they arrive together."""
        self.writer.write(b"".join(f.serialize(mask=False, extensions=[]) for f in frames))


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[TunnelProtocol], Awaitable[tuple[Client, Server]]]]:
    """Connect a Client with the given tunnel core to a fresh Server; both are closed after."""
    accepted: asyncio.Queue[Server] = asyncio.Queue()
    listener = await asyncio.start_server(
        lambda r, w: accepted.put_nowait(Server(r, w)), "127.0.0.1", 0
    )
    port = listener.sockets[0].getsockname()[1]
    made: list[tuple[Client, Server]] = []

    async def connect_(tunnel: TunnelProtocol) -> tuple[Client, Server]:
        client = Client(port, tunnel)
        await asyncio.get_running_loop().create_connection(lambda: client, "127.0.0.1", port)
        server = await asyncio.wait_for(accepted.get(), 5)
        made.append((client, server))
        await server.accept()
        assert await asyncio.wait_for(client.opened, 5) == 101
        return client, server

    yield connect_
    for client, server in made:
        if client.transport is not None:
            client.transport.abort()
        server.writer.close()
        await asyncio.wait_for(client.lost, 5)
    listener.close()
    await listener.wait_closed()


class TestReceiving:
    async def test_binary_messages_reach_the_tunnel_and_a_ping_is_answered(self, connect):
        """Data between and around a ping reaches the tunnel core; the pong goes out unasked."""
        client, server = await connect(TunnelProtocol(CLIENT, DESTINATION, services=("SSH",)))
        start = frame(STREAM_START, stream_id=1, service_id="SSH", connection_id=1)
        data = frame(DATA, stream_id=1, service_id="SSH", connection_id=1, payload=b"hello")

        server.send(
            Frame(Opcode.BINARY, start), Frame(Opcode.PING, b"p1"), Frame(Opcode.BINARY, data)
        )
        pong = await server.frame()
        while len(client.events) < 2:
            client.arrived.clear()
            await asyncio.wait_for(client.arrived.wait(), 5)

        assert client.events == [
            StreamStarted("SSH", 1, 1),
            DataReceived("SSH", 1, 1, b"hello"),
        ]
        assert (pong.opcode, pong.data) == (Opcode.PONG, b"p1")
        assert client.frames == [Opcode.PING]
        assert not client._reader.handed_over  # the data took the fast path

    async def test_flush_sends_the_tunnels_messages_masked(self, connect):
        """flush() writes what the tunnel core queued as binary frames the server accepts."""
        tunnel = TunnelProtocol(CLIENT, SOURCE, services=("SSH",))
        client, server = await connect(tunnel)
        stream_id, connection_id = tunnel.send_stream_start("SSH")

        client.flush()
        sent = await server.frame()

        assert sent.opcode is Opcode.BINARY
        assert decode_frames(sent.data) == [
            Message(
                STREAM_START, stream_id=stream_id, service_id="SSH", connection_id=connection_id
            )
        ]
        assert tunnel.messages_to_send() == []


class TestClosing:
    async def test_a_peer_that_never_answers_the_close_is_aborted(self, connect, monkeypatch):
        """After close(), a server that neither answers nor closes loses the connection."""
        monkeypatch.setattr(buffered, "CLOSE_TIMEOUT", 0.3)
        client, server = await connect(TunnelProtocol(CLIENT, SOURCE, services=("SSH",)))
        loop = asyncio.get_running_loop()
        began = loop.time()

        client.close(1000, "bye")
        close = await server.frame()
        exc = await asyncio.wait_for(client.lost, 5)
        waited = loop.time() - began
        rest = await asyncio.wait_for(server.reader.read(), 5)

        assert close.opcode is Opcode.CLOSE
        assert Close.parse(close.data) == Close(1000, "bye")
        assert exc is None
        assert waited >= 0.3
        assert rest == b""

    async def test_a_peer_that_answers_in_time_cancels_the_timeout(self, connect):
        """The server's close frame and TCP close end the connection well before the timeout."""
        client, server = await connect(TunnelProtocol(CLIENT, SOURCE, services=("SSH",)))
        loop = asyncio.get_running_loop()
        began = loop.time()

        client.close(1001, "going")
        await server.frame()
        server.writer.write(b"".join(server.ws.data_to_send()))  # the reply, then EOF
        server.writer.close()
        exc = await asyncio.wait_for(client.lost, 5)
        waited = loop.time() - began

        assert exc is None
        assert waited < buffered.CLOSE_TIMEOUT / 2
        assert client.ws.close_rcvd == Close(1001, "going")
        assert client._close_handle is not None
        assert client._close_handle.cancelled()

    async def test_end_of_stream_without_a_close_frame_ends_the_connection(self, connect):
        """A TCP close with no close frame reaches the subclass, with no close timeout armed."""
        client, server = await connect(TunnelProtocol(CLIENT, SOURCE, services=("SSH",)))

        server.writer.close()
        exc = await asyncio.wait_for(client.lost, 5)

        assert exc is None
        assert client.ws.close_rcvd is None
        assert client._close_handle is None
