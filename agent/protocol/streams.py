"""
Stream bookkeeping of the tunnel protocol: per-service stream state and its transitions.

Invariants (the model is h11's ``_state.py``):

Rule 1: every stream transition lives in :data:`TRANSITIONS`, a table
    ``(state, event) -> state``. A pair absent from the table means "this event does not apply to
    this stream": the caller drops the message (a stale or unknown id, docs/protocol.md §6.5) or,
    for local calls, treats it as a no-op. Nothing else in the package moves a stream between
    states.

Rule 2: this module does not know which side it plays or how messages are encoded. Whether
    an event *matches* the stream (same stream id, known connection) is decided by the caller
    before the table is consulted; the table only says what a matching event does.

Rule 3: a service has at most one active stream (docs/protocol.md §6.3: a new stream
    replaces the old one). ``stream_id`` is 0 and ``connections`` is empty exactly when the
    state is IDLE.

Rule 4: stream and connection ids are handed out by the source only, from per-service
    counters that survive resets (docs/protocol.md §6.9: +1 per stream, wrapping INT32_MAX -> 1).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from agent.protocol.messages import INT32_MAX, UINT32_MAX


__all__ = [
    "CONNECTION_RESET_EVENT",
    "CONNECTION_START_EVENT",
    "IDLE",
    "MAX_CONNECTIONS_PER_SERVICE",
    "OPEN",
    "SESSION_RESET_EVENT",
    "STREAM_RESET_EVENT",
    "STREAM_START_EVENT",
    "TRANSITIONS",
    "ServiceStream",
    "StreamEvent",
    "StreamState",
    "StreamTable",
]

#: Most active connections per service (local proxy limit, docs/protocol.md §6.9).
MAX_CONNECTIONS_PER_SERVICE: Final = 128


class StreamState(IntEnum):
    """
    State of a service's stream.
    """

    IDLE = 0
    OPEN = 1


IDLE: Final = StreamState.IDLE
OPEN: Final = StreamState.OPEN


class StreamEvent(IntEnum):
    """
    Something that happens to a service's stream (sent or received, already matched).

    DATA is not an event: it never changes the state, and the hot path checks only that the
    stream id is the active one (which implies OPEN).
    """

    STREAM_START = 0
    CONNECTION_START = 1
    CONNECTION_RESET = 2
    STREAM_RESET = 3
    SESSION_RESET = 4


STREAM_START_EVENT: Final = StreamEvent.STREAM_START
CONNECTION_START_EVENT: Final = StreamEvent.CONNECTION_START
CONNECTION_RESET_EVENT: Final = StreamEvent.CONNECTION_RESET
STREAM_RESET_EVENT: Final = StreamEvent.STREAM_RESET
SESSION_RESET_EVENT: Final = StreamEvent.SESSION_RESET

#: The stream transition table (Rule 1). docs/protocol.md §6 per type.
TRANSITIONS: Final[dict[tuple[StreamState, StreamEvent], StreamState]] = {
    # STREAM_START makes the stream active, replacing any older one (like a TCP SYN).
    (IDLE, STREAM_START_EVENT): OPEN,
    (OPEN, STREAM_START_EVENT): OPEN,
    # CONNECTION_START / CONNECTION_RESET (V3) only exist on an active stream; the stream
    # lives on when its last connection closes, until STREAM_RESET.
    (OPEN, CONNECTION_START_EVENT): OPEN,
    (OPEN, CONNECTION_RESET_EVENT): OPEN,
    # STREAM_RESET ends the active stream and all its connections.
    (OPEN, STREAM_RESET_EVENT): IDLE,
    # SESSION_RESET resets every stream, whatever its state.
    (IDLE, SESSION_RESET_EVENT): IDLE,
    (OPEN, SESSION_RESET_EVENT): IDLE,
}


class ServiceStream:
    """
    One service's stream, as one client end of the tunnel sees it.

    Attributes:
        state: IDLE or OPEN.
        stream_id: The active stream (0 when IDLE).
        connections: Its open connection ids (empty when IDLE).
        last_stream_id: The last stream id this end started (source only).
        last_connection_id: The last connection id this end started (source only).
    """

    __slots__ = ("connections", "last_connection_id", "last_stream_id", "state", "stream_id")

    def __init__(self) -> None:
        """
        Create an IDLE stream whose counters start at 1.
        """
        self.state = IDLE
        self.stream_id = 0
        self.connections: set[int] = set()
        self.last_stream_id = 0
        self.last_connection_id = 0

    def handle(self, event: StreamEvent) -> bool:
        """
        Apply a matched event through :data:`TRANSITIONS`.

        Args:
            event: The event.

        Returns:
            False when the event does not apply in the current state (nothing changed).
        """
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            return False
        self.state = new
        if new is IDLE:
            self.stream_id = 0
            self.connections = set()
        return True

    def start(self, stream_id: int, connection_id: int) -> int:
        """
        Make ``stream_id`` the active stream with one connection.

        Args:
            stream_id: The new stream.
            connection_id: Its first connection.

        Returns:
            The stream it replaced, or 0.
        """
        replaced = self.stream_id
        self.handle(STREAM_START_EVENT)
        self.stream_id = stream_id
        self.connections = {connection_id}
        self.last_connection_id = connection_id
        return replaced

    def next_stream_id(self) -> int:
        """
        Advance the stream counter: 1, 2, ... INT32_MAX, then 1 again (Rule 4).
        """
        self.last_stream_id = self.last_stream_id + 1 if self.last_stream_id < INT32_MAX else 1
        return self.last_stream_id

    def next_connection_id(self) -> int:
        """
        Advance the connection counter to the next id not in use (1, 2, 3, ...; wraps at 2**32).

        The caller guarantees fewer than 2**32 - 1 open connections (the cap is far lower).
        """
        candidate = self.last_connection_id
        while True:
            candidate = candidate + 1 if candidate < UINT32_MAX else 1
            if candidate not in self.connections:
                self.last_connection_id = candidate
                return candidate


class StreamTable:
    """
    The active streams of one tunnel, shared by the relay's two ends (SERVICE side).

    The source end records STREAM_START here, so the destination end knows which services
    have started streams (docs/protocol.md §7.2).

    Attributes:
        active: Service id -> its active stream id.
        started: Every service id a STREAM_START was seen for (``""`` for a V1 stream).
    """

    __slots__ = ("active", "started")

    def __init__(self) -> None:
        """
        Create an empty table.
        """
        self.active: dict[str, int] = {}
        self.started: set[str] = set()

    def __repr__(self) -> str:
        """
        Show the active streams (service ids are not secret).
        """
        return f"StreamTable(active={self.active!r}, started={sorted(self.started)!r})"

    def state(self, service_id: str) -> StreamState:
        """
        Return the state of a service's stream.
        """
        return OPEN if service_id in self.active else IDLE

    def start(self, service_id: str, stream_id: int) -> int:
        """
        Record a STREAM_START.

        Args:
            service_id: The service (``""`` in V1).
            stream_id: The new active stream.

        Returns:
            The stream it replaced, or 0.
        """
        replaced = self.active.get(service_id, 0)
        self._handle(service_id, STREAM_START_EVENT)
        self.active[service_id] = stream_id
        self.started.add(service_id)
        return replaced

    def reset(self, service_id: str, stream_id: int) -> bool:
        """
        Record a STREAM_RESET.

        Args:
            service_id: The service.
            stream_id: The stream named by the reset.

        Returns:
            True when it was the active stream, which is now gone; False for a stale id.
        """
        if self.active.get(service_id) != stream_id:
            return False
        self._handle(service_id, STREAM_RESET_EVENT)
        return True

    def _handle(self, service_id: str, event: StreamEvent) -> None:
        """
        Apply a matched event through :data:`TRANSITIONS` (Rule 1); IDLE drops the entry.
        """
        if TRANSITIONS.get((self.state(service_id), event)) is IDLE:
            del self.active[service_id]

    def clear(self) -> None:
        """
        Forget every stream (for example when a peer reconnects, docs/protocol.md §7.6).
        """
        self.active.clear()
        self.started.clear()
