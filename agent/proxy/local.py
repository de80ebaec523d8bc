"""
Local TCP (or Unix socket) connections and the bridge that joins them to the tunnel session.

Flow control runs both ways without unbounded buffers:
- a congested local socket (its application stops reading) pauses reading the WebSocket, so the
  service and then the far proxy stop sending, and TCP pushes back to the far application;
- a congested WebSocket pauses reading every local socket.
Head-of-line blocking across streams is the price: one stalled reader holds the whole tunnel.

How a connection ends tells its application whether it got everything (docs/protocol.md §10.4):
a stream the far side ended (STREAM_RESET, CONNECTION_RESET) closes with a FIN after its data;
a stream cut by the end of its session (a drop, a violation, SESSION_RESET, the proxy stopping)
is reset (RST), so a reader sees ECONNRESET rather than an EOF short of the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from typing import TYPE_CHECKING, cast

from agent.common.buffers import lazy_buffer
from agent.protocol import (
    MAX_PAYLOAD_SIZE,
    ConnectionReset,
    DataReceived,
    Event,
    LocalProtocolError,
    ProtocolVersion,
    ServiceIdsReceived,
    SessionReset,
    StreamReset,
)


if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.proxy.options import ProxyOptions
    from agent.proxy.report import ConnectionReporter
    from agent.proxy.websocket import TunnelWebSocket


__all__ = ["Bridge", "LocalConnection", "reset_transport"]

log = logging.getLogger("agent.proxy")

# Bytes queued towards a local application before the WebSocket stops being read.
LOCAL_WRITE_HIGH_WATER = 128 * 1024
# What a local read may take while the tunnel is congested (see get_buffer).
PAUSED_READ_SIZE = 1024
# One read fills exactly four DATA payloads (docs/protocol.md §5.2: 64512 bytes each).
READ_SIZE = MAX_PAYLOAD_SIZE
# SO_LINGER on with a zero timeout: closing the socket sends RST and drops unsent data.
_LINGER_RESET = struct.pack("ii", 1, 0)


def reset_transport(transport: asyncio.BaseTransport) -> None:
    """
    Close a local connection as an error to its application: RST for TCP, no draining.

    A Unix socket has no RST: it is closed without writing what is queued (its peer sees EOF,
    or ECONNRESET if it left data unread).
    """
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family != socket.AF_UNIX:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    cast("asyncio.WriteTransport", transport).abort()


class LocalConnection(asyncio.BufferedProtocol):
    """
    One local TCP connection carried by the tunnel as (service id, connection id).
    """

    def __init__(self, bridge: Bridge, service_id: str, connection_id: int) -> None:
        """
        Create a connection that is not yet attached to a transport.
        """
        self.bridge = bridge
        self.service_id = service_id
        self.connection_id = connection_id
        self.transport: asyncio.Transport | None = None
        self.closed_by_peer = False
        self.closed = False
        self._close_when_connected = False
        self._reset_when_connected = False
        self._pending: list[bytes] = []
        self._pending_size = 0
        # For the report channel: bytes from the tunnel, bytes into it.
        self.bytes_in = 0
        self.bytes_out = 0
        self.reported = False

    @property
    def key(self) -> tuple[str, int]:
        """
        The bridge's key for this connection.
        """
        return (self.service_id, self.connection_id)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """
        Attach the transport and deliver what arrived while connecting.
        """
        if self.closed:
            # Ended before it was connected: normally (nothing to deliver), or cut.
            if self._reset_when_connected:
                reset_transport(transport)
            else:
                transport.close()
            return
        # uvloop's transports are not asyncio.Transport subclasses: cast, don't check.
        self.transport = cast("asyncio.Transport", transport)
        transport = self.transport
        transport.set_write_buffer_limits(high=LOCAL_WRITE_HIGH_WATER)
        if self.bridge.locals_paused:
            transport.pause_reading()
        if self._pending:
            transport.writelines(self._pending)
            self._pending.clear()
            if self._pending_size > LOCAL_WRITE_HIGH_WATER:
                self.bridge.local_congested(self, congested=False)
            self._pending_size = 0
        if self._close_when_connected:
            # The peer sent its data and closed before we were connected: deliver, then close.
            transport.close()

    def get_buffer(self, sizehint: int) -> memoryview:  # noqa: ARG002 - our size is fixed
        """
        Read into the bridge's buffer: one for all connections, as each read is consumed at once.

        While the tunnel is congested, a read can still happen (uvloop reads a new connection
        once even if paused): it gets a small buffer, so a burst of new connections cannot
        queue 64 KB each in front of the congested WebSocket.
        """
        bridge = self.bridge
        return bridge.read_view[:PAUSED_READ_SIZE] if bridge.locals_paused else bridge.read_view

    def buffer_updated(self, nbytes: int) -> None:
        """
        Bytes from the local application go into the tunnel (encoding copies them out).
        """
        bridge = self.bridge
        if bridge.locals_paused and self.transport is not None:
            # uvloop starts reading after connection_made returns, undoing a pause made there.
            self.transport.pause_reading()
        self.bytes_out += nbytes
        if bridge.reporter is not None:
            bridge.reporter.flowed(out=nbytes)
        bridge.local_data(self, bridge.read_view[:nbytes])

    def eof_received(self) -> bool:
        """
        The tunnel carries no half-close: a local EOF ends the connection.
        """
        return False

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - reason is not needed
        """
        Tell the bridge, which resets the connection in the tunnel unless the peer did.
        """
        self.closed = True
        self.bridge.local_closed(self)

    def pause_writing(self) -> None:
        """
        The local application is not reading: hold the tunnel.
        """
        self.bridge.local_congested(self, congested=True)

    def resume_writing(self) -> None:
        """
        The local application reads again.
        """
        self.bridge.local_congested(self, congested=False)

    def write(self, data: bytes) -> None:
        """
        Send tunnel bytes to the local application (buffered while still connecting).
        """
        self.bytes_in += len(data)
        if self.bridge.reporter is not None:
            self.bridge.reporter.flowed(into=len(data))
        if self.transport is not None:
            self.transport.write(data)
            return
        self._pending.append(data)
        before = self._pending_size
        self._pending_size += len(data)
        if before <= LOCAL_WRITE_HIGH_WATER < self._pending_size:
            self.bridge.local_congested(self, congested=True)

    def close_by_peer(self) -> None:
        """
        The far side reset this connection: close locally without answering.
        """
        self.closed_by_peer = True
        self.close()

    def close(self) -> None:
        """
        Close after flushing what is queued for the application, even if still connecting.
        """
        if self.transport is not None:
            self.transport.close()
        elif self._pending:
            # A reset that arrives with (or right after) the data ends the stream like a FIN:
            # the bytes before it still belong to the application.
            self._close_when_connected = True
        else:
            self.abandon()

    def reset(self) -> None:
        """
        The stream was cut, not ended: reset the connection and drop what is queued for it.

        Nothing is sent to the tunnel (its session is gone or was reset). A connection still
        connecting is reset as soon as it connects.
        """
        self.closed_by_peer = True
        self._pending.clear()
        self._pending_size = 0
        if self.transport is not None:
            reset_transport(self.transport)
            return
        self._reset_when_connected = True
        if not self.closed:
            self.closed = True
            self.bridge.local_closed(self)

    def abandon(self) -> None:
        """
        Give up a connection that never reached its application; what was pending is dropped.
        """
        if self.transport is not None:
            self.transport.abort()
            return
        self._pending.clear()
        if not self.closed:
            self.closed = True
            self.bridge.local_closed(self)


class Bridge:
    """
    Joins local connections to the current tunnel session; the source and destination extend it.
    """

    def __init__(self, options: ProxyOptions) -> None:
        """
        Start with no session and no local connection.
        """
        self.options = options
        self.conn: TunnelWebSocket | None = None
        self.locals: dict[tuple[str, int], LocalConnection] = {}
        self.locals_paused = False
        # Lazy: a tunnel without local traffic never touches it.
        self.read_view = memoryview(lazy_buffer(READ_SIZE))
        self.fatal: str | None = None
        self.fatal_event = asyncio.Event()
        #: Where per-connection figures go (``--report-fd``), or ``None``.
        self.reporter: ConnectionReporter | None = None
        self._congested: set[tuple[str, int]] = set()
        self._handlers: dict[type, Callable[[Event], None]] = {
            DataReceived: self._on_data,  # type: ignore[dict-item]
            ConnectionReset: self._on_connection_reset,  # type: ignore[dict-item]
            StreamReset: self._on_stream_reset,  # type: ignore[dict-item]
            SessionReset: self._on_session_reset,
            ServiceIdsReceived: self._on_service_ids,  # type: ignore[dict-item]
        }

    # TunnelApp

    def session_started(self, conn: TunnelWebSocket) -> None:
        """
        Use this session for every new local connection.
        """
        self.conn = conn

    def session_ended(self) -> None:
        """
        Reset every local connection: streams do not survive a WebSocket session.

        A stream still open when its session ends was cut (docs/protocol.md §10.4).
        """
        self.conn = None
        self._reset_all("session ended")

    def handle_event(self, event: Event) -> None:
        """
        Dispatch a tunnel event.
        """
        handler = self._handlers.get(type(event))
        if handler is not None:
            handler(event)

    def pause_locals(self) -> None:
        """
        Stop reading every local socket.
        """
        self.locals_paused = True
        for local in self.locals.values():
            if local.transport is not None:
                local.transport.pause_reading()

    def resume_locals(self) -> None:
        """
        Read every local socket again.
        """
        self.locals_paused = False
        for local in self.locals.values():
            if local.transport is not None and not local.transport.is_closing():
                local.transport.resume_reading()

    # Called by local connections

    def local_data(self, local: LocalConnection, data: memoryview) -> None:
        """
        Carry local bytes into the tunnel.
        """
        conn = self.conn
        if conn is None or local.closed_by_peer:
            return
        try:
            conn.tunnel.send_data(local.service_id, local.connection_id, data)
        except LocalProtocolError:
            # The tunnel already ended this connection (a reset crossed our data): drop it.
            local.close_by_peer()
            return
        conn.flush()

    def local_closed(self, local: LocalConnection) -> None:
        """
        Forget a closed local connection; reset it in the tunnel unless the peer closed it.
        """
        key = local.key
        if self.locals.get(key) is local:
            del self.locals[key]
        if self.reporter is not None and not local.reported:
            local.reported = True
            self.reporter.closed(local, refused=self.refused(local))
        if key in self._congested:
            self.local_congested(local, congested=False)
        conn = self.conn
        if conn is None or local.closed_by_peer:
            return
        tunnel = conn.tunnel
        if tunnel.active_stream(local.service_id) is None:
            return
        if tunnel.version is ProtocolVersion.V3:
            tunnel.send_connection_reset(local.service_id, local.connection_id)
        else:
            # V1/V2: one connection per stream, so closing it ends the stream
            # (docs/protocol.md §6.10).
            tunnel.send_stream_reset(local.service_id)
        log.info(
            "connection closed service=%s connection=%d", local.service_id, local.connection_id
        )
        conn.flush()

    def local_congested(self, local: LocalConnection, *, congested: bool) -> None:
        """
        Pause the WebSocket while any local application is not reading.
        """
        key = local.key
        if congested:
            if not self._congested:
                self._pause_tunnel()
            self._congested.add(key)
        elif key in self._congested:
            self._congested.discard(key)
            if not self._congested and self.conn is not None:
                self.conn.resume_reading()

    def add_local(self, local: LocalConnection) -> None:
        """
        Register a local connection, replacing (and closing) any stale one with the same key.
        """
        old = self.locals.get(local.key)
        if old is not None:
            old.close_by_peer()
        self.locals[local.key] = local
        if self.reporter is not None:
            self.reporter.opened(local)

    def refused(self, local: LocalConnection) -> bool:
        """
        Whether a closed connection was refused: the far side ended it before sending a byte.
        """
        return local.closed_by_peer and local.bytes_in == 0

    async def close(self) -> None:
        """
        Release what the side holds (listeners, pending connects); extended by each side.
        """

    def fail(self, reason: str) -> None:
        """
        Stop the proxy: the tunnel cannot be used with this configuration.
        """
        self.fatal = reason
        self.fatal_event.set()

    # Event handlers

    def _pause_tunnel(self) -> None:
        if self.conn is not None:
            self.conn.pause_reading()

    def _on_data(self, event: DataReceived) -> None:
        local = self.locals.get((event.service_id, event.connection_id))
        if local is not None:
            local.write(event.data)

    def _on_connection_reset(self, event: ConnectionReset) -> None:
        local = self.locals.get((event.service_id, event.connection_id))
        if local is not None:
            log.info(
                "connection reset by peer service=%s connection=%d",
                event.service_id,
                event.connection_id,
            )
            local.close_by_peer()

    def _on_stream_reset(self, event: StreamReset) -> None:
        log.info("stream reset service=%s stream=%d", event.service_id, event.stream_id)
        self._close_all(lambda key: key[0] == event.service_id)

    def _on_session_reset(self, _event: Event) -> None:
        log.info("session reset")
        self._reset_all("session reset")

    def _on_service_ids(self, event: ServiceIdsReceived) -> None:
        """
        Overridden by each side to check its map against the tunnel's services.
        """

    def _close_all(self, match: Callable[[tuple[str, int]], bool]) -> None:
        for key in [key for key in self.locals if match(key)]:
            self.locals[key].close_by_peer()

    def _reset_all(self, why: str) -> None:
        """
        Reset every connection the far side has not ended; those it ended still get their data.
        """
        cut = [local for local in self.locals.values() if not local.closed_by_peer]
        for local in cut:
            local.reset()
        if cut:
            log.warning("%s: reset %d local connection(s)", why, len(cut))
