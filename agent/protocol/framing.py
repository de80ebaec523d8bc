"""
Tunnel framing: a 2-byte big-endian length prefix, then the message body (docs/protocol.md §5.1).

Frames do not line up with WebSocket messages: one message may carry several frames or part
of one, so the receiver reassembles them in a :class:`FrameBuffer`. A frame other than DATA is a
:class:`LoneFrame`: it must travel in a WebSocket message of its own (docs/protocol.md §5.7).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from agent.exceptions import FrameTooLarge, LocalProtocolError


if TYPE_CHECKING:
    from agent.protocol.messages import Buffer


__all__ = [
    "MAX_FRAME_SIZE",
    "MAX_WS_MESSAGE_SIZE",
    "PREFIX_SIZE",
    "FrameBuffer",
    "LoneFrame",
    "encode_frame",
]

#: Largest body a 2-byte prefix can announce (docs/protocol.md §5.2: N <= 65535).
MAX_FRAME_SIZE: Final = 65535
#: Largest WebSocket message either side accepts (docs/protocol.md §4.2: 131076 bytes).
MAX_WS_MESSAGE_SIZE: Final = 131076
#: Size of the length prefix.
PREFIX_SIZE: Final = 2


class LoneFrame(bytes):
    """
    A whole frame, prefix included, that travels in a WebSocket message of its own.

    Every frame other than DATA is one (docs/protocol.md §5.7): the AWS localproxy stops reading
    a WebSocket message after some control messages, so nothing may share a message with them.
    Whoever makes a frame knows its type: the tunnel core wraps each control message it encodes,
    the relay each non-DATA frame it forwards. A writer that groups frames into WebSocket
    messages groups plain ``bytes`` only; telling them apart costs a type check, no parsing.
    """

    __slots__ = ()


def encode_frame(body: bytes) -> bytes:
    """
    Prefix a message body with its 2-byte big-endian length.

    Args:
        body: The encoded message.

    Returns:
        The frame.

    Raises:
        LocalProtocolError: The body is longer than :data:`MAX_FRAME_SIZE`.
    """
    size = len(body)
    if size > MAX_FRAME_SIZE:
        raise LocalProtocolError(f"frame body of {size} bytes exceeds {MAX_FRAME_SIZE}")
    return size.to_bytes(2, "big") + body


class FrameBuffer:
    """
    Reassembly buffer for length-prefixed frames.

    Bounded: once :meth:`next_frame` returns ``None`` it holds at most one partial frame, and
    every announced frame length is checked against ``max_frame_size`` before waiting for
    its bytes.

    Fast path: when nothing is pending, :meth:`feed` keeps a reference to the fed object
    instead of copying it, so a WebSocket message that is exactly one frame is only sliced
    once, by :meth:`next_frame`. A fed ``bytearray`` or byte ``memoryview`` is therefore read
    in place until :meth:`next_frame` returns ``None`` (the leftover partial frame is then
    copied): do not mutate it before that.

    Args:
        max_frame_size: Largest body length a prefix may announce.
    """

    __slots__ = ("_data", "_owned", "_pos", "max_frame_size")

    def __init__(self, *, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        """
        Create an empty buffer.
        """
        self.max_frame_size = max_frame_size
        self._data: Buffer = b""
        self._pos = 0
        # True when _data is a bytearray of our own that may be appended to.
        self._owned = False

    def __len__(self) -> int:
        """
        Return the number of buffered bytes not yet returned as frames.
        """
        return len(self._data) - self._pos

    def feed(self, data: Buffer) -> None:
        """
        Append bytes received from the peer.

        Args:
            data: Any bytes-like object; ``bytes`` and ``bytearray`` are not copied when
                nothing is pending.
        """
        if not data:
            return
        if self._pos == len(self._data):
            # Fast path: reference the fed object (a memoryview of another format is copied).
            if isinstance(data, memoryview) and (data.format != "B" or data.ndim != 1):
                data = bytes(data)
            self._data = data
            self._pos = 0
            self._owned = False
        elif self._owned:
            buf = self._data
            assert isinstance(buf, bytearray)  # noqa: S101 - _owned implies it
            if self._pos:
                del buf[: self._pos]
                self._pos = 0
            buf += data
        else:
            buf = bytearray(memoryview(self._data)[self._pos :])
            buf += data
            self._data = buf
            self._pos = 0
            self._owned = True

    def next_span(self) -> tuple[Buffer, int, int] | None:
        """
        Return the next complete frame as ``(buffer, body_start, body_end)``, without a copy.

        The span is only valid until the next :meth:`feed`; ``buffer[body_start - 2:body_end]``
        is the whole frame, prefix included.

        Returns:
            The span, or ``None`` when more data is needed.

        Raises:
            FrameTooLarge: The next prefix announces more than ``max_frame_size`` bytes.
        """
        data = self._data
        pos = self._pos
        available = len(data) - pos
        if available < PREFIX_SIZE:
            if available and not self._owned:
                self._keep_partial()
            return None
        size = data[pos] << 8 | data[pos + 1]
        if size > self.max_frame_size:
            raise FrameTooLarge(f"frame of {size} bytes exceeds {self.max_frame_size}")
        end = pos + PREFIX_SIZE + size
        if end > len(data):
            if not self._owned:
                self._keep_partial()
            return None
        if end == len(data):
            # Drained: drop our reference so a large message is not kept alive.
            self._data = b""
            self._pos = 0
            self._owned = False
        else:
            self._pos = end
        return data, pos + PREFIX_SIZE, end

    def next_frame(self) -> bytes | None:
        """
        Return the next complete frame body (without its prefix).

        Returns:
            The body, or ``None`` when more data is needed (never an exception for a
            partial frame).

        Raises:
            FrameTooLarge: The next prefix announces more than ``max_frame_size`` bytes.
        """
        span = self.next_span()
        if span is None:
            return None
        data, start, end = span
        if type(data) is bytes:
            return data[start:end]
        return bytes(memoryview(data)[start:end])

    def _keep_partial(self) -> None:
        """
        Copy the pending partial frame out of a fed object we do not own.
        """
        self._data = bytearray(memoryview(self._data)[self._pos :])
        self._pos = 0
        self._owned = True
