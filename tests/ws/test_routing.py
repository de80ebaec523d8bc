"""
Tests for moving websockets' output to a transport.
"""

from __future__ import annotations

from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN
from websockets.server import ServerProtocol

from agent.ws.routing import write_pending


class RecordingTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def writelines(self, chunks) -> None:
        self.written.extend(chunks)

    def close(self) -> None:
        self.closed = True


class TestWritePending:
    def test_writes_frames_in_order_and_keeps_the_connection(self):
        """Queued frames go out in order; no close is expected while open."""
        ws = ServerProtocol(state=OPEN)
        ws.send_binary(b"one")
        ws.send_binary(b"two")
        transport = RecordingTransport()

        expect_close = write_pending(ws, transport)  # type: ignore[arg-type]

        assert transport.written == [b"\x82\x03one", b"\x82\x03two"]
        assert expect_close is False
        assert transport.closed is False

    def test_end_of_stream_closes_the_transport(self):
        """After the closing handshake websockets' EOF marker closes the transport."""
        ws = ServerProtocol(state=OPEN)
        ws.send_close(1000, "bye")
        ws.receive_data(Frame(Opcode.CLOSE, b"\x03\xe8bye").serialize(mask=True, extensions=[]))
        transport = RecordingTransport()

        expect_close = write_pending(ws, transport)  # type: ignore[arg-type]

        assert transport.written[0].startswith(b"\x88")
        assert b"" not in transport.written
        assert transport.closed is True
        assert expect_close is True
