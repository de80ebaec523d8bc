"""Tests for agent.protocol.streams: the transition table and the stream records."""

from __future__ import annotations

import itertools

import pytest

from agent.protocol import INT32_MAX, TRANSITIONS, StreamEvent, StreamState, StreamTable
from agent.protocol.messages import UINT32_MAX
from agent.protocol.streams import IDLE, OPEN, ServiceStream


class TestTransitions:
    def test_table(self):
        """The table holds exactly the docs/protocol.md §6 transitions."""
        table = {(s.name, e.name): n.name for (s, e), n in TRANSITIONS.items()}

        assert table == {
            ("IDLE", "STREAM_START"): "OPEN",
            ("OPEN", "STREAM_START"): "OPEN",
            ("OPEN", "CONNECTION_START"): "OPEN",
            ("OPEN", "CONNECTION_RESET"): "OPEN",
            ("OPEN", "STREAM_RESET"): "IDLE",
            ("IDLE", "SESSION_RESET"): "IDLE",
            ("OPEN", "SESSION_RESET"): "IDLE",
        }

    @pytest.mark.parametrize(
        ("state", "event"),
        [
            (s, e)
            for s, e in itertools.product(StreamState, StreamEvent)
            if (s, e) not in TRANSITIONS
        ],
    )
    def test_undefined_pairs_do_nothing(self, state, event):
        """An event absent from the table for the state changes nothing and reports False."""
        stream = ServiceStream()
        if state is OPEN:
            stream.start(5, 1)

        handled = stream.handle(event)

        assert handled is False
        assert stream.state is state


class TestServiceStream:
    def test_start_and_replace(self):
        """start() opens the stream with one connection and reports the stream it replaced."""
        stream = ServiceStream()

        first = stream.start(1, 1)
        stream.connections.add(2)
        second = stream.start(2, 7)

        assert (first, second) == (0, 1)
        assert (stream.state, stream.stream_id, stream.connections) == (OPEN, 2, {7})

    def test_reset_clears(self):
        """A stream reset returns to IDLE with no id and no connections."""
        stream = ServiceStream()
        stream.start(3, 1)

        handled = stream.handle(StreamEvent.STREAM_RESET)

        assert handled is True
        assert (stream.state, stream.stream_id, stream.connections) == (IDLE, 0, set())

    def test_stream_counter_wraps(self):
        """Stream ids count from 1 and wrap from INT32_MAX to 1."""
        stream = ServiceStream()
        first = [stream.next_stream_id() for _ in range(2)]
        stream.last_stream_id = INT32_MAX - 1

        last = [stream.next_stream_id() for _ in range(3)]

        assert first == [1, 2]
        assert last == [INT32_MAX, 1, 2]

    def test_connection_counter_skips_ids_in_use(self):
        """Connection ids count 1, 2, 3, skip ids in use, and wrap at 2**32."""
        stream = ServiceStream()
        stream.start(1, 1)
        stream.connections.update({2, 3})
        after_start = stream.next_connection_id()
        stream.last_connection_id = UINT32_MAX - 1
        stream.connections.add(UINT32_MAX)

        wrapped = stream.next_connection_id()

        assert after_start == 4
        assert wrapped == 4


class TestStreamTable:
    def test_start_reset(self):
        """start() records the active stream; reset() clears it only for the active id."""
        table = StreamTable()

        replaced = [table.start("SSH", 1), table.start("SSH", 2)]
        stale = table.reset("SSH", 1)
        state_before = table.state("SSH")
        matched = table.reset("SSH", 2)

        assert replaced == [0, 1]
        assert (stale, matched) == (False, True)
        assert (state_before, table.state("SSH")) == (OPEN, IDLE)
        assert table.active == {}
        assert table.started == {"SSH"}

    def test_clear(self):
        """clear() forgets active and started streams."""
        table = StreamTable()
        table.start("", 4)

        table.clear()

        assert (table.active, table.started) == ({}, set())

    def test_repr(self):
        """The repr shows the active streams."""
        table = StreamTable()
        table.start("SSH", 9)

        assert repr(table) == "StreamTable(active={'SSH': 9}, started=['SSH'])"
