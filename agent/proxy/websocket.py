"""
One WebSocket session of a local proxy: bytes between an asyncio transport and the sans-I/O cores.

websockets' ``ClientProtocol`` does the HTTP upgrade, control frames and closing; binary messages
take the fast path of ``agent.ws.frames``; ``TunnelProtocol`` does the tunnel frames;
``agent.ws.buffered`` moves the bytes. This module checks the handshake's response, keeps the
session alive with pings (docs/protocol.md §4.3) and turns transport flow control and the
tunnel's events into calls on the application (the ``Bridge``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State

from agent.protocol import MAX_WS_MESSAGE_SIZE, Event, ProtocolFailed
from agent.ws.buffered import BufferedWebSocket


if TYPE_CHECKING:
    import asyncio

    from websockets.client import ClientProtocol
    from websockets.http11 import Request, Response

    from agent.protocol import TunnelProtocol


__all__ = ["HandshakeFailed", "SessionEnd", "TunnelApp", "TunnelWebSocket"]

log = logging.getLogger("agent.proxy")

# Bytes queued towards the service before local sockets stop being read (backpressure).
WS_WRITE_HIGH_WATER = 64 * 1024
# WebSocket receive buffer: a largest message (131 KB) and room for the next one to start.
READ_BUFFER_SIZE = 160 * 1024


class HandshakeFailed(Exception):
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


class TunnelWebSocket(BufferedWebSocket):
    """
    asyncio glue for one WebSocket session.
    """

    ws: ClientProtocol
    tunnel: TunnelProtocol

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
        super().__init__(
            ws,
            tunnel,
            max_size=MAX_WS_MESSAGE_SIZE,
            high_water=WS_WRITE_HIGH_WATER,
            buffer_size=READ_BUFFER_SIZE,
        )
        loop = self._loop
        self.app = app
        self._request = request
        self._ping_interval = ping_interval
        self._ping_handle: asyncio.TimerHandle | None = None
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.ended: asyncio.Future[SessionEnd] = loop.create_future()
        self.channel_id = ""
        self._failure = ""
        self._started = False
        self._reading_paused = False

    # BufferedWebSocket hooks

    def _connected(self) -> None:
        """
        Send the upgrade request.
        """
        self.ws.send_request(self._request)
        self._flush_ws()

    def _messages_received(self, tunnel: TunnelProtocol) -> None:
        """
        Hand the tunnel's events to the application, then send what they queued.
        """
        events = tunnel.events_received()
        if events:
            handle = self.app.handle_event
            for tunnel_event in events:
                if isinstance(tunnel_event, ProtocolFailed):
                    self._fail_session(f"protocol error: {tunnel_event.reason}", 1002)
                    break
                handle(tunnel_event)
        self.flush()

    def _frame_received(self, frame: Frame) -> None:
        """
        Log the round trip of our pings; end the session on a text frame.
        """
        if frame.opcode is Opcode.PONG:
            self._pong(bytes(frame.data))
        elif frame.opcode is Opcode.TEXT:
            # Binary frames only (docs/protocol.md §4.1).
            self._fail_session("text frame received", 1003)

    def _disconnected(self, exc: Exception | None) -> None:
        """
        Resolve the session's end and release the application's local connections.
        """
        if self._ping_handle is not None:
            self._ping_handle.cancel()
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

    def close(self, code: int = 1000, reason: str = "") -> None:
        """
        Start the closing handshake; the transport is aborted if it does not complete in time.
        """
        super().close(code, reason)
        # Also while connecting, when websockets expects no close: the session must end.
        self._arm_close_timeout()

    # Internals

    def _response_received(self, response: Response) -> None:
        """
        Start the session, or fail the handshake with the service's status and reason.
        """
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
