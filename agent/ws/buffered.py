"""
A WebSocket connection as an asyncio ``BufferedProtocol``: receive buffer, flushing, close timeout.

The transport reads into the :class:`~agent.ws.frames.FrameReader`'s buffer; complete binary
messages go to the binary-message consumer, ``tunnel`` (an :mod:`agent.protocol` core), and
everything else to websockets' sans-I/O protocol (:func:`~agent.ws.routing.route_received`).
websockets' output is written once per read rather than once per frame (``_ws_dirty``), and once
websockets expects the TCP connection to close, a timer aborts it if the peer does not close it
in time, as websockets' own asyncio layer does. A client or server subclass supplies the rest
through hooks: the opening handshake, the control frames it cares about, what to do once binary
messages have reached ``tunnel``, and what the connection's end releases.

This is the data path. One function call more per message shows in the echo latency, so the
receive path calls a hook only where a subclass must act, and tests plain attributes otherwise.
"""

from __future__ import annotations

import abc
import asyncio
from typing import TYPE_CHECKING, cast

from websockets.frames import Frame
from websockets.http11 import Request
from websockets.protocol import Side, State

from agent.ws.frames import FrameReader, FrameWriter
from agent.ws.routing import route_received, websocket_events, write_pending


if TYPE_CHECKING:
    from websockets.http11 import Response
    from websockets.protocol import Protocol

    from agent.protocol import TunnelProtocol
    from agent.protocol.messages import Buffer


__all__ = ["CLOSE_TIMEOUT", "BufferedWebSocket"]

# Seconds allowed for the closing handshake before the TCP connection is aborted.
CLOSE_TIMEOUT = 2.0


class BufferedWebSocket(asyncio.BufferedProtocol, abc.ABC):
    """
    The asyncio side of one WebSocket connection, client or server (websockets' ``ws`` decides).

    Args:
        ws: websockets' sans-I/O protocol, not yet connected.
        tunnel: Where binary messages go; None until there is one (a server's, after the
            handshake). Binary messages that arrive while it is None are dropped.
        max_size: Largest WebSocket message read and written on the fast path.
        high_water: Bytes queued in the transport before ``pause_writing``.
        buffer_size: Receive buffer (see ``FrameReader``); 0 for its default.
    """

    def __init__(
        self,
        ws: Protocol,
        tunnel: TunnelProtocol | None,
        *,
        max_size: int,
        high_water: int,
        buffer_size: int = 0,
    ) -> None:
        """
        Prepare the connection; nothing is sent before ``connection_made``.
        """
        server = ws.side is Side.SERVER
        self.ws = ws
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._high_water = high_water
        self._close_handle: asyncio.TimerHandle | None = None
        # websockets was fed bytes or failed since its output was last written. Every other call
        # into it is followed by _flush_ws at once; this spares the data path that call per message.
        self._ws_dirty = False
        # A server reads masked frames and writes plain ones; a client the reverse (RFC 6455).
        self._reader = FrameReader(masked=server, max_size=max_size, buffer_size=buffer_size)
        self._writer = FrameWriter(mask=not server, max_size=max_size)

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """
        Set the write limit, then let the subclass start.
        """
        # uvloop's transports are not asyncio.Transport subclasses: cast, don't check.
        self.transport = cast("asyncio.Transport", transport)
        self.transport.set_write_buffer_limits(high=self._high_water)
        self._connected()

    def get_buffer(self, sizehint: int) -> memoryview:  # noqa: ARG002 - our size is fixed
        """
        Read into the frame reader's buffer.

        With a plain Protocol, the TLS layer allocates a 256 KB bytes object for every record it
        decrypts and shrinks it (mmap, mremap, munmap per message); reading into our buffer
        spares all of that, which halves the CPU of a small round trip. Partial frames stay
        where they landed.
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

    def eof_received(self) -> bool:
        """
        The peer closed its side; let the transport close.
        """
        self.ws.receive_eof()
        self._flush_ws()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """
        Stop the close timeout, then let the subclass release what the connection held.
        """
        if self._close_handle is not None:
            self._close_handle.cancel()
        self._disconnected(exc)

    # Used by the application

    def flush(self) -> None:
        """
        Send what websockets queued (pongs, close), then the messages ``tunnel`` queued.
        """
        if self._ws_dirty:
            self._flush_ws()
        tunnel = self.tunnel
        if tunnel is None:
            return
        messages = tunnel.messages_to_send()
        if messages and self.ws.state is State.OPEN and self.transport is not None:
            self.transport.writelines(self._writer.frames(messages))

    def pause_reading(self) -> None:
        """
        Stop reading the WebSocket (what its messages feed is congested).
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
        Start the closing handshake, or drop a connection still in its opening handshake.

        The close timeout starts once websockets expects the TCP connection to close.
        """
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, reason)
        elif self.transport is not None and self.ws.state is State.CONNECTING:
            self.transport.close()
        self._flush_ws()

    # Hooks

    @abc.abstractmethod
    def _connected(self) -> None:
        """
        The connection is up: send the upgrade request, or wait for one.
        """

    def _request_received(self, request: Request) -> None:
        """
        The upgrade request arrived (servers only).
        """

    def _response_received(self, response: Response) -> None:
        """
        The upgrade response arrived (clients only); ``ws.handshake_exc`` tells if it failed.
        """

    @abc.abstractmethod
    def _frame_received(self, frame: Frame) -> None:
        """
        A frame websockets parsed: text or control (websockets answers pings and closes itself).
        """

    @abc.abstractmethod
    def _messages_received(self, tunnel: TunnelProtocol) -> None:
        """
        What arrived went through: act on ``tunnel``'s events. Once per read, not per message.

        websockets' output is written after this returns; call ``flush`` to write it before.
        """

    @abc.abstractmethod
    def _disconnected(self, exc: Exception | None) -> None:
        """
        The connection is gone (the close timeout is cancelled): release what it held.
        """

    # Internals

    def _received(self) -> None:
        """
        Split the stream: binary messages to ``tunnel``, the rest to websockets.
        """
        if not route_received(self._reader, self.ws, self._receive_ws, self):
            return
        tunnel = self.tunnel
        if tunnel is not None:
            self._messages_received(tunnel)
        if self._ws_dirty:
            self._flush_ws()

    def _receive_ws(self, data: Buffer) -> None:
        """
        Feed websockets: the opening handshake, control frames, anything unusual.
        """
        self._ws_dirty = True
        for event in websocket_events(self.ws, data, self.tunnel):
            if isinstance(event, Frame):
                self._frame_received(event)
            elif isinstance(event, Request):
                self._request_received(event)
            else:
                self._response_received(event)

    def _flush_ws(self) -> None:
        """
        Write websockets' output; start the close timeout if it now expects the TCP close.
        """
        self._ws_dirty = False
        if self.transport is not None and write_pending(self.ws, self.transport):
            self._arm_close_timeout()

    def _arm_close_timeout(self) -> None:
        """
        Abort the transport unless it is lost within ``CLOSE_TIMEOUT``.
        """
        if self._close_handle is None and self.transport is not None:
            self._close_handle = self._loop.call_later(CLOSE_TIMEOUT, self.transport.abort)
