"""
One WebSocket session of a local proxy: bytes between an asyncio transport and the sans-I/O cores.

websockets' ``ClientProtocol`` does the HTTP upgrade, control frames and closing; binary messages
take the fast path of ``agent.ws.frames``; ``TunnelProtocol`` does the tunnel frames. This
module only moves bytes, keeps the session alive with pings (docs/protocol.md §4.3) and turns
transport flow control into calls on the application (the ``Bridge``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, cast

from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State

from agent.exceptions import AgentError
from agent.protocol import MAX_WS_MESSAGE_SIZE, Event, ProtocolFailed
from agent.ws.frames import FrameReader, FrameWriter
from agent.ws.routing import route_received, websocket_events, write_pending


if TYPE_CHECKING:
    from websockets.client import ClientProtocol
    from websockets.http11 import Request

    from agent.protocol import TunnelProtocol
    from agent.protocol.messages import Buffer


__all__ = ["HandshakeFailed", "SessionEnd", "TunnelApp", "TunnelWebSocket"]

log = logging.getLogger("agent.proxy")

# Bytes queued towards the service before local sockets stop being read (backpressure).
WS_WRITE_HIGH_WATER = 64 * 1024
# WebSocket receive buffer: a largest message (131 KB) and room for the next one to start.
READ_BUFFER_SIZE = 160 * 1024
# Time allowed for the closing handshake before the TCP connection is aborted.
CLOSE_TIMEOUT = 2.0


class HandshakeFailed(AgentError):
    """
    The service refused the WebSocket upgrade (docs/protocol.md §3.6).

    Attributes:
        status: HTTP status, or 0 when no valid response arrived.
        reason: The service's plain-text reason (never contains the token).
    """

    def __init__(self, status: int, reason: str) -> None:
        """
        Record the status and reason.
        """
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    @property
    def retryable(self) -> bool:
        """
        5xx and malformed responses are retried; 4xx end the proxy (docs/protocol.md §8.2).
        """
        return not 400 <= self.status < 500

    def __str__(self) -> str:
        """
        Render as ``status reason``.
        """
        return f"{self.status} {self.reason}".strip()


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """
    How a WebSocket session ended.

    Attributes:
        close: The close frame received from the service, if any: the tunnel is over.
        error: What broke the session otherwise (protocol failure, I/O error, abrupt drop).
    """

    close: Close | None
    error: str


class TunnelApp(Protocol):
    """
    What a session drives: the source or destination side of the proxy.
    """

    def session_started(self, conn: TunnelWebSocket) -> None:
        """
        The handshake succeeded; ``conn.tunnel`` is ready.
        """

    def handle_event(self, event: Event) -> None:
        """
        A tunnel event arrived.
        """

    def session_ended(self) -> None:
        """
        The WebSocket is gone; close every local connection.
        """

    def pause_locals(self) -> None:
        """
        The WebSocket's send buffer is full: stop reading local sockets.
        """

    def resume_locals(self) -> None:
        """
        The WebSocket's send buffer drained: read local sockets again.
        """


class TunnelWebSocket(asyncio.BufferedProtocol):
    """
    asyncio glue for one WebSocket session.
    """

    def __init__(
        self,
        ws: ClientProtocol,
        tunnel: TunnelProtocol,
        request: Request,
        app: TunnelApp,
        *,
        ping_interval: float = 20.0,
    ) -> None:
        """
        Prepare a session; nothing is sent before ``connection_made``.

        Args:
            ws: websockets' sans-I/O client, not yet connected.
            tunnel: The tunnel protocol core for this session.
            request: The upgrade request, headers included.
            app: The side of the proxy the events go to.
            ping_interval: Seconds between keepalive pings (docs/protocol.md §4.3: 20 s).
        """
        loop = asyncio.get_running_loop()
        self.ws = ws
        self.tunnel = tunnel
        self.app = app
        self._request = request
        self._loop = loop
        self._ping_interval = ping_interval
        self._ping_handle: asyncio.TimerHandle | None = None
        self._close_handle: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.ended: asyncio.Future[SessionEnd] = loop.create_future()
        self.channel_id = ""
        self._failure = ""
        self._started = False
        self._reading_paused = False
        # websockets was fed bytes since its output was last written. Every other call into it is
        # followed by _flush_ws at once; this spares the data path that call per message.
        self._ws_dirty = False
        self._reader = FrameReader(
            masked=False, max_size=MAX_WS_MESSAGE_SIZE, buffer_size=READ_BUFFER_SIZE
        )
        self._writer = FrameWriter(mask=True, max_size=MAX_WS_MESSAGE_SIZE)

    # asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """
        Send the upgrade request.
        """
        # uvloop's transports are not asyncio.Transport subclasses: cast, don't check.
        self.transport = cast("asyncio.Transport", transport)
        transport = self.transport
        transport.set_write_buffer_limits(high=WS_WRITE_HIGH_WATER)
        self.ws.send_request(self._request)
        self._flush_ws()

    def get_buffer(self, sizehint: int) -> memoryview:  # noqa: ARG002 - our size is fixed
        """
        Read into the frame reader's buffer.

        With a plain Protocol, the TLS layer allocates a 256 KB bytes object for every record it
        decrypts and shrinks it (mmap, mremap, munmap per message); reading into our buffer
        spares all of that, which halves the CPU of a small round trip.
        """
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        """
        Parse what arrived.
        """
        self._reader.buffer_updated(nbytes)
        self._received()

    def data_received(self, data: bytes | memoryview) -> None:
        """
        Parse what arrived (transports that are not buffered).
        """
        self._reader.receive(data, self._received)

    def _received(self) -> None:
        """
        Split the stream: tunnel messages to the tunnel core, the rest to websockets.
        """
        tunnel = self.tunnel
        if not route_received(self._reader, self.ws, self._receive_ws, lambda: tunnel):
            return
        events = tunnel.events_received()
        if events:
            handle = self.app.handle_event
            for tunnel_event in events:
                if isinstance(tunnel_event, ProtocolFailed):
                    self._fail_session(f"protocol error: {tunnel_event.reason}", 1002)
                    break
                handle(tunnel_event)
        self.flush()

    def _receive_ws(self, data: Buffer) -> None:
        """
        Feed websockets: the handshake response, control frames, anything unusual.
        """
        self._ws_dirty = True
        for event in websocket_events(self.ws, data, self.tunnel):
            if isinstance(event, Frame):
                if event.opcode is Opcode.PONG:
                    self._pong(bytes(event.data))
                elif event.opcode is Opcode.TEXT:
                    # Binary frames only (docs/protocol.md §4.1).
                    self._fail_session("text frame received", 1003)
            elif isinstance(event, Response):
                self._handshake_done(event)

    def eof_received(self) -> bool:
        """
        The service closed its side; let the transport close.
        """
        self.ws.receive_eof()
        self._flush_ws()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """
        Resolve the session's end and release the application's local connections.
        """
        for handle in (self._ping_handle, self._close_handle):
            if handle is not None:
                handle.cancel()
        if self._reading_paused:
            self.app.resume_locals()
        if self._started:
            self.app.session_ended()
        close = self.ws.close_rcvd
        error = self._failure or (str(exc) if exc else "") or ("" if close else "connection lost")
        if not self.handshake.done():
            self.handshake.set_exception(HandshakeFailed(0, error or "connection closed"))
        if not self.ended.done():
            self.ended.set_result(SessionEnd(close=close, error=error))

    def pause_writing(self) -> None:
        """
        The service is not keeping up: stop reading local sockets.
        """
        self._reading_paused = True
        self.app.pause_locals()

    def resume_writing(self) -> None:
        """
        Resume reading local sockets.
        """
        self._reading_paused = False
        self.app.resume_locals()

    # Used by the application

    def flush(self) -> None:
        """
        Send what websockets queued (pongs, close), then the tunnel core's messages.
        """
        if self._ws_dirty:
            self._flush_ws()
        messages = self.tunnel.messages_to_send()
        if messages and self.ws.state is State.OPEN and self.transport is not None:
            self.transport.writelines(self._writer.frames(messages))

    def pause_reading(self) -> None:
        """
        Stop reading the WebSocket (a local socket is congested).
        """
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """
        Read the WebSocket again.
        """
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self, code: int = 1000, reason: str = "") -> None:
        """
        Start the closing handshake; the transport is aborted if it does not complete in time.
        """
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, reason)
            self._flush_ws()
        elif self.transport is not None and self.ws.state is State.CONNECTING:
            self.transport.close()
        self._arm_close_timeout()

    # Internals

    def _flush_ws(self) -> None:
        self._ws_dirty = False
        if self.transport is not None and write_pending(self.ws, self.transport):
            self._arm_close_timeout()

    def _arm_close_timeout(self) -> None:
        if self._close_handle is None and self.transport is not None:
            self._close_handle = self._loop.call_later(CLOSE_TIMEOUT, self.transport.abort)

    def _handshake_done(self, response: Response) -> None:
        exc = self.ws.handshake_exc
        if exc is None and not response.headers.get("sec-websocket-protocol"):
            # The AWS localproxy treats a missing subprotocol as fatal for the session.
            exc = ValueError("no sec-websocket-protocol in the response")
        if exc is not None:
            body = response.body.decode("utf-8", "replace").strip().splitlines()
            status = response.status_code if response.status_code != 101 else 0
            reason = body[0][:300] if body else (response.reason_phrase or str(exc))
            self._failure = f"handshake failed: {status} {reason}"
            if not self.handshake.done():
                self.handshake.set_exception(HandshakeFailed(status, reason))
            if self.transport is not None:
                self.transport.close()
            return
        self.channel_id = response.headers.get("channel-id", "")
        self._started = True
        self.app.session_started(self)
        self._schedule_ping()
        if not self.handshake.done():
            self.handshake.set_result(None)

    def _schedule_ping(self) -> None:
        if self._ping_interval > 0:
            self._ping_handle = self._loop.call_later(self._ping_interval, self._ping)

    def _ping(self) -> None:
        if self.ws.state is State.OPEN:
            # Payload: ASCII epoch milliseconds, as the AWS localproxy sends
            # (docs/protocol.md §4.3).
            self.ws.send_ping(str(int(time.time() * 1000)).encode())
            self._flush_ws()
            self._schedule_ping()

    def _pong(self, data: bytes) -> None:
        try:
            sent = int(data.decode("ascii"))
        except ValueError:
            return
        log.debug("pong rtt_ms=%d", int(time.time() * 1000) - sent)

    def _fail_session(self, reason: str, code: int) -> None:
        self._failure = reason
        if self.ws.state is State.OPEN:
            self.ws.fail(code, "")
        self._flush_ws()
        if self.transport is not None:
            self.transport.close()
