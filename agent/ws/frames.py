"""
The WebSocket fast path: binary frames read and written without websockets' per-frame machinery.

websockets does the opening handshake, control frames, the closing handshake and every error
(RFC 6455). Per message, its generator-based parser and its serializer cost more CPU than the
small payloads they often carry (an interactive session sends a message every few keystrokes). So
complete single-frame binary messages take this path; every other frame reaches websockets
unchanged, whole, at a frame boundary. The first frame this reader does not vouch for
(fragmented, text, reserved bits set, wrong masking, over the size limit) hands the rest of the
stream to websockets for good, so anything unusual gets websockets' own handling and close code.

Sans-I/O: bytes in, ``(raw, data)`` items out; frames out as lists of bytes to write.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING, Final


try:  # websockets' C extension; its pure-Python fallback when not built for this platform
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - wheels ship the extension on our platforms
    from websockets.utils import apply_mask

from agent.common.buffers import lazy_buffer
from agent.protocol.framing import LoneFrame


if TYPE_CHECKING:
    import mmap
    from collections.abc import Callable, Sequence

    from agent.protocol.messages import Buffer


__all__ = ["FrameReader", "FrameWriter"]

# Largest HTTP head accepted before the handshake is left to websockets entirely (it refuses it).
MAX_HEAD_SIZE: Final = 16384
# Receive buffer until the handshake succeeds: room for a head of MAX_HEAD_SIZE and what follows
# it in the same read. Connections that never upgrade never hold the frame buffer.
_HEAD_BUFFER_SIZE: Final = MAX_HEAD_SIZE + 4096
# First header byte of a final binary frame without reserved bits: the fast path's one case.
_FIN_BINARY: Final = 0x82
# First header bytes of final close, ping and pong frames: passed whole to websockets.
_CONTROL: Final = frozenset((0x88, 0x89, 0x8A))
_MAX_CONTROL_SIZE: Final = 125
# 2 bytes, 8 of extended length, 4 of mask key.
_MAX_HEADER_SIZE: Final = 14
# Below this payload size, header and payload are written as one buffer: one TLS record.
_JOIN_BELOW: Final = 4096
# Mask keys are sliced from one urandom read instead of one syscall per frame.
_MASK_POOL_SIZE: Final = 4096
_LENGTH_16 = struct.Struct("!H")
_LENGTH_64 = struct.Struct("!Q")
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")


class FrameReader:
    """
    Split a WebSocket byte stream into fast binary payloads and raw frames for websockets.

    The reader owns its receive buffer, for asyncio's ``BufferedProtocol``: the transport reads
    into :meth:`get_buffer`, :meth:`buffer_updated` records it. A partial frame stays where it
    landed until it completes; it moves to the front only when free space runs short, so most
    bytes are copied once, when the payload is taken out (and unmasked, on the server side).

    Before the handshake completes, :meth:`head` cuts the HTTP head off the stream; the caller
    gives it to websockets, then calls :meth:`open` with the outcome. Until then the buffer is
    only big enough for the head: the frame buffer comes with a successful handshake.

    Args:
        masked: Whether the peer's frames must be masked (True on the server side).
        max_size: Largest payload taken on the fast path; larger ones go to websockets.
        buffer_size: Receive buffer; at least a largest frame. The default, room for two,
            moves fewer partial frames; a smaller one saves memory.
    """

    __slots__ = (
        "_buffer",
        "_end",
        "_masked",
        "_max_size",
        "_size",
        "_start",
        "_view",
        "handed_over",
        "head_done",
    )

    def __init__(self, *, masked: bool, max_size: int, buffer_size: int = 0) -> None:
        """
        Create a reader expecting an HTTP head first.

        Raises:
            ValueError: ``buffer_size`` cannot hold a largest frame.
        """
        self._masked = masked
        self._max_size = max_size
        largest = max_size + _MAX_HEADER_SIZE
        if buffer_size and buffer_size < largest:
            raise ValueError(f"a {buffer_size}-byte buffer cannot hold a {largest}-byte frame")
        self._size = buffer_size or 2 * largest
        self._buffer: bytearray | mmap.mmap = bytearray(_HEAD_BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._start = 0  # first byte not yet parsed
        self._end = 0  # end of the received bytes
        self.head_done = False
        self.handed_over = False

    def get_buffer(self) -> memoryview:
        """
        Return the free space to receive into.
        """
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = 0
            return self._view
        if len(self._buffer) - end < len(self._buffer) // 2:
            # Move the partial frame to the front (memoryview assignment handles the overlap):
            # then a frame that fits the buffer fits behind it.
            self._view[: end - start] = self._view[start:end]
            self._start, self._end = 0, end - start
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """
        Record ``nbytes`` received into the buffer from :meth:`get_buffer`.
        """
        self._end += nbytes

    def head(self) -> bytes | None:
        """
        Return the HTTP head, terminator included, once complete, and consume it.

        A head over ``MAX_HEAD_SIZE`` is returned whole, unterminated, for websockets to refuse.

        Returns:
            The head, or None while it is incomplete.
        """
        start, end = self._start, self._end
        # Searched in place: a head trickling in byte by byte costs no copies.
        stop = self._buffer.find(b"\r\n\r\n", start, end)
        if stop < 0:
            if end - start <= MAX_HEAD_SIZE:
                return None
            stop = end - 4
        self._start = stop + 4
        self.head_done = True
        return bytes(self._view[start : stop + 4])

    def open(self, *, fast: bool) -> None:
        """
        Start reading frames after the head: fast when the handshake succeeded, else raw only.
        """
        self.head_done = True
        self.handed_over = not fast
        if fast and len(self._buffer) < self._size:
            # A new buffer rather than a resize: the transport may still hold a view of the old.
            # Lazy: an idle connection's pings only ever touch its first page.
            start, end = self._start, self._end
            buffer = lazy_buffer(self._size)
            buffer[: end - start] = self._view[start:end]
            self._buffer, self._view = buffer, memoryview(buffer)
            self._start, self._end = 0, end - start

    def hand_over(self) -> None:
        """
        Give everything from now on to websockets (it has left the OPEN state, say).
        """
        self.handed_over = True

    def receive(self, data: Buffer, parse: Callable[[], None]) -> None:
        """
        Copy ``data`` in as a buffered transport would, calling ``parse`` after each piece.

        For transports that are not buffered; ``parse`` calls :meth:`head` or :meth:`frames`.
        """
        with memoryview(data) as source:
            done = 0
            while done < len(source):
                target = self.get_buffer()
                n = min(len(target), len(source) - done)
                target[:n] = source[done : done + n]
                self._end += n
                done += n
                parse()

    def feed(self, data: Buffer) -> list[tuple[bool, bytes]]:
        """
        Copy ``data`` in and return the frames (after the head), every payload as a copy.
        """
        items: list[tuple[bool, bytes]] = []

        def parse() -> None:
            items.extend((raw, bytes(chunk)) for raw, chunk in self.frames())

        self.receive(data, parse)
        return items

    def frames(self) -> list[tuple[bool, Buffer]]:
        """
        Parse the received bytes; return ``(raw, data)`` items in stream order.

        ``raw`` False: the payload of a binary message. ``raw`` True: bytes for websockets'
        ``receive_data``, always starting at a frame boundary. Raw items and masked payloads are
        copies; an unmasked payload is a view of the buffer, valid until the next call to
        :meth:`get_buffer` or :meth:`receive`: consume it before, copy what you keep.
        """
        view, start, end = self._view, self._start, self._end
        if self.handed_over:
            self._start = end
            return [(True, bytes(view[start:end]))] if end > start else []
        items: list[tuple[bool, Buffer]] = []
        masked = self._masked
        while (parsed := _parse_header(view, start, end)) is not None:
            length, payload = parsed
            first = view[start]
            fast = first == _FIN_BINARY and length <= self._max_size
            if bool(view[start + 1] & 0x80) != masked or not (
                fast or (first in _CONTROL and length <= _MAX_CONTROL_SIZE)
            ):
                # Not ours to judge: websockets takes the rest of the stream.
                self.handed_over = True
                items.append((True, bytes(view[start:end])))
                start = end
                break
            if masked:
                payload += 4
            stop = payload + length
            if stop > end:
                break
            if not fast:
                items.append((True, bytes(view[start:stop])))
            elif masked:
                items.append(
                    (False, apply_mask(view[payload:stop], bytes(view[payload - 4 : payload])))
                )
            else:
                # A view: the consumer copies each payload out once (no 128 KB interim).
                items.append((False, view[payload:stop]))
            start = stop
        self._start = start
        return items


def _parse_header(view: memoryview, pos: int, end: int) -> tuple[int, int] | None:
    """
    Return the payload length and where the mask key or payload starts, or None if incomplete.
    """
    if end - pos < 2:
        return None
    length = view[pos + 1] & 0x7F
    if length == 126:
        if end - pos < 4:
            return None
        return _LENGTH_16.unpack_from(view, pos + 2)[0], pos + 4
    if length == 127:
        if end - pos < 10:
            return None
        return _LENGTH_64.unpack_from(view, pos + 2)[0], pos + 10
    return length, pos + 2


class FrameWriter:
    """
    Frame binary messages: masked on the client side (RFC 6455 §5.3), plain on the server side.

    Consecutive messages share one WebSocket message, up to ``max_size`` bytes unmasked and up to
    4 KB masked (masking a group means joining it first: a copy that only pays off for small
    messages). Each message given stays whole and in order inside its group: grouping only saves
    headers and records. A :class:`~agent.protocol.framing.LoneFrame` (any tunnel frame but
    DATA) is never grouped: it gets a WebSocket message of its own (docs/protocol.md §5.7).

    Args:
        mask: Whether to mask (True on the client side).
        max_size: Largest WebSocket message to produce.
    """

    __slots__ = ("_group_limit", "_keys", "_mask", "_next_key")

    def __init__(self, *, mask: bool, max_size: int) -> None:
        """
        Create a writer.
        """
        self._mask = mask
        self._group_limit = _JOIN_BELOW if mask else max_size
        self._keys = b""
        self._next_key = 0

    def frames(self, messages: Sequence[bytes]) -> list[bytes]:
        """
        Return the bytes to write for ``messages``, grouped, headers included.
        """
        out: list[bytes] = []
        group: list[bytes] = []
        size = 0
        limit = self._group_limit
        for message in messages:
            if type(message) is LoneFrame:
                if group:
                    self._frame(group, size, out)
                    group, size = [], 0
                self._frame([message], len(message), out)
                continue
            if group and size + len(message) > limit:
                self._frame(group, size, out)
                group, size = [], 0
            group.append(message)
            size += len(message)
        if group:
            self._frame(group, size, out)
        return out

    def _frame(self, group: list[bytes], size: int, out: list[bytes]) -> None:
        if size < 126:
            header = bytes((_FIN_BINARY, size | (0x80 if self._mask else 0)))
        elif size < 65536:
            header = _HEADER_16.pack(_FIN_BINARY, 126 | (0x80 if self._mask else 0), size)
        else:
            header = _HEADER_64.pack(_FIN_BINARY, 127 | (0x80 if self._mask else 0), size)
        if self._mask:
            key = self._key()
            payload = group[0] if len(group) == 1 else b"".join(group)
            masked = apply_mask(payload, key)
            if size < _JOIN_BELOW:
                out.append(header + key + masked)
            else:
                out.append(header + key)
                out.append(masked)
        elif size < _JOIN_BELOW:
            out.append(header + b"".join(group))
        else:
            out.append(header)
            out.extend(group)

    def _key(self) -> bytes:
        """
        Return a fresh 4-byte masking key from the kernel's CSPRNG (RFC 6455 §5.3).
        """
        at = self._next_key
        if at >= len(self._keys):
            self._keys = os.urandom(_MASK_POOL_SIZE)
            at = 0
        self._next_key = at + 4
        return self._keys[at : at + 4]
