"""
Tests for agent.ws.frames: the WebSocket fast path, with websockets' own parser as oracle.
"""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings, strategies as st
from websockets.frames import Close, Frame, Opcode
from websockets.streams import StreamReader

from agent.protocol import MAX_WS_MESSAGE_SIZE, LoneFrame
from agent.ws.frames import MAX_HEAD_SIZE, FrameReader, FrameWriter


def parse_all(data: bytes, *, mask: bool) -> list[Frame]:
    """Every frame websockets parses from ``data`` (which must end on a frame boundary)."""
    reader = StreamReader()
    reader.feed_data(data)
    frames = []
    while len(reader.buffer):
        parser = Frame.parse(reader.read_exact, mask=mask, max_size=None)
        try:
            while True:
                next(parser)
        except StopIteration as stop:
            frames.append(stop.value)
    return frames


def serialize(frame: Frame, *, mask: bool) -> bytes:
    """The frame as a client (mask) or server sends it, per websockets."""
    return frame.serialize(mask=mask)


def reader(*, masked: bool, max_size: int = MAX_WS_MESSAGE_SIZE, buffer: int = 0) -> FrameReader:
    """A reader past the handshake, on the fast path."""
    frames = FrameReader(masked=masked, max_size=max_size, buffer_size=buffer)
    frames.open(fast=True)
    return frames


def collect(frames: FrameReader, chunks: list[bytes], *, masked: bool) -> list[Frame]:
    """
    Feed chunks and rebuild the frame sequence.

    Fast payloads become binary frames; raw bytes are parsed by websockets, so they must start
    on a frame boundary, and end on one before a fast payload and after the last chunk.
    """
    out: list[Frame] = []
    raw = bytearray()
    for chunk in chunks:
        for is_raw, data in frames.feed(chunk):
            if is_raw:
                raw += data
            else:
                out += parse_all(bytes(raw), mask=masked)
                raw.clear()
                out.append(Frame(Opcode.BINARY, data))
    return out + parse_all(bytes(raw), mask=masked)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` cut at the given offsets."""
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


class TestWriter:
    @pytest.mark.parametrize(("mask", "sizes"), [(False, [129030, 64515]), (True, [64515] * 3)])
    def test_large_frames_grouped_up_to_the_limit_unmasked_only(self, mask, sizes):
        """Three 64515-byte frames: two messages from the relay, three from a proxy (no join)."""
        payloads = [bytes([i]) * 64515 for i in range(3)]

        chunks = FrameWriter(mask=mask, max_size=MAX_WS_MESSAGE_SIZE).frames(payloads)
        parsed = parse_all(b"".join(chunks), mask=mask)

        assert [f.opcode for f in parsed] == [Opcode.BINARY] * len(sizes)
        assert [len(f.data) for f in parsed] == sizes
        assert b"".join(bytes(f.data) for f in parsed) == b"".join(payloads)

    def test_small_masked_frames_share_a_message(self):
        """Small tunnel frames from a proxy are masked together, up to 4 KB per message."""
        payloads = [bytes([i]) * 1000 for i in range(6)]

        chunks = FrameWriter(mask=True, max_size=MAX_WS_MESSAGE_SIZE).frames(payloads)
        parsed = parse_all(b"".join(chunks), mask=True)

        assert [len(f.data) for f in parsed] == [4000, 2000]
        assert b"".join(bytes(f.data) for f in parsed) == b"".join(payloads)

    @pytest.mark.parametrize("mask", [False, True])
    def test_lone_frames_get_a_message_of_their_own(self, mask):
        """A LoneFrame (a control message) never shares a message; plain bytes around it do."""
        data = [bytes([i]) * 10 for i in range(6)]
        lone = [LoneFrame(bytes([0xC0 + i]) * 5) for i in range(3)]
        messages = [lone[0], data[0], data[1], lone[1], lone[2], data[2], data[3], data[4]]

        chunks = FrameWriter(mask=mask, max_size=MAX_WS_MESSAGE_SIZE).frames(messages)
        parsed = [bytes(f.data) for f in parse_all(b"".join(chunks), mask=mask)]

        assert parsed == [
            lone[0], data[0] + data[1], lone[1], lone[2], data[2] + data[3] + data[4],
        ]  # fmt: skip

    @given(
        st.lists(st.tuples(st.booleans(), st.integers(min_value=1, max_value=70000)), max_size=12),
        st.booleans(),
    )
    @settings(max_examples=60, deadline=None)
    def test_any_mix_keeps_order_and_lone_frames_alone(self, items, mask):
        """For any mix and sizes: bytes and order kept, each LoneFrame exactly one message."""
        messages = [
            LoneFrame(b"L" * size) if lone else bytes([i % 64]) * size
            for i, (lone, size) in enumerate(items)
        ]

        chunks = FrameWriter(mask=mask, max_size=MAX_WS_MESSAGE_SIZE).frames(messages)
        parsed = [bytes(f.data) for f in parse_all(b"".join(chunks), mask=mask)]

        assert b"".join(parsed) == b"".join(messages)
        lone = [m for m in messages if type(m) is LoneFrame]
        assert [p for p in parsed if p[:1] == b"L"] == lone

    @pytest.mark.parametrize("mask", [False, True])
    @pytest.mark.parametrize(
        ("size", "header"), [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)]
    )
    def test_header_lengths(self, size, header, mask):
        """7-, 16- and 64-bit lengths per RFC 6455; a masked header carries the 4-byte key."""
        payload = os.urandom(size)

        chunks = FrameWriter(mask=mask, max_size=1 << 20).frames([payload])
        data = b"".join(chunks)

        assert len(data) == header + (4 if mask else 0) + size
        assert data[0] == 0x82
        assert bool(data[1] & 0x80) is mask
        assert parse_all(data, mask=mask) == [Frame(Opcode.BINARY, payload)]

    def test_small_frames_are_one_buffer(self):
        """Header and payload of a small frame are one write: one TLS record, not two."""
        for mask in (False, True):
            chunks = FrameWriter(mask=mask, max_size=MAX_WS_MESSAGE_SIZE).frames([b"x" * 100])

            assert len(chunks) == 1

    def test_masking_keys_change(self):
        """Every frame gets a fresh key (RFC 6455 §5.3), also across the key pool's refills."""
        payload = os.urandom(4097)  # over the grouping limit: one message each
        writer = FrameWriter(mask=True, max_size=MAX_WS_MESSAGE_SIZE)
        chunks = writer.frames([payload] * 1100)

        keys = [chunk[4:8] for chunk in chunks[::2]]
        assert len(keys) == 1100
        assert len(set(keys)) > 1090
        assert parse_all(b"".join(chunks), mask=True) == [Frame(Opcode.BINARY, payload)] * 1100


def receive(frames: FrameReader, data: bytes) -> None:
    """Deliver ``data`` as a buffered transport would."""
    target = frames.get_buffer()
    target[: len(data)] = data
    frames.buffer_updated(len(data))


class TestHead:
    def test_head_then_frames_in_one_read(self):
        """The head is cut at the blank line; frames after it are parsed once opened."""
        frames = FrameReader(masked=False, max_size=MAX_WS_MESSAGE_SIZE)
        head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
        frame = serialize(Frame(Opcode.BINARY, b"hello"), mask=False)

        receive(frames, head + frame)
        got = frames.head()
        frames.open(fast=True)

        assert got == head
        assert frames.frames() == [(False, b"hello")]

    def test_head_across_reads(self):
        """An incomplete head is kept until its blank line arrives."""
        frames = FrameReader(masked=True, max_size=MAX_WS_MESSAGE_SIZE)

        receive(frames, b"GET /tunnel HTTP/1.1\r\nHost: x\r\n\r")
        first = frames.head()
        receive(frames, b"\n")

        assert first is None
        assert frames.head() == b"GET /tunnel HTTP/1.1\r\nHost: x\r\n\r\n"

    def test_head_byte_by_byte(self):
        """A head trickling in one byte at a time is returned once, when its blank line ends."""
        frames = FrameReader(masked=True, max_size=MAX_WS_MESSAGE_SIZE)
        request = b"GET /tunnel HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"

        heads = []
        for byte in request + b"\x82":
            receive(frames, bytes([byte]))
            if not frames.head_done:
                heads.append(frames.head())

        assert heads == [None] * (len(request) - 1) + [request]

    def test_oversized_head_goes_to_websockets_whole(self):
        """A head with no end in sight is returned for websockets to refuse."""
        frames = FrameReader(masked=True, max_size=MAX_WS_MESSAGE_SIZE)
        junk = b"X" * (MAX_HEAD_SIZE + 1)

        receive(frames, junk)

        assert frames.head() == junk

    def test_frame_buffer_comes_with_a_successful_handshake(self):
        """Until the handshake succeeds the buffer is head-sized; then large frames fit."""
        frames = FrameReader(masked=True, max_size=MAX_WS_MESSAGE_SIZE)
        refused = FrameReader(masked=True, max_size=MAX_WS_MESSAGE_SIZE)
        head = b"GET /tunnel HTTP/1.1\r\nHost: x\r\n\r\n"
        payload = os.urandom(MAX_WS_MESSAGE_SIZE)
        frame = serialize(Frame(Opcode.BINARY, payload), mask=True)

        before = len(frames.get_buffer())
        receive(frames, head + frame[:100])
        frames.head()
        frames.open(fast=True)
        after = len(frames.get_buffer())
        receive(refused, head)
        refused.head()
        refused.open(fast=False)

        assert MAX_HEAD_SIZE < before < 2 * MAX_HEAD_SIZE
        assert after >= len(frame)
        assert len(refused.get_buffer()) == before
        assert frames.feed(frame[100:]) == [(False, payload)]

    def test_failed_handshake_hands_everything_over(self):
        """After a refused upgrade (a 4xx with a body), every byte goes to websockets."""
        frames = FrameReader(masked=False, max_size=MAX_WS_MESSAGE_SIZE)
        receive(frames, b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\n\r\nForbid")
        frames.head()
        frames.open(fast=False)

        assert frames.feed(b"den") == [(True, b"Forbidden")]


class TestReader:
    @pytest.mark.parametrize("masked", [False, True])
    def test_binary_frames_are_fast_and_control_frames_raw(self, masked):
        """Payloads of binary frames come out as payloads; pings and closes whole, in order."""
        sequence = [
            Frame(Opcode.BINARY, b"a" * 10),
            Frame(Opcode.PING, b"1700000000000"),
            Frame(Opcode.BINARY, os.urandom(70000)),
            Frame(Opcode.CLOSE, Close(1000, "bye").serialize()),
        ]
        stream = b"".join(serialize(f, mask=masked) for f in sequence)
        frames = reader(masked=masked)

        items = frames.feed(stream)

        assert [raw for raw, _ in items] == [False, True, False, True]
        assert items[0][1] == b"a" * 10
        assert parse_all(items[1][1], mask=masked) == [sequence[1]]
        assert items[2][1] == sequence[2].data
        assert parse_all(items[3][1], mask=masked) == [sequence[3]]
        assert not frames.handed_over

    @pytest.mark.parametrize(
        "odd",
        [
            serialize(Frame(Opcode.TEXT, b"hi"), mask=False),
            serialize(Frame(Opcode.BINARY, b"part", fin=False), mask=False),
            bytes([0x82 | 0x40, 3]) + b"rsv",
        ],
        ids=["text", "fragment", "reserved-bit"],
    )
    def test_unusual_frames_hand_the_rest_over(self, odd):
        """Anything but a final plain binary or control frame: websockets gets the rest."""
        before = serialize(Frame(Opcode.BINARY, b"first"), mask=False)
        after = serialize(Frame(Opcode.BINARY, b"after"), mask=False)
        frames = reader(masked=False)

        items = frames.feed(before + odd + after[:3])
        later = frames.feed(after[3:])

        assert items == [(False, b"first"), (True, odd + after[:3])]
        assert later == [(True, after[3:])]
        assert frames.handed_over

    @pytest.mark.parametrize("masked", [False, True])
    def test_wrong_masking_is_left_to_websockets(self, masked):
        """A client frame without a mask, or a server frame with one, is websockets' to reject."""
        wrong = serialize(Frame(Opcode.BINARY, b"x"), mask=not masked)
        frames = reader(masked=masked)

        assert frames.feed(wrong) == [(True, wrong)]
        assert frames.handed_over

    def test_oversized_message_is_left_to_websockets(self):
        """Over the size limit: websockets closes with 1009, as before the fast path."""
        big = serialize(Frame(Opcode.BINARY, bytes(101)), mask=False)
        frames = reader(masked=False, max_size=100)

        assert frames.feed(big) == [(True, big)]

    def test_input_view_may_be_reused_after_feed(self):
        """Payloads and kept partial frames are copies: the caller's buffer can be overwritten."""
        frame = serialize(Frame(Opcode.BINARY, b"0123456789" * 10), mask=True)
        buffer = bytearray(frame + frame[:50])
        frames = reader(masked=True)

        first = frames.feed(memoryview(buffer))
        buffer[:] = bytes(len(buffer))
        second = frames.feed(frame[50:])

        assert first == second == [(False, b"0123456789" * 10)]

    @pytest.mark.parametrize("masked", [False, True])
    @pytest.mark.parametrize("buffer", [0, MAX_WS_MESSAGE_SIZE + 14, 160 * 1024])
    @pytest.mark.parametrize("read", [7, 50000, 65536, 1 << 20])
    def test_partial_frames_survive_buffer_compaction(self, masked, buffer, read):
        """Largest and odd-sized frames in reads that never align with them: all intact."""
        sizes = [MAX_WS_MESSAGE_SIZE, 1, 70000, MAX_WS_MESSAGE_SIZE, 64515, 0, 125, 126]
        payloads = [os.urandom(size) for size in sizes]
        stream = b"".join(serialize(Frame(Opcode.BINARY, p), mask=masked) for p in payloads)
        frames = reader(masked=masked, buffer=buffer)

        got = []
        for start in range(0, len(stream), read):
            got += frames.feed(stream[start : start + read])

        assert got == [(False, p) for p in payloads]

    def test_buffer_must_hold_a_largest_frame(self):
        """A buffer that a valid frame could not fit in is refused up front."""
        with pytest.raises(ValueError, match="cannot hold"):
            FrameReader(masked=False, max_size=1000, buffer_size=1000)

    @settings(max_examples=2000, deadline=None)
    @given(
        frames=st.lists(
            st.one_of(
                st.builds(Frame, st.just(Opcode.BINARY), st.binary(max_size=300)),
                st.builds(Frame, st.just(Opcode.PING), st.binary(max_size=125)),
                st.builds(Frame, st.just(Opcode.PONG), st.binary(max_size=125)),
                st.builds(Frame, st.just(Opcode.TEXT), st.text(max_size=20).map(str.encode)),
                st.binary(max_size=20).map(lambda d: Frame(Opcode.BINARY, d, fin=False)),
            ),
            max_size=12,
        ),
        cuts=st.lists(st.integers(min_value=0), max_size=8),
        masked=st.booleans(),
    )
    def test_same_frames_as_websockets_for_any_split(self, frames, cuts, masked):
        """Fast payloads plus websockets' parse of the raw bytes give back the exact sequence."""
        stream = b"".join(serialize(f, mask=masked) for f in frames)

        got = collect(reader(masked=masked), split(stream, cuts), masked=masked)

        assert got == frames

    @settings(max_examples=2000, deadline=None)
    @given(st.lists(st.binary(max_size=200), max_size=6), st.booleans())
    def test_garbage_never_raises(self, chunks, masked):
        """Hostile bytes are split or handed over, never an exception; raw bytes are verbatim."""
        frames = reader(masked=masked, max_size=64)
        joined = b"".join(chunks)
        for chunk in chunks:
            for raw, data in frames.feed(chunk):
                if raw:
                    assert data in joined
                else:
                    assert len(data) <= 64
