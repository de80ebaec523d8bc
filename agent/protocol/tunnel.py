"""
The tunnel protocol of one WebSocket: a sans-I/O state machine for every side and mode.

Invariants (the model is h11's ``_state.py``):

Rule 1: :meth:`TunnelProtocol.receive_message` never raises for anything the peer sends.
    The first violation records a :class:`~agent.exceptions.RemoteProtocolError` in
    ``failure``, emits :class:`ProtocolFailed` and every later input is ignored. Local misuse
    (a bad outbound call) raises :class:`~agent.exceptions.LocalProtocolError` at once.

Rule 2: one :class:`TunnelProtocol` class serves the four roles (docs/architecture.md §2.3):
    CLIENT+SOURCE, CLIENT+DESTINATION (the local proxies) and SERVICE+SOURCE,
    SERVICE+DESTINATION (the relay's end of each proxy's WebSocket). This file decides what
    each role may send and receive; streams.py, which holds every stream transition, does not
    know the role.

Rule 3: each element of ``messages_to_send()`` is exactly one length-prefixed frame; every
    frame other than DATA is a :class:`~agent.protocol.framing.LoneFrame`, which the writer
    sends in a WebSocket message of its own (docs/protocol.md §5.7).

Rule 4: the SERVICE side never rewrites a frame. ``messages_to_forward()`` holds the valid
    frames byte-for-byte, in order, and nothing after a violation (docs/protocol.md §7.3). When a
    WebSocket message held only whole valid DATA frames and nothing was buffered, it is the very
    object received (zero copy). Any other frame comes out as a ``LoneFrame`` of its own, so a
    control frame the peer grouped with others is forwarded alone (docs/protocol.md §5.7).

Rule 5: the DESTINATION client never mixes formats: the first STREAM_START fixes it
    (connectionId absent -> V2, serviceId empty as well -> V1; docs/protocol.md §6.10) and
    a STREAM_START in another format later is a violation.

Rule 6: the DATA path (``send_data`` and a received DATA frame) costs one encode or one
    in-place scan per frame plus one payload copy; it builds no :class:`Message` and emits no
    event on the SERVICE side.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import Final

from agent.exceptions import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from agent.protocol.events import (
    ConnectionReset,
    ConnectionStarted,
    DataReceived,
    Event,
    ProtocolFailed,
    ServiceIdsReceived,
    SessionReset,
    StreamReset,
    StreamStarted,
)
from agent.protocol.framing import (
    MAX_FRAME_SIZE,
    MAX_WS_MESSAGE_SIZE,
    FrameBuffer,
    LoneFrame,
    encode_frame,
)
from agent.protocol.messages import (
    INT32_MAX,
    MAX_PAYLOAD_SIZE,
    V1,
    V2,
    V3,
    Buffer,
    Message,
    MessageScanner,
    MessageType,
    ProtocolVersion,
    encode_data_frame,
    encode_message,
)
from agent.protocol.streams import (
    CONNECTION_RESET_EVENT,
    CONNECTION_START_EVENT,
    IDLE,
    MAX_CONNECTIONS_PER_SERVICE,
    SESSION_RESET_EVENT,
    STREAM_RESET_EVENT,
    ServiceStream,
    StreamTable,
)


__all__ = [
    "CLIENT",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_POLICY_VIOLATION",
    "DESTINATION",
    "SERVICE",
    "SOURCE",
    "Mode",
    "Side",
    "TunnelProtocol",
]

#: WebSocket close code for a frame or message over the limit (docs/protocol.md §4.2).
CLOSE_MESSAGE_TOO_BIG: Final = 1009
#: WebSocket close code for any other violation (docs/protocol.md §6.11).
CLOSE_POLICY_VIOLATION: Final = 1008


class Side(IntEnum):
    """
    Which end of a WebSocket this object plays.
    """

    CLIENT = 0
    SERVICE = 1


CLIENT: Final = Side.CLIENT
SERVICE: Final = Side.SERVICE


class Mode(IntEnum):
    """
    Which local proxy the WebSocket belongs to (``local-proxy-mode``, docs/protocol.md §2.1).
    """

    SOURCE = 0
    DESTINATION = 1

    @classmethod
    def parse(cls, value: str) -> Mode:
        """
        Return the mode a ``local-proxy-mode`` value names.

        Args:
            value: ``"source"`` or ``"destination"``.

        Returns:
            The mode.

        Raises:
            ValueError: Any other value.
        """
        for mode in cls:
            if mode.query == value:
                return mode
        raise ValueError(f"unknown local-proxy-mode: {value!r}")

    @property
    def query(self) -> str:
        """
        The ``local-proxy-mode`` value: ``"source"`` or ``"destination"``.
        """
        return self.name.lower()

    def __str__(self) -> str:
        """
        Render as the ``local-proxy-mode`` value.
        """
        return self.query

    def __format__(self, format_spec: str) -> str:
        """
        Format as the ``local-proxy-mode`` value (IntEnum would format the number).
        """
        return format(self.query, format_spec)


SOURCE: Final = Mode.SOURCE
DESTINATION: Final = Mode.DESTINATION

# Message types that carry a stream id, which must be > 0 (docs/protocol.md §6.1).
_STREAM_TYPES: Final = frozenset(
    {
        MessageType.DATA,
        MessageType.STREAM_START,
        MessageType.STREAM_RESET,
        MessageType.CONNECTION_START,
        MessageType.CONNECTION_RESET,
    }
)
_KNOWN_TYPES: Final = frozenset(MessageType) - {MessageType.UNKNOWN}

_Handler = Callable[[int, str, tuple[str, ...], int], None]


class TunnelProtocol:
    """
    Sans-I/O tunnel protocol for one WebSocket.

    Feed each binary WebSocket message to :meth:`receive_message`, call the ``send_*``
    methods, then drain :meth:`events_received`, :meth:`messages_to_send` and (SERVICE side)
    :meth:`messages_to_forward`.

    Args:
        side: CLIENT (a local proxy) or SERVICE (the relay's end of one proxy's WebSocket).
        mode: The proxy's mode, SOURCE or DESTINATION.
        services: CLIENT: the configured mapping ids (informational). SERVICE: the tunnel's
            services, for validation and SERVICE_IDS.
        version: CLIENT+SOURCE: the format it sends. CLIENT+DESTINATION: the starting format,
            lowered by the first STREAM_START. SERVICE: the negotiated subprotocol.
        streams: SERVICE only: the table shared with the relay's other end of the tunnel; a
            private one when omitted.
        max_frame_size: Largest frame body accepted.
        max_payload_size: Largest payload accepted, and the size ``send_data`` splits at.
        max_connections: Most connections per service on a CLIENT.
        max_message_size: Largest WebSocket message accepted.

    Attributes:
        side: As given.
        mode: As given.
        version: The format in use (see the ``version`` argument).
        services: As given, as a tuple.
        available_service_ids: CLIENT: the services of the last SERVICE_IDS, or None.
        failure: The peer's violation, once one happened.
        dropped: Frames discarded without an event (stale ids, unknown connections, ignorable
            unknown types).
        id: A short hex id for logs.

    Raises:
        ValueError: An argument is out of range, or ``streams`` was given to a CLIENT.
    """

    def __init__(  # noqa: PLR0913 - the limits are keyword-only knobs with defaults
        self,
        side: Side,
        mode: Mode,
        *,
        services: Iterable[str] = (),
        version: ProtocolVersion = V3,
        streams: StreamTable | None = None,
        max_frame_size: int = MAX_FRAME_SIZE,
        max_payload_size: int = MAX_PAYLOAD_SIZE,
        max_connections: int = MAX_CONNECTIONS_PER_SERVICE,
        max_message_size: int = MAX_WS_MESSAGE_SIZE,
    ) -> None:
        """
        Create the protocol object of one WebSocket.
        """
        self.side = Side(side)
        self.mode = Mode(mode)
        self.version = ProtocolVersion(version)
        self.services: tuple[str, ...] = tuple(services)
        if not 0 < max_frame_size <= MAX_FRAME_SIZE:
            raise ValueError(f"max_frame_size must be in 1..{MAX_FRAME_SIZE}")
        if max_payload_size <= 0 or max_connections <= 0 or max_message_size <= 0:
            raise ValueError("limits must be positive")
        if streams is not None and self.side is CLIENT:
            raise ValueError("streams is for the SERVICE side only")
        self.max_frame_size = max_frame_size
        self.max_payload_size = max_payload_size
        self.max_connections = max_connections
        self.max_message_size = max_message_size
        self.available_service_ids: tuple[str, ...] | None = None
        self.failure: RemoteProtocolError | None = None
        self.dropped = 0
        self.id = secrets.token_hex(4)
        self._frames = FrameBuffer(max_frame_size=max_frame_size)
        self._scan = MessageScanner().scan
        self._events: list[Event] = []
        self._to_send: list[bytes] = []
        self._to_forward: list[bytes] = []
        # CLIENT: one record per service id (docs/protocol.md §6.3: one active stream per service).
        self._streams: dict[str, ServiceStream] = {}
        # CLIENT+DESTINATION: the format the first STREAM_START fixed (Rule 5).
        self._format: ProtocolVersion | None = None
        self._service_bytes: dict[str, bytes] = {}
        self._table = streams if streams is not None else StreamTable()
        self._service_set = frozenset(self.services)
        self._handlers: dict[int, _Handler] = {
            MessageType.STREAM_START: self._on_stream_start,
            MessageType.CONNECTION_START: self._on_connection_start,
            MessageType.CONNECTION_RESET: self._on_connection_reset,
            MessageType.STREAM_RESET: self._on_stream_reset,
            MessageType.SESSION_RESET: self._on_session_reset,
            MessageType.SERVICE_IDS: self._on_service_ids,
        }

    def __repr__(self) -> str:
        """
        Identify the object in logs.
        """
        return (
            f"<TunnelProtocol id={self.id} side={self.side.name} mode={self.mode.query}"
            f" version={self.version.name}>"
        )

    # Inbound

    def receive_message(self, data: Buffer) -> None:
        """
        Process one binary WebSocket message from the peer (Rule 1: never raises for it).

        Args:
            data: The message; it may hold several frames or part of one.
        """
        if self.failure is not None:
            return
        if len(data) > self.max_message_size:
            exc = FrameTooLarge(f"message of {len(data)} bytes exceeds {self.max_message_size}")
            self._fail(exc, CLOSE_MESSAGE_TOO_BIG)
            return
        try:
            if self.side is SERVICE:
                self._receive_service(data)
            else:
                self._receive_client(data)
        except FrameTooLarge as exc:
            self._fail(exc, CLOSE_MESSAGE_TOO_BIG)
        except RemoteProtocolError as exc:
            self._fail(exc, CLOSE_POLICY_VIOLATION)

    def events_received(self) -> list[Event]:
        """
        Return the events received since the last call, and forget them.
        """
        events, self._events = self._events, []
        return events

    def messages_to_send(self) -> list[bytes]:
        """
        Return the frames for the peer, and forget them.

        One frame each; a control message is a ``LoneFrame`` (Rule 3).
        """
        messages, self._to_send = self._to_send, []
        return messages

    def messages_to_forward(self) -> list[bytes]:
        """
        Return the valid frames from the peer for the relay's other end, and forget them.

        Each element is whole frames, byte-for-byte as received: DATA frames as ``bytes``
        (a received WebSocket message of only DATA frames stays one element), any other frame
        as a ``LoneFrame`` of its own (Rule 4).

        Raises:
            LocalProtocolError: Called on the CLIENT side.
        """
        if self.side is not SERVICE:  # checked inline: the relay asks once per message
            self._require(SERVICE, "messages_to_forward")
        messages, self._to_forward = self._to_forward, []
        return messages

    # Outbound (both sides)

    def send_stream_start(self, service_id: str) -> tuple[int, int]:
        """
        Start a new stream for a service (CLIENT+SOURCE).

        The stream id comes from the service's counter (1, 2, ..., INT32_MAX, 1, ...); the
        stream replaces any active one and starts with connection 1 (docs/protocol.md §6.3).

        Args:
            service_id: The service (``""`` in V1).

        Returns:
            ``(stream_id, connection_id)``; the connection id is 1.

        Raises:
            LocalProtocolError: Not a source client, or a service id in V1.
        """
        self._require(CLIENT, "send_stream_start", SOURCE)
        self._check_service(service_id)
        stream = self._stream(service_id)
        stream_id = stream.next_stream_id()
        stream.start(stream_id, 1)
        self._queue(
            Message(
                MessageType.STREAM_START,
                stream_id,
                service_id=service_id,
                connection_id=1 if self.version is V3 else 0,
            )
        )
        return stream_id, 1

    def send_connection_start(self, service_id: str) -> int:
        """
        Open one more connection on the service's active stream (CLIENT+SOURCE, V3).

        Args:
            service_id: The service.

        Returns:
            The new connection id (the next of 1, 2, 3, ... not in use).

        Raises:
            LocalProtocolError: Not a V3 source client, no active stream, or
                ``max_connections`` connections already open.
        """
        self._require(CLIENT, "send_connection_start", SOURCE)
        if self.version is not V3:
            raise LocalProtocolError("CONNECTION_START needs V3")
        stream = self._streams.get(service_id)
        if stream is None or stream.state is IDLE:
            raise LocalProtocolError("no active stream for this service")
        if len(stream.connections) >= self.max_connections:
            raise LocalProtocolError(f"{self.max_connections} connections already open")
        connection_id = stream.next_connection_id()
        stream.handle(CONNECTION_START_EVENT)
        stream.connections.add(connection_id)
        self._queue(
            Message(
                MessageType.CONNECTION_START,
                stream.stream_id,
                service_id=service_id,
                connection_id=connection_id,
            )
        )
        return connection_id

    def send_data(self, service_id: str, connection_id: int, data: Buffer) -> None:
        """
        Send bytes on a connection of the service's active stream (CLIENT).

        The data is split into frames of at most ``max_payload_size`` bytes; each frame
        copies its slice once (Rule 6). Empty data sends nothing.

        Args:
            service_id: The service.
            connection_id: The connection (1 in V1/V2).
            data: The bytes.

        Raises:
            LocalProtocolError: On the SERVICE side, or the connection is not open (check
                :meth:`connection_ids` first: the peer may have reset it).
        """
        stream = self._streams.get(service_id)
        if stream is None or connection_id not in stream.connections:
            self._require(CLIENT, "send_data")
            raise LocalProtocolError("no such connection on the active stream")
        view = memoryview(data)
        if view.itemsize != 1:
            view = view.cast("B")
        size = len(view)
        if not size:
            return
        service = self._service_bytes.get(service_id)
        if service is None:
            service = self._service_bytes[service_id] = service_id.encode()
        wire_connection = connection_id if self.version is V3 else 0
        stream_id = stream.stream_id
        limit = self.max_payload_size
        if size <= limit:
            self._to_send.append(encode_data_frame(stream_id, service, wire_connection, view))
            return
        append = self._to_send.append
        for offset in range(0, size, limit):
            append(
                encode_data_frame(
                    stream_id, service, wire_connection, view[offset : offset + limit]
                )
            )

    def send_connection_reset(self, service_id: str, connection_id: int) -> None:
        """
        Close one connection of the service's active stream (CONNECTION_RESET, V3).

        A no-op when there is no such connection (it may already be gone).

        Args:
            service_id: The service.
            connection_id: The connection.

        Raises:
            LocalProtocolError: A CLIENT in V1/V2 (close the stream with
                :meth:`send_stream_reset` instead, docs/protocol.md §6.10).
        """
        if self.side is SERVICE:
            stream_id = self._table.active.get(service_id)
            if stream_id is None:
                return
        else:
            if self.version is not V3:
                raise LocalProtocolError("CONNECTION_RESET needs V3: reset the stream")
            stream = self._streams.get(service_id)
            if stream is None or connection_id not in stream.connections:
                return
            stream.connections.discard(connection_id)
            stream.handle(CONNECTION_RESET_EVENT)
            stream_id = stream.stream_id
        self._queue(
            Message(
                MessageType.CONNECTION_RESET,
                stream_id,
                service_id=service_id,
                connection_id=connection_id,
            )
        )

    def send_stream_reset(self, service_id: str, stream_id: int | None = None) -> None:
        """
        Reset the service's active stream, or the given one (STREAM_RESET).

        The stream and all its connections end locally. On the SERVICE side this is the relay
        originating a reset to this peer (docs/protocol.md §7.6) and it clears the
        :class:`StreamTable` entry. A no-op when there is no active stream and no id.

        Args:
            service_id: The service (``""`` in V1).
            stream_id: The stream to reset; the active one when omitted.

        Raises:
            LocalProtocolError: ``stream_id`` is not in 1..INT32_MAX, or a service id in V1.
        """
        if stream_id is not None and not 0 < stream_id <= INT32_MAX:
            raise LocalProtocolError("stream id out of range")
        if self.side is SERVICE:
            active = self._table.active.get(service_id, 0)
            stream_id = stream_id or active
            if not stream_id:
                return
            self._table.reset(service_id, stream_id)
        else:
            self._check_service(service_id)
            stream = self._streams.get(service_id)
            active = stream.stream_id if stream is not None else 0
            stream_id = stream_id or active
            if not stream_id:
                return
            if stream is not None and stream_id == active:
                stream.handle(STREAM_RESET_EVENT)
        self._queue(Message(MessageType.STREAM_RESET, stream_id, service_id=service_id))

    def send_service_ids(self) -> None:
        """
        Announce the tunnel's services (SERVICE; SERVICE_IDS, sent even when empty).

        A no-op in V1, which has no SERVICE_IDS (docs/protocol.md §6.2).

        Raises:
            LocalProtocolError: On the CLIENT side.
        """
        self._require(SERVICE, "send_service_ids")
        if self.version is V1:
            return
        self._queue(Message(MessageType.SERVICE_IDS, available_service_ids=self.services))

    def send_session_reset(self) -> None:
        """
        Tell the peer to reset every stream (SERVICE; SESSION_RESET, on internal errors).

        Raises:
            LocalProtocolError: On the CLIENT side.
        """
        self._require(SERVICE, "send_session_reset")
        self._queue(Message(MessageType.SESSION_RESET))

    # Queries

    def active_stream(self, service_id: str) -> int | None:
        """
        Return the service's active stream id, or None.
        """
        if self.side is SERVICE:
            return self._table.active.get(service_id)
        stream = self._streams.get(service_id)
        if stream is None or stream.state is IDLE:
            return None
        return stream.stream_id

    def connection_ids(self, service_id: str) -> frozenset[int]:
        """
        Return the open connections of the service's active stream.

        Always empty on the SERVICE side, which does not track connections.
        """
        stream = self._streams.get(service_id)
        if stream is None:
            return frozenset()
        return frozenset(stream.connections)

    # Internals of the outbound calls

    def _require(self, side: Side, what: str, mode: Mode | None = None) -> None:
        """
        Raise LocalProtocolError unless this object plays ``side`` (and ``mode``).
        """
        if self.side is not side or (mode is not None and self.mode is not mode):
            role = f"{side.name} {mode.query}" if mode is not None else side.name
            raise LocalProtocolError(f"{what} is for the {role} side")

    def _check_service(self, service_id: str) -> None:
        """
        Refuse a service id in V1, where there are none (docs/protocol.md §6.10).
        """
        if service_id and self.version is V1:
            raise LocalProtocolError("V1 carries no service id")

    def _stream(self, service_id: str) -> ServiceStream:
        """
        Return the service's stream record, creating it.
        """
        stream = self._streams.get(service_id)
        if stream is None:
            stream = self._streams[service_id] = ServiceStream()
        return stream

    def _queue(self, msg: Message) -> None:
        """
        Queue one control message as one frame, to be sent alone (Rule 3).
        """
        self._to_send.append(LoneFrame(encode_frame(encode_message(msg))))

    def _fail(self, exc: RemoteProtocolError, code: int) -> None:
        """
        Record the peer's violation and stop processing input (Rule 1).
        """
        self.failure = exc
        self._events.append(ProtocolFailed(code, str(exc)))

    # Internals of the CLIENT side inbound

    def _receive_client(self, data: Buffer) -> None:
        """
        Handle every complete frame of a message (client side).
        """
        frames = self._frames
        frames.feed(data)
        while (span := frames.next_span()) is not None:
            buf, start, end = span
            mtype, stream_id, ignorable, payload_start, payload_end, service_id, available, conn = (
                self._scan(buf, start, end)
            )
            if payload_end - payload_start > self.max_payload_size:
                raise RemoteProtocolError("payload too large")
            if mtype == MessageType.DATA:
                # Hot path (Rule 6): a matching stream id implies an OPEN stream.
                if stream_id <= 0:
                    raise RemoteProtocolError("stream id must be positive")
                stream = self._streams.get(service_id)
                conn = conn or 1
                if (
                    stream is None
                    or stream.stream_id != stream_id
                    or conn not in stream.connections
                ):
                    self.dropped += 1
                    continue
                if type(buf) is bytes:
                    payload = buf[payload_start:payload_end]
                else:
                    payload = bytes(memoryview(buf)[payload_start:payload_end])
                self._events.append(DataReceived(service_id, stream_id, conn, payload))
                continue
            handler = self._handlers.get(mtype)
            if handler is None:
                self._on_unknown(mtype, ignorable=ignorable)
                continue
            if mtype in _STREAM_TYPES and stream_id <= 0:
                raise RemoteProtocolError("stream id must be positive")
            handler(stream_id, service_id, available, conn)

    def _on_unknown(self, mtype: int, *, ignorable: bool) -> None:
        """
        Drop an ignorable unknown type (docs/protocol.md §6.1); any other is a violation.
        """
        if mtype == MessageType.UNKNOWN:
            raise RemoteProtocolError("message type 0")
        if not ignorable:
            raise RemoteProtocolError("unknown message type")
        self.dropped += 1

    def _matching(self, service_id: str, stream_id: int) -> ServiceStream | None:
        """
        Return the service's stream if ``stream_id`` is its active stream, else count a drop.
        """
        stream = self._streams.get(service_id)
        if stream is None or stream.stream_id != stream_id:
            self.dropped += 1
            return None
        return stream

    def _on_stream_start(
        self, stream_id: int, service_id: str, _available: tuple[str, ...], conn: int
    ) -> None:
        """
        STREAM_START: the destination makes it the active stream (docs/protocol.md §6.3).
        """
        if self.mode is SOURCE:
            raise RemoteProtocolError("a source received STREAM_START")
        content = V3 if conn else V2 if service_id else V1
        if self._format is None:
            self._format = content
            self.version = min(self.version, content)
        elif content is not self._format:
            raise RemoteProtocolError("message format changed within the session")
        if self.version is not V3:
            conn = 1
        stream = self._stream(service_id)
        replaced = stream.start(stream_id, conn or 1)
        if replaced:
            # The replaced stream is cleaned up locally; nothing is sent (docs/protocol.md §6.3).
            self._events.append(StreamReset(service_id, replaced))
        self._events.append(StreamStarted(service_id, stream_id, conn or 1))

    def _on_connection_start(
        self, stream_id: int, service_id: str, _available: tuple[str, ...], conn: int
    ) -> None:
        """
        CONNECTION_START (V3): one more connection on the destination's active stream.
        """
        if self.mode is SOURCE:
            raise RemoteProtocolError("a source received CONNECTION_START")
        if self.version is not V3:
            raise RemoteProtocolError("CONNECTION_START in a V1/V2 session")
        stream = self._matching(service_id, stream_id)
        if stream is None:
            return
        conn = conn or 1
        if conn in stream.connections:
            # An id already in use: reset the existing connection (docs/protocol.md §6.4).
            stream.connections.discard(conn)
            stream.handle(CONNECTION_RESET_EVENT)
            self._events.append(ConnectionReset(service_id, stream_id, conn))
        elif len(stream.connections) < self.max_connections:
            stream.handle(CONNECTION_START_EVENT)
            stream.connections.add(conn)
            self._events.append(ConnectionStarted(service_id, stream_id, conn))
            return
        self._queue(
            Message(
                MessageType.CONNECTION_RESET,
                stream_id,
                service_id=service_id,
                connection_id=conn,
            )
        )

    def _on_connection_reset(
        self, stream_id: int, service_id: str, _available: tuple[str, ...], conn: int
    ) -> None:
        """
        CONNECTION_RESET: close one connection of the active stream; ignored if none matches.
        """
        stream = self._matching(service_id, stream_id)
        if stream is None:
            return
        conn = conn or 1
        if conn not in stream.connections:
            self.dropped += 1
            return
        stream.connections.discard(conn)
        stream.handle(CONNECTION_RESET_EVENT)
        self._events.append(ConnectionReset(service_id, stream_id, conn))

    def _on_stream_reset(
        self, stream_id: int, service_id: str, _available: tuple[str, ...], _conn: int
    ) -> None:
        """
        STREAM_RESET: the active stream and its connections end; ignored for another id.
        """
        stream = self._matching(service_id, stream_id)
        if stream is None:
            return
        stream.handle(STREAM_RESET_EVENT)
        self._events.append(StreamReset(service_id, stream_id))

    def _on_session_reset(
        self, _stream_id: int, _service_id: str, _available: tuple[str, ...], _conn: int
    ) -> None:
        """
        SESSION_RESET: every stream is forgotten (the counters live on, docs/protocol.md §6.9).
        """
        for stream in self._streams.values():
            stream.handle(SESSION_RESET_EVENT)
        self._events.append(SessionReset())

    def _on_service_ids(
        self, _stream_id: int, _service_id: str, available: tuple[str, ...], _conn: int
    ) -> None:
        """
        SERVICE_IDS: remember the tunnel's services; repeats are reported too.
        """
        self.available_service_ids = available
        self._events.append(ServiceIdsReceived(available))

    # Internals of the SERVICE side inbound

    def _receive_service(self, data: Buffer) -> None:
        """
        Validate every complete frame of a message and queue the valid ones for forwarding.
        """
        frames = self._frames
        fresh = not len(frames)
        frames.feed(data)
        spans: list[tuple[Buffer, int, int]] = []
        # Indexes in spans of the frames other than DATA: each is forwarded alone (Rule 4). None
        # while there are none: the DATA path allocates nothing for it.
        lone: list[int] | None = None
        valid = False
        try:
            while (span := frames.next_span()) is not None:
                if not self._validate(*span):
                    if lone is None:
                        lone = []
                    lone.append(len(spans))
                spans.append(span)
            valid = True
        finally:
            if spans:
                if valid and fresh and lone is None and not len(frames) and type(data) is bytes:
                    # Rule 4: whole valid DATA frames only, nothing buffered: zero copy.
                    self._to_forward.append(data)
                else:
                    self._forward_frames(spans, lone)

    def _forward_frames(self, spans: list[tuple[Buffer, int, int]], lone: list[int] | None) -> None:
        """
        Queue frames one by one, copied out of their buffer; those at ``lone`` as LoneFrames.
        """
        forward = self._to_forward.append
        for index, (buf, start, end) in enumerate(spans):
            if type(buf) is bytes:
                frame = buf[start - 2 : end]
            else:
                frame = bytes(memoryview(buf)[start - 2 : end])
            forward(LoneFrame(frame) if lone is not None and index in lone else frame)

    def _validate(self, buf: Buffer, start: int, end: int) -> bool:  # noqa: C901, PLR0912
        """
        Check one frame against docs/protocol.md §6 and track streams in the shared table.

        One flat function, DATA first, keeps the per-frame cost low (Rule 6); hence the
        complexity noqa.

        Returns:
            True for a DATA frame, False for any other (it must be forwarded alone).

        Raises:
            RemoteProtocolError: The frame breaks a rule.
        """
        mtype, stream_id, ignorable, payload_start, payload_end, service_id, _, conn = self._scan(
            buf, start, end
        )
        if payload_end - payload_start > self.max_payload_size:
            raise RemoteProtocolError("payload too large")
        table = self._table
        if mtype == MessageType.DATA:
            if stream_id <= 0:
                raise RemoteProtocolError("stream id must be positive")
            if service_id and "" in table.started:
                raise RemoteProtocolError("service id on a stream started without one")
            if service_id not in table.started:
                raise RemoteProtocolError("no STREAM_START for this service")
            return True
        if mtype not in _STREAM_TYPES:
            if mtype in _KNOWN_TYPES:
                # SESSION_RESET and SERVICE_IDS flow from the service only (docs/protocol.md §6.1).
                raise RemoteProtocolError("clients never send SESSION_RESET or SERVICE_IDS")
            if mtype == MessageType.UNKNOWN:
                raise RemoteProtocolError("message type 0")
            if not ignorable:
                raise RemoteProtocolError("unknown message type")
            return False
        if mtype == MessageType.STREAM_START and self.mode is DESTINATION:
            raise RemoteProtocolError("only the source sends STREAM_START")
        if stream_id <= 0:
            raise RemoteProtocolError("stream id must be positive")
        if service_id and service_id not in self._service_set:
            raise RemoteProtocolError("unknown service id")
        if service_id and "" in table.started:
            raise RemoteProtocolError("service id on a stream started without one")
        conn = conn or 1
        if mtype == MessageType.STREAM_START:
            table.start(service_id, stream_id)
            self._events.append(StreamStarted(service_id, stream_id, conn))
            return False
        if service_id not in table.started:
            raise RemoteProtocolError("no STREAM_START for this service")
        if mtype == MessageType.STREAM_RESET:
            if table.reset(service_id, stream_id):
                self._events.append(StreamReset(service_id, stream_id))
        elif mtype == MessageType.CONNECTION_START:
            self._events.append(ConnectionStarted(service_id, stream_id, conn))
        else:
            self._events.append(ConnectionReset(service_id, stream_id, conn))
        return False
