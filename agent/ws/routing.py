"""
Glue between websockets, the WebSocket fast path and asyncio, shared by the proxy and the relay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from websockets.frames import Frame, Opcode
from websockets.protocol import State


if TYPE_CHECKING:
    import asyncio
    from collections.abc import Callable, Iterator

    from websockets.http11 import Request, Response
    from websockets.protocol import Protocol

    from agent.protocol import TunnelProtocol
    from agent.protocol.messages import Buffer
    from agent.ws.frames import FrameReader


__all__ = ["route_received", "websocket_events", "write_pending"]

# Opcodes that carry tunnel bytes: a binary frame and the continuations of a fragmented one.
_DATA_OPCODES = frozenset((Opcode.BINARY, Opcode.CONT))


def route_received(
    reader: FrameReader,
    ws: Protocol,
    to_websockets: Callable[[Buffer], None],
    tunnel: Callable[[], TunnelProtocol | None],
) -> bool:
    """
    Route what ``reader`` holds to websockets or to the tunnel core.

    The HTTP head and raw frames go to websockets; binary payloads to the tunnel core, once the
    handshake has made one.

    Returns:
        False while the HTTP head is incomplete.
    """
    if not reader.head_done:
        head = reader.head()
        if head is None:
            return False
        to_websockets(head)
        reader.open(fast=ws.state is State.OPEN and tunnel() is not None)
    core = tunnel()
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
    Feed websockets; give the tunnel core the data frames, yield every other event.

    Binary frames and continuations go on as they come, fragments included: tunnel frames may
    span WebSocket messages (docs/protocol.md §5.1). They go only while the connection is open:
    once the caller has failed it (on a text frame, say), websockets' closing rules apply.
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
