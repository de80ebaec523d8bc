"""
Tunnel messages: the protobuf ``Message`` body of a frame, as plain Python values.

Code outside :mod:`agent.protocol` sees :class:`Message` dataclasses and bytes, never
protobuf objects (docs/architecture.md §2.3). Three encoders/decoders live here:

* :func:`encode_message` / :func:`decode_message`: the general, cold-path API, written out by
  hand so that a proxy never loads the protobuf runtime (memory). The schema is
  ``message.proto``; the generated code in ``_pb`` is the oracle the tests compare against.
* :func:`scan_message`: the decoder every receive path uses. It walks the fields in place
  (``bytes``, ``bytearray`` or ``memoryview`` plus offsets), never copies the payload and
  returns its offsets, so the relay validates a 64 KB DATA frame without touching its bytes.
  It is strict: any field outside the schema, or a known field with another wire type, is an
  error (docs/protocol.md §5.4). Otherwise it accepts exactly what the
  upb protobuf runtime accepts; the tests check both against each other.
* :func:`encode_data_frame`: the DATA hot path; one ``bytes.join`` copies the payload once,
  header and prefix included. Its output equals protobuf's encoding (tests check it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Final, TypeAlias

from agent.exceptions import LocalProtocolError, RemoteProtocolError


__all__ = [
    "CONNECTION_RESET",
    "CONNECTION_START",
    "DATA",
    "INT32_MAX",
    "MAX_PAYLOAD_SIZE",
    "SERVICE_IDS",
    "SESSION_RESET",
    "STREAM_RESET",
    "STREAM_START",
    "UINT32_MAX",
    "UNKNOWN",
    "V1",
    "V2",
    "V3",
    "Buffer",
    "Message",
    "MessageScanner",
    "MessageType",
    "ProtocolVersion",
    "ScannedMessage",
    "decode_message",
    "encode_data_frame",
    "encode_message",
    "scan_message",
]

#: Largest ``payload`` of one message (docs/protocol.md §5.2: 64512 bytes, 63 KiB).
MAX_PAYLOAD_SIZE: Final = 64512
#: Largest ``streamId`` (int32); the source's counter wraps from here to 1 (docs/protocol.md §6.9).
INT32_MAX: Final = 0x7FFF_FFFF
#: Largest ``connectionId`` (uint32).
UINT32_MAX: Final = 0xFFFF_FFFF

#: What the decoders accept: a ``bytes`` object is sliced, the others are read through a view.
Buffer: TypeAlias = bytes | bytearray | memoryview


class ProtocolVersion(IntEnum):
    """
    Version of the tunnel message format (docs/protocol.md §6.10).
    """

    V1 = 1
    V2 = 2
    V3 = 3

    @property
    def subprotocol(self) -> str:
        """
        The ``Sec-WebSocket-Protocol`` value for this version (docs/protocol.md §3.2).
        """
        return f"aws.iot.securetunneling-{self.value}.0"

    @classmethod
    def from_subprotocol(cls, subprotocol: str) -> ProtocolVersion:
        """
        Return the version a ``Sec-WebSocket-Protocol`` value names.

        Args:
            subprotocol: For example ``aws.iot.securetunneling-3.0``.

        Returns:
            The matching version.

        Raises:
            ValueError: The value names no supported version.
        """
        for version in cls:
            if version.subprotocol == subprotocol:
                return version
        raise ValueError(f"unsupported subprotocol: {subprotocol!r}")


V1: Final = ProtocolVersion.V1
V2: Final = ProtocolVersion.V2
V3: Final = ProtocolVersion.V3


class MessageType(IntEnum):
    """
    ``Message.Type`` values (docs/protocol.md §5.3).
    """

    UNKNOWN = 0
    DATA = 1
    STREAM_START = 2
    STREAM_RESET = 3
    SESSION_RESET = 4
    SERVICE_IDS = 5
    CONNECTION_START = 6
    CONNECTION_RESET = 7


UNKNOWN: Final = MessageType.UNKNOWN
DATA: Final = MessageType.DATA
STREAM_START: Final = MessageType.STREAM_START
STREAM_RESET: Final = MessageType.STREAM_RESET
SESSION_RESET: Final = MessageType.SESSION_RESET
SERVICE_IDS: Final = MessageType.SERVICE_IDS
CONNECTION_START: Final = MessageType.CONNECTION_START
CONNECTION_RESET: Final = MessageType.CONNECTION_RESET

_TYPES: Final[dict[int, MessageType]] = {member.value: member for member in MessageType}


@dataclass(frozen=True, slots=True)
class Message:
    """
    One tunnel message; zero and empty values mean "absent" as in proto3 (docs/protocol.md §5.4).

    Attributes:
        type: The message type. A value outside :class:`MessageType` that a peer sent is
            kept as a plain ``int``.
        stream_id: ``streamId`` (int32).
        ignorable: Receivers may drop an unknown type when set.
        payload: DATA bytes.
        service_id: ``serviceId`` (V2+).
        available_service_ids: ``availableServiceIds`` (SERVICE_IDS, V2+).
        connection_id: ``connectionId`` (uint32, V3).
    """

    type: MessageType | int
    stream_id: int = 0
    ignorable: bool = False
    payload: bytes = b""
    service_id: str = ""
    available_service_ids: tuple[str, ...] = ()
    connection_id: int = 0


#: The fields :func:`scan_message` returns, in this order: type, stream_id, ignorable,
#: payload_start, payload_end, service_id, available_service_ids, connection_id.
ScannedMessage: TypeAlias = tuple[int, int, bool, int, int, str, tuple[str, ...], int]

# Tag bytes (field number << 3 | wire type) of the schema (docs/protocol.md §5.3).
_TYPE_TAG: Final = 0x08
_STREAM_ID_TAG: Final = 0x10
_IGNORABLE_TAG: Final = 0x18
_PAYLOAD_TAG: Final = 0x22
_SERVICE_ID_TAG: Final = 0x2A
_AVAILABLE_TAG: Final = 0x32
_CONNECTION_ID_TAG: Final = 0x38

_VARINT_TAGS: Final = frozenset({_TYPE_TAG, _STREAM_ID_TAG, _IGNORABLE_TAG, _CONNECTION_ID_TAG})
_LENGTH_TAGS: Final = frozenset({_PAYLOAD_TAG, _SERVICE_ID_TAG, _AVAILABLE_TAG})
_UINT64_MASK: Final = 0xFFFF_FFFF_FFFF_FFFF
_INT32_SIGN: Final = 0x8000_0000
_UINT32_MASK: Final = 0xFFFF_FFFF
# upb reads tags and lengths as 32-bit varints (at most 5 bytes) and other values as 64-bit
# ones (at most 10 bytes, surplus high bits ignored).
_MAX_TAG_BYTES: Final = 5
_MAX_LENGTH_BYTES: Final = 5
_MAX_VALUE_BYTES: Final = 10


def _varint(buf: Buffer, pos: int, end: int, max_bytes: int) -> tuple[int, int]:
    """
    Decode a multi-byte varint starting at ``pos``.

    Args:
        buf: The buffer.
        pos: Offset of the first byte.
        end: Offset just past the message.
        max_bytes: Most bytes the varint may take.

    Returns:
        The value and the offset after it.

    Raises:
        RemoteProtocolError: Truncated or too long.
    """
    value = 0
    shift = 0
    limit = min(end, pos + max_bytes)
    while pos < limit:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    raise RemoteProtocolError("invalid protobuf: bad varint")


def _utf8(buf: Buffer, start: int, end: int) -> str:
    """
    Decode a proto3 ``string`` field, which must be valid UTF-8 as upb requires.

    Raises:
        RemoteProtocolError: Not valid UTF-8.
    """
    try:
        return str(buf[start:end], "utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("invalid protobuf: string is not UTF-8") from None


def scan_message(buf: Buffer, start: int, end: int) -> ScannedMessage:  # noqa: C901, PLR0912
    """
    Decode the message in ``buf[start:end]`` without copying the payload.

    One loop with one branch per field keeps the per-frame cost to a few dozen bytecodes:
    this runs for every frame on every side (the complexity noqa is for that reason).

    Args:
        buf: The buffer holding the message body (no length prefix).
        start: Offset of the body.
        end: Offset just past the body.

    Returns:
        A :data:`ScannedMessage`; the payload is ``buf[payload_start:payload_end]``.

    Raises:
        RemoteProtocolError: Truncated or invalid protobuf, or a field outside the schema.
    """
    mtype = stream_id = connection_id = payload_start = payload_end = 0
    ignorable = False
    service_id = ""
    available: list[str] = []
    pos = start
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _varint(buf, pos, end, _MAX_TAG_BYTES)
        if tag in _LENGTH_TAGS:
            if pos < end and buf[pos] < 0x80:
                size = buf[pos]
                pos += 1
            else:
                size, pos = _varint(buf, pos, end, _MAX_LENGTH_BYTES)
            if size > end - pos:
                raise RemoteProtocolError("invalid protobuf: truncated field")
            if tag == _PAYLOAD_TAG:
                payload_start = pos
                payload_end = pos = pos + size
            elif tag == _SERVICE_ID_TAG:
                service_id = _utf8(buf, pos, pos + size)
                pos += size
            else:
                available.append(_utf8(buf, pos, pos + size))
                pos += size
            continue
        if tag not in _VARINT_TAGS:
            raise RemoteProtocolError("invalid protobuf: field outside the schema")
        if pos < end and buf[pos] < 0x80:
            value = buf[pos]
            pos += 1
        else:
            value, pos = _varint(buf, pos, end, _MAX_VALUE_BYTES)
            value &= _UINT64_MASK
        if tag == _TYPE_TAG:
            # Open enum (proto3): an unknown value is kept; int32 semantics.
            mtype = (value & _UINT32_MASK ^ _INT32_SIGN) - _INT32_SIGN
        elif tag == _STREAM_ID_TAG:
            stream_id = (value & _UINT32_MASK ^ _INT32_SIGN) - _INT32_SIGN
        elif tag == _CONNECTION_ID_TAG:
            connection_id = value & _UINT32_MASK
        else:
            ignorable = value != 0
    return (
        mtype,
        stream_id,
        ignorable,
        payload_start,
        payload_end,
        service_id,
        tuple(available),
        connection_id,
    )


class MessageScanner:
    """
    :func:`scan_message` with a one-entry cache of the last DATA frame's layout.

    A bulk transfer sends runs of DATA frames that differ only in their payload bytes: same
    stream, service, connection and payload size. When a frame has the size of the cached
    one and the same bytes before and after the payload, its fields are the cached ones:
    the scanner is deterministic and never reads inside the payload, whose length is fixed by
    those same leading bytes. Two C-level comparisons then replace the field-by-field scan.
    Any other frame is scanned in full (and, if it is DATA with a payload, cached).
    """

    __slots__ = ("_fields", "_head", "_head_size", "_size", "_tail", "_tail_size")

    def __init__(self) -> None:
        """
        Create a scanner with an empty cache.
        """
        self._size = -1
        self._head = self._tail = b""
        self._head_size = self._tail_size = 0
        self._fields: ScannedMessage = (0, 0, False, 0, 0, "", (), 0)

    def scan(self, buf: Buffer, start: int, end: int) -> ScannedMessage:
        """
        Decode the message in ``buf[start:end]`` like :func:`scan_message`.

        Args:
            buf: The buffer holding the message body.
            start: Offset of the body.
            end: Offset just past the body.

        Returns:
            A :data:`ScannedMessage`.

        Raises:
            RemoteProtocolError: Truncated or invalid protobuf, or a field outside the schema.
        """
        if (
            end - start == self._size
            and buf[start : start + self._head_size] == self._head
            and buf[end - self._tail_size : end] == self._tail
        ):
            mtype, stream_id, ignorable, _, _, service_id, available, conn = self._fields
            return (
                mtype,
                stream_id,
                ignorable,
                start + self._head_size,
                end - self._tail_size,
                service_id,
                available,
                conn,
            )
        fields = scan_message(buf, start, end)
        payload_start, payload_end = fields[3], fields[4]
        if fields[0] == MessageType.DATA and payload_end > payload_start:
            self._size = end - start
            self._head = bytes(buf[start:payload_start])
            self._tail = bytes(buf[payload_end:end])
            self._head_size = payload_start - start
            self._tail_size = end - payload_end
            self._fields = fields
        return fields


def decode_message(body: Buffer) -> Message:
    """
    Decode one message body (no length prefix).

    Args:
        body: The protobuf bytes.

    Returns:
        The message; an unknown ``type`` value is kept as a plain ``int``.

    Raises:
        RemoteProtocolError: Truncated or invalid protobuf, or fields outside the schema.
    """
    mtype, stream_id, ignorable, start, end, service_id, available, connection_id = scan_message(
        body, 0, len(body)
    )
    return Message(
        type=_TYPES.get(mtype, mtype),
        stream_id=stream_id,
        ignorable=ignorable,
        payload=bytes(body[start:end]),
        service_id=service_id,
        available_service_ids=available,
        connection_id=connection_id,
    )


def encode_message(msg: Message) -> bytes:
    """
    Encode one message body (no length prefix) in protobuf's wire format.

    Written out by hand, like :func:`encode_data_frame`, so that a running proxy never loads the
    protobuf runtime (about 5 MB of a 30 MB memory budget). Fields go in field-number order with
    zero and empty values omitted (proto3), exactly as the generated code serializes them; the
    tests check both against each other on generated and random messages.

    Args:
        msg: The message.

    Returns:
        The protobuf bytes.

    Raises:
        LocalProtocolError: A field is out of its range (int32 ``type``/``stream_id``,
            uint32 ``connection_id``) or a string is not encodable as UTF-8.
    """
    mtype, stream_id, connection_id = int(msg.type), msg.stream_id, msg.connection_id
    if mtype not in _INT32 or stream_id not in _INT32 or connection_id not in _UINT32:
        raise LocalProtocolError("cannot encode message: a numeric field is out of range")
    parts: list[bytes] = []
    if mtype:
        parts += (b"\x08", _encode_int32(mtype))
    if stream_id:
        parts += (b"\x10", _encode_int32(stream_id))
    if msg.ignorable:
        parts.append(b"\x18\x01")
    if msg.payload:
        parts += (b"\x22", _encode_varint(len(msg.payload)), bytes(msg.payload))
    try:
        if msg.service_id:
            service = msg.service_id.encode()
            parts += (b"\x2a", _encode_varint(len(service)), service)
        for name in msg.available_service_ids:
            encoded = name.encode()
            parts += (b"\x32", _encode_varint(len(encoded)), encoded)
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"cannot encode message: {exc.reason}") from exc
    if connection_id:
        parts += (b"\x38", _encode_varint(connection_id))
    return b"".join(parts)


_INT32: Final = range(-(2**31), 2**31)
_UINT32: Final = range(2**32)


def _encode_int32(value: int) -> bytes:
    """
    Encode an int32 as protobuf does: negative values as 10-byte two's complement varints.
    """
    return _encode_varint(value + (1 << 64) if value < 0 else value)


_SMALL_VARINTS: Final = tuple(bytes((value,)) for value in range(0x80))
_PREFIX: Final = struct.Struct(">H")


def _encode_varint(value: int) -> bytes:
    """
    Encode a non-negative integer (at most 64 bits) as a varint.
    """
    if value < 0x80:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_data_frame(
    stream_id: int,
    service_id: bytes,
    connection_id: int,
    payload: Buffer,
) -> bytes:
    """
    Encode a whole DATA frame, 2-byte length prefix included, copying the payload once.

    The fields are written in field-number order with zero/empty ones omitted, exactly as
    protobuf serializes them (the DATA vector of docs/protocol.md §5.5).

    Args:
        stream_id: ``streamId`` (1..INT32_MAX).
        service_id: ``serviceId`` already encoded as UTF-8; empty to omit it (V1).
        connection_id: ``connectionId``; 0 to omit it (V1/V2).
        payload: The data (any bytes-like object, for example a ``memoryview`` slice).

    Returns:
        The frame.

    Raises:
        LocalProtocolError: The frame would exceed the 2-byte length prefix.
    """
    # Small values are looked up inline: a call per field costs more than the rest of a
    # 64-byte message's encoding.
    small, varint = _SMALL_VARINTS, _encode_varint
    size = len(payload)
    head = b"\x08\x01\x10" + (small[stream_id] if stream_id < 0x80 else varint(stream_id))
    if size:
        head += b"\x22" + (small[size] if size < 0x80 else varint(size))
    tail = b""
    if service_id:
        length = len(service_id)
        tail = b"\x2a" + (small[length] if length < 0x80 else varint(length)) + service_id
    if connection_id:
        tail += b"\x38" + (small[connection_id] if connection_id < 0x80 else varint(connection_id))
    total = len(head) + size + len(tail)
    if total > 0xFFFF:
        raise LocalProtocolError("DATA frame too large")
    return b"".join((_PREFIX.pack(total), head, payload, tail))
