"""
Routing: received frames to websockets or to the binary-message consumer; websockets' output out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from websockets.frames import Frame, Opcode
from websockets.protocol import State


if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Iterator
    from typing import Protocol as Structural

    from websockets.http11 import Request, Response
    from websockets.protocol import Protocol

    from agent.protocol import TunnelProtocol
    from agent.protocol.messages import Buffer
    from agent.ws.frames import FrameReader

    class _HasTunnel(Structural):
        """
        What holds the binary-message consumer; it may appear during the handshake.
        """

        @property
        def tunnel(self) -> TunnelProtocol | None: ...


__all__ = ["route_received", "websocket_events", "write_pending"]

# Opcodes of binary messages: a binary frame and the continuations of a fragmented one.
_DATA_OPCODES = frozenset((Opcode.BINARY, Opcode.CONT))


def route_received(
    reader: FrameReader,
    ws: Protocol,
    to_websockets: Callable[[Buffer], None],
    owner: _HasTunnel,
) -> bool:
    """
    Route what ``reader`` holds to websockets or to ``owner.tunnel``, the binary-message consumer.

    The HTTP head and raw frames go to websockets; binary payloads to the consumer, once there
    is one (``owner.tunnel`` is read again after the head: the handshake may create it). An
    attribute rather than a getter: this runs once per read, and a read costs less than a call.

    Returns:
        False while the HTTP head is incomplete.
    """
    if not reader.head_done:
        head = reader.head()
        if head is None:
            return False
        to_websockets(head)
        reader.open(fast=ws.state is State.OPEN and owner.tunnel is not None)
    core = owner.tunnel
    for raw, chunk in reader.frames():
        if not raw:
            if core is not None:
                core.receive_message(chunk)
            continue
        to_websockets(chunk)
        if ws.state is not State.OPEN:
            # Closing: websockets discards what follows, as RFC 6455 asks.
            reader.hand_over()
            break
    return True


def websocket_events(
    ws: Protocol, data: Buffer, tunnel: TunnelProtocol | None
) -> Iterator[Frame | Request | Response]:
    """
    Feed websockets; give ``tunnel`` the binary frames' payloads, yield every other event.

    Binary frames and continuations go on as they come, fragments included: the consumer reads
    a byte stream, not messages. They go only while the connection is open: once the caller has
    failed it (on a text frame, say), websockets' closing rules apply.
    """
    ws.receive_data(bytes(data))  # raw items are bytes already: no copy
    for event in ws.events_received():
        if isinstance(event, Frame) and event.opcode in _DATA_OPCODES:
            if tunnel is not None and ws.state is State.OPEN:
                tunnel.receive_message(event.data)
        else:
            yield event


def write_pending(ws: Protocol, transport: asyncio.Transport) -> bool:
    """
    Write what ``ws`` queued, honouring its end-of-stream marker.

    Returns:
        Whether websockets now expects the TCP connection to close (the caller arms a timeout
        that aborts it, as websockets' own asyncio layer does).
    """
    chunks = ws.data_to_send()
    if chunks:
        if chunks[-1] == b"":
            # websockets signals "send EOF" with an empty chunk; TLS cannot half-close.
            transport.writelines(chunks[:-1])
            transport.close()
        else:
            transport.writelines(chunks)
    return ws.close_expected()
