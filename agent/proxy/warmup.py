"""
A rehearsal: the launcher runs one destination session on loopback before its first fork.

A forked proxy owns, in private memory, every shared page it writes. Much of what a new proxy
writes in its first milliseconds is first-use work that is the same in every proxy: uvloop's
and asyncio's lazily built state, type attribute caches and version tags, bytecode
specialisation, the first calls into websockets, the tunnel protocol and logging. Done once in
the launcher, before ``gc.freeze()`` and the first fork, it is shared by every child instead of
repeated in each (docs/architecture.md §5.2 has the figures).

The rehearsal is the proxy's own code (``run_proxy``) against a stand-in relay: WebSocket
handshake, SERVICE_IDS, one stream to a local listener carrying a few bytes each way, the
reset that ends it, then a close frame, which ends the session as the service would. Plain
TCP: a TLS rehearsal would need a server key. The stand-in runs in a short-lived forked
process with blocking sockets, so the launcher never starts a thread (forking after one is
unsafe) and imports nothing a proxy does not.

Bounded in time and best effort: a failed rehearsal costs memory, never a tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
from typing import TYPE_CHECKING

from agent.common.loop import run
from agent.protocol import (
    DESTINATION,
    FrameBuffer,
    Message,
    MessageType,
    ProtocolVersion,
    decode_message,
    encode_frame,
    encode_message,
)
from agent.proxy.mapping import Target
from agent.proxy.options import ProxyOptions
from agent.proxy.runner import run_proxy


if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from websockets.server import ServerProtocol


__all__ = ["rehearse"]

_SERVICE = "SSH"
_REQUEST = b"rehearsal"
_REPLY = b"ok"
# Seconds: each blocking step of the stand-in, and the whole session.
_STEP_TIMEOUT = 2.0
_LIMIT = 5.0
_RESETS = frozenset({MessageType.CONNECTION_RESET, MessageType.STREAM_RESET})


def rehearse(setup_logging: Callable[[io.StringIO], object]) -> bool:
    """
    Run one destination session against a stand-in relay.

    Args:
        setup_logging: Routes the proxy's log to the given throwaway stream, as a proxy's
            own start does, so that its first records are formatted here too.

    Returns:
        True when the session went the whole way (the stand-in saw every step).
    """
    relay = _listener()
    target = _listener()
    with relay, target:
        relay_port, target_port = relay.getsockname()[1], target.getsockname()[1]
        pid = os.fork()
        if pid == 0:  # the stand-in: never returns
            code = 1
            try:
                code = 0 if _stand_in(relay, target) else 1
            finally:
                os._exit(code)
    try:
        setup_logging(io.StringIO())
        _session(relay_port, target_port)
    finally:
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def _listener() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    return listener


def _session(relay_port: int, target_port: int) -> None:
    read_end, write_end = os.pipe()  # the report channel, as the agent gives one
    pipe = os.fstat(write_end)
    try:
        options = ProxyOptions(
            mode=DESTINATION,
            host="127.0.0.1",  # numeric: no resolver thread
            port=relay_port,
            token="rehearsal",  # noqa: S106 - the stand-in accepts anything
            targets={_SERVICE: Target(host="127.0.0.1", port=target_port)},
            tls=False,
            report_fd=write_end,  # the reporter owns and closes it
        )

        async def bounded() -> int:
            stop = asyncio.Event()
            asyncio.get_running_loop().call_later(_LIMIT, stop.set)
            return await run_proxy(options, stop)

        run(bounded())
    finally:
        os.close(read_end)
        with contextlib.suppress(OSError):  # closed by the reporter, unless it never started
            if os.path.samestat(os.fstat(write_end), pipe):
                os.close(write_end)


def _stand_in(relay: socket.socket, target: socket.socket) -> bool:
    """
    Play the relay and the local service for one session; True when every step happened.
    """
    from websockets.frames import Frame, Opcode  # noqa: PLC0415 - the stand-in's only
    from websockets.http11 import Request  # noqa: PLC0415
    from websockets.server import ServerProtocol  # noqa: PLC0415
    from websockets.typing import Subprotocol  # noqa: PLC0415

    relay.settimeout(_STEP_TIMEOUT)
    target.settimeout(_STEP_TIMEOUT)
    conn, _ = relay.accept()
    conn.settimeout(_STEP_TIMEOUT)
    ws = ServerProtocol(subprotocols=[Subprotocol(ProtocolVersion.V3.subprotocol)])
    events = _events(conn, ws)
    request = next(events)
    if not isinstance(request, Request):
        return False
    ws.send_response(ws.accept(request))
    for message in (
        Message(MessageType.SERVICE_IDS, available_service_ids=(_SERVICE,)),
        Message(MessageType.STREAM_START, stream_id=1, service_id=_SERVICE, connection_id=1),
        Message(
            MessageType.DATA, stream_id=1, service_id=_SERVICE, connection_id=1, payload=_REQUEST
        ),
    ):
        ws.send_binary(encode_frame(encode_message(message)))
    _flush(conn, ws)
    local, _ = target.accept()
    with local:
        local.settimeout(_STEP_TIMEOUT)
        received = b""
        while len(received) < len(_REQUEST) and (chunk := local.recv(64)):
            received += chunk
        local.sendall(_REPLY)
    replied = reset = False
    frames = FrameBuffer()
    for event in events:
        if isinstance(event, Frame) and event.opcode is Opcode.BINARY:
            frames.feed(event.data)
            while (span := frames.next_span()) is not None:
                buf, start, end = span
                message = decode_message(bytes(buf[start:end]))
                replied = replied or message.payload == _REPLY
                reset = reset or message.type in _RESETS
        if replied and reset:
            break
    ws.send_close(1000)
    _flush(conn, ws)
    for _ in events:  # the proxy's close frame, then end of file
        pass
    conn.close()
    return received == _REQUEST and replied and reset


def _events(conn: socket.socket, ws: ServerProtocol) -> Iterator[object]:
    """
    What the proxy sends, as websockets events, until it closes the connection.
    """
    while chunk := conn.recv(65536):
        ws.receive_data(chunk)
        _flush(conn, ws)  # pongs, the close frame's echo
        yield from ws.events_received()
    ws.receive_eof()


def _flush(conn: socket.socket, ws: ServerProtocol) -> None:
    for data in ws.data_to_send():
        if data:
            conn.sendall(data)
        else:
            conn.shutdown(socket.SHUT_WR)
