"""
Events :meth:`TunnelProtocol.events_received` returns: what the peer did, as plain values.

Identifiers follow docs/protocol.md §6.9: in V1 ``service_id`` is ``""``, and in V1/V2 the single
connection of a stream is reported as ``connection_id`` 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias


__all__ = [
    "ConnectionReset",
    "ConnectionStarted",
    "DataReceived",
    "Event",
    "ProtocolFailed",
    "ServiceIdsReceived",
    "SessionReset",
    "StreamReset",
    "StreamStarted",
]


@dataclass(frozen=True, slots=True)
class ServiceIdsReceived:
    """
    The service announced the tunnel's services (SERVICE_IDS, V2+).

    Attributes:
        service_ids: The services, in the service's order; possibly empty.
    """

    service_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StreamStarted:
    """
    A stream became the service's active stream (STREAM_START).

    Attributes:
        service_id: The service.
        stream_id: The new stream.
        connection_id: Its first connection (1 unless a V3 peer chose another).
    """

    service_id: str
    stream_id: int
    connection_id: int


@dataclass(frozen=True, slots=True)
class ConnectionStarted:
    """
    One more connection opened on the active stream (CONNECTION_START, V3).

    Attributes:
        service_id: The service.
        stream_id: The active stream.
        connection_id: The new connection.
    """

    service_id: str
    stream_id: int
    connection_id: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """
    Bytes for one connection of the active stream (DATA).

    Attributes:
        service_id: The service.
        stream_id: The active stream.
        connection_id: The connection.
        data: The payload.
    """

    service_id: str
    stream_id: int
    connection_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ConnectionReset:
    """
    One connection of the active stream is gone (CONNECTION_RESET, V3).

    Attributes:
        service_id: The service.
        stream_id: The active stream.
        connection_id: The connection to close.
    """

    service_id: str
    stream_id: int
    connection_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """
    The active stream and all its connections are gone (STREAM_RESET, or a replacement).

    Attributes:
        service_id: The service.
        stream_id: The stream that ended.
    """

    service_id: str
    stream_id: int


@dataclass(frozen=True, slots=True)
class SessionReset:
    """
    The service reset every stream (SESSION_RESET).
    """


@dataclass(frozen=True, slots=True)
class ProtocolFailed:
    """
    The peer broke the protocol; the object ignores all further input.

    Attributes:
        code: The WebSocket close code to use: 1009 for a frame or message too large,
            1008 for any other violation.
        reason: A short ASCII reason, safe to send as the close reason (never payload bytes
            or other peer-controlled text, at most 123 bytes).
    """

    code: int
    reason: str


Event: TypeAlias = (
    ServiceIdsReceived
    | StreamStarted
    | ConnectionStarted
    | DataReceived
    | ConnectionReset
    | StreamReset
    | SessionReset
    | ProtocolFailed
)
