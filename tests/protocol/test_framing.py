"""Tests for agent.protocol.framing: the length prefix and the reassembly buffer."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from agent.protocol import (
    MAX_FRAME_SIZE,
    FrameBuffer,
    FrameTooLarge,
    LocalProtocolError,
    encode_frame,
)


def drain(buffer: FrameBuffer) -> list[bytes]:
    """Return every complete frame body the buffer holds."""
    frames = []
    while (body := buffer.next_frame()) is not None:
        frames.append(body)
    return frames


class TestEncodeFrame:
    def test_prefix(self):
        """The prefix is the big-endian body length."""
        framed = encode_frame(b"\x08\x05")

        assert framed == b"\x00\x02\x08\x05"

    def test_largest(self):
        """A body of exactly MAX_FRAME_SIZE bytes is framed with prefix ff ff."""
        framed = encode_frame(bytes(MAX_FRAME_SIZE))

        assert framed[:2] == b"\xff\xff"
        assert len(framed) == MAX_FRAME_SIZE + 2

    def test_too_large(self):
        """A longer body raises LocalProtocolError."""
        with pytest.raises(LocalProtocolError):
            encode_frame(bytes(MAX_FRAME_SIZE + 1))


class TestFrameBuffer:
    def test_one_frame_per_message(self):
        """A message that is exactly one frame yields its body and leaves nothing buffered."""
        buffer = FrameBuffer()

        buffer.feed(b"\x00\x03abc")

        assert drain(buffer) == [b"abc"]
        assert len(buffer) == 0

    def test_fast_path_keeps_reference(self):
        """With nothing pending, a fed bytes object is referenced, not copied."""
        buffer = FrameBuffer()
        message = b"\x00\x03abc"

        buffer.feed(message)
        span = buffer.next_span()

        assert span is not None
        assert span[0] is message
        assert span[1:] == (2, 5)

    def test_several_frames_per_message(self):
        """Several frames in one message come out in order."""
        buffer = FrameBuffer()

        buffer.feed(b"\x00\x01a\x00\x00\x00\x02bc")

        assert drain(buffer) == [b"a", b"", b"bc"]

    def test_split_across_messages(self):
        """A frame split over messages (even inside the prefix) is reassembled."""
        buffer = FrameBuffer()

        buffer.feed(b"\x00")
        first = drain(buffer)
        buffer.feed(b"\x04ab")
        second = drain(buffer)
        buffer.feed(b"cd\x00\x01")
        third = drain(buffer)
        buffer.feed(b"e")

        assert (first, second, third) == ([], [], [b"abcd"])
        assert drain(buffer) == [b"e"]

    def test_one_byte_feeds(self):
        """Feeding one byte at a time yields the same frames."""
        data = encode_frame(b"hello") + encode_frame(b"") + encode_frame(bytes(300))
        buffer = FrameBuffer()
        frames = []

        for i in range(len(data)):
            buffer.feed(data[i : i + 1])
            frames += drain(buffer)

        assert frames == [b"hello", b"", bytes(300)]
        assert len(buffer) == 0

    def test_partial_copied_out_of_mutable_input(self):
        """A pending partial frame does not alias a fed bytearray, which the caller may reuse."""
        buffer = FrameBuffer()
        message = bytearray(b"\x00\x01a\x00\x03bc")

        buffer.feed(message)
        first = drain(buffer)
        message[:] = b"XXXXXXXX"
        buffer.feed(b"d")

        assert first == [b"a"]
        assert drain(buffer) == [b"bcd"]

    def test_memoryview_input(self):
        """A memoryview is accepted and copied."""
        buffer = FrameBuffer()

        buffer.feed(memoryview(b"\x00\x02hi"))

        assert drain(buffer) == [b"hi"]

    def test_feed_without_draining(self):
        """Feeding twice before draining keeps both messages."""
        buffer = FrameBuffer()

        buffer.feed(b"\x00\x02h")
        buffer.feed(b"i\x00")
        buffer.feed(b"\x01!")

        assert drain(buffer) == [b"hi", b"!"]

    def test_empty_feed(self):
        """Feeding nothing changes nothing."""
        buffer = FrameBuffer()

        buffer.feed(b"")

        assert buffer.next_frame() is None
        assert len(buffer) == 0

    def test_oversize_prefix(self):
        """A prefix announcing more than max_frame_size raises FrameTooLarge at once."""
        buffer = FrameBuffer(max_frame_size=10)

        buffer.feed(b"\x00\x0b")

        with pytest.raises(FrameTooLarge):
            buffer.next_frame()

    def test_limit_is_inclusive(self):
        """A frame of exactly max_frame_size bytes is accepted."""
        buffer = FrameBuffer(max_frame_size=10)

        buffer.feed(b"\x00\x0a" + bytes(10))

        assert drain(buffer) == [bytes(10)]

    def test_bounded(self):
        """After draining, only the pending partial frame is held, not the whole message."""
        buffer = FrameBuffer()

        buffer.feed(encode_frame(bytes(60000)) + b"\x00\x05ab")
        drain(buffer)

        assert len(buffer) == 4
        assert len(buffer._data) == 4


def cut(data: bytes, cuts: bytes) -> list[bytes]:
    """Cut data at the positions the bytes of ``cuts`` pick (0..255 scaled to the length)."""
    points = sorted(c * len(data) // 255 for c in cuts)
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def bodies_from(blob: bytes) -> list[bytes]:
    """Derive frame bodies from a blob: each length byte (mod 32) is followed by the body."""
    bodies = []
    pos = 0
    while pos < len(blob):
        size = blob[pos] % 32
        bodies.append(blob[pos + 1 : pos + 1 + size])
        pos += 1 + size
    if blob[:1] == b"\xff":
        bodies.append(bytes(300))  # a body whose prefix has a non-zero high byte
    return bodies


# One cheap binary draw per argument keeps 2000 examples fast (hypothesis' own cost dominates).
KINDS = st.sampled_from([bytes, bytearray, memoryview])


class TestFrameBufferFuzz:
    @settings(max_examples=2000, deadline=None)
    @given(blob=st.binary(max_size=120), cuts=st.binary(max_size=6), kind=KINDS)
    def test_reassembles_any_split(self, blob, cuts, kind):
        """Valid frames cut anywhere and fed as any buffer type come out exactly."""
        bodies = bodies_from(blob)
        data = b"".join(encode_frame(b) for b in bodies)
        buffer = FrameBuffer()
        frames = []

        for piece in cut(data, cuts):
            buffer.feed(kind(piece))
            frames += drain(buffer)

        assert frames == bodies
        assert len(buffer) == 0

    @settings(max_examples=2000, deadline=None)
    @given(
        data=st.binary(max_size=120),
        cuts=st.binary(max_size=6),
        limit=st.sampled_from([0, 1, 5, 300, MAX_FRAME_SIZE]),
    )
    def test_garbage_only_raises_frame_too_large(self, data, cuts, limit):
        """Arbitrary bytes never raise anything but FrameTooLarge, and frames respect the limit."""
        buffer = FrameBuffer(max_frame_size=limit)
        fed = 0
        out = 0

        try:
            for piece in cut(data, cuts):
                buffer.feed(piece)
                fed += len(piece)
                # Count each frame as it comes: the next one may raise.
                while (body := buffer.next_frame()) is not None:
                    assert len(body) <= limit
                    out += len(body) + 2
                assert len(buffer) == fed - out
                assert len(buffer) < limit + 2
        except FrameTooLarge:
            assert data[out] << 8 | data[out + 1] > limit
