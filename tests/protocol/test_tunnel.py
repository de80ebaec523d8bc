"""Tests for agent.protocol.tunnel: every side and mode, the relay checks, pairs and fuzzing."""

from __future__ import annotations

import hashlib
import os

import pytest
from hypothesis import given, settings, strategies as st

from agent.protocol import (
    CLIENT,
    CONNECTION_RESET,
    CONNECTION_START,
    DATA,
    DESTINATION,
    INT32_MAX,
    MAX_PAYLOAD_SIZE,
    SERVICE,
    SERVICE_IDS,
    SESSION_RESET,
    SOURCE,
    STREAM_RESET,
    STREAM_START,
    V1,
    V2,
    V3,
    ConnectionReset,
    ConnectionStarted,
    DataReceived,
    FrameTooLarge,
    LocalProtocolError,
    LoneFrame,
    Message,
    Mode,
    ProtocolFailed,
    ServiceIdsReceived,
    SessionReset,
    Side,
    StreamReset,
    StreamStarted,
    StreamTable,
    TunnelProtocol,
)
from agent.protocol.streams import IDLE

from .helpers import TunnelPair, assert_events_received, assert_frames_sent, decode_frames, frame


def receive(protocol: TunnelProtocol, *frames: bytes) -> None:
    """Deliver each frame as its own WebSocket message."""
    for data in frames:
        protocol.receive_message(data)


def source(version=V3, **kwargs) -> TunnelProtocol:
    """A CLIENT+SOURCE protocol with services SSH and RDP."""
    return TunnelProtocol(CLIENT, SOURCE, services=("SSH", "RDP"), version=version, **kwargs)


def destination(**kwargs) -> TunnelProtocol:
    """A CLIENT+DESTINATION protocol with services SSH and RDP."""
    return TunnelProtocol(CLIENT, DESTINATION, services=("SSH", "RDP"), **kwargs)


def started_destination(version=V3, **kwargs) -> TunnelProtocol:
    """A destination that received STREAM_START for stream 1 of SSH (or "" in V1)."""
    protocol = destination(**kwargs)
    service = "" if version is V1 else "SSH"
    receive(
        protocol,
        frame(STREAM_START, stream_id=1, service_id=service, connection_id=int(version is V3)),
    )
    protocol.events_received()
    return protocol


def relay_pair(services=("SSH", "RDP"), **kwargs) -> tuple[TunnelProtocol, TunnelProtocol]:
    """The relay's SERVICE+SOURCE and SERVICE+DESTINATION ends sharing one StreamTable."""
    table = StreamTable()
    return (
        TunnelProtocol(SERVICE, SOURCE, services=services, streams=table, **kwargs),
        TunnelProtocol(SERVICE, DESTINATION, services=services, streams=table, **kwargs),
    )


def failure_of(protocol: TunnelProtocol) -> ProtocolFailed:
    """Return the single ProtocolFailed event, checking it is the last event."""
    events = protocol.events_received()
    assert isinstance(events[-1], ProtocolFailed)
    assert protocol.failure is not None
    return events[-1]


class TestEnums:
    def test_mode_parse_and_render(self):
        """Mode parses and renders the local-proxy-mode query value."""
        modes = [Mode.parse("source"), Mode.parse("destination")]

        assert modes == [SOURCE, DESTINATION]
        assert [str(m) for m in modes] == ["source", "destination"]
        assert [m.query for m in modes] == ["source", "destination"]
        assert f"{SOURCE}|{DESTINATION:>12}" == "source| destination"

    def test_mode_parse_unknown(self):
        """Another mode value raises ValueError."""
        with pytest.raises(ValueError, match="local-proxy-mode"):
            Mode.parse("src")

    def test_sides(self):
        """Side has the two members with module aliases."""
        assert (Side.CLIENT, Side.SERVICE) == (CLIENT, SERVICE)


class TestConstruction:
    @pytest.mark.parametrize(
        "kwargs",
        [
            {"max_frame_size": 0},
            {"max_frame_size": 65536},
            {"max_payload_size": 0},
            {"max_connections": 0},
            {"max_message_size": 0},
        ],
    )
    def test_bad_limits(self, kwargs):
        """Out-of-range limits raise ValueError."""
        with pytest.raises(ValueError, match="must be"):
            TunnelProtocol(CLIENT, SOURCE, **kwargs)

    def test_streams_on_client(self):
        """A StreamTable is refused on the CLIENT side."""
        with pytest.raises(ValueError, match="SERVICE"):
            TunnelProtocol(CLIENT, SOURCE, streams=StreamTable())

    def test_attributes(self):
        """The constructor normalizes its arguments and exposes them."""
        protocol = TunnelProtocol(1, 0, services=iter(["SSH"]), version=2)  # type: ignore[arg-type]

        assert (protocol.side, protocol.mode, protocol.version) == (SERVICE, SOURCE, V2)
        assert protocol.services == ("SSH",)
        assert protocol.available_service_ids is None
        assert protocol.failure is None
        assert protocol.dropped == 0
        assert len(protocol.id) == 8
        assert repr(protocol) == (
            f"<TunnelProtocol id={protocol.id} side=SERVICE mode=source version=V2>"
        )


class TestServiceIds:
    def test_received(self):
        """SERVICE_IDS emits ServiceIdsReceived every time and sets available_service_ids."""
        protocol = source()

        receive(protocol, frame(SERVICE_IDS, available_service_ids=("SSH", "RDP")))
        receive(protocol, frame(SERVICE_IDS))

        assert_events_received(
            protocol, [ServiceIdsReceived(("SSH", "RDP")), ServiceIdsReceived(())]
        )
        assert protocol.available_service_ids == ()


class TestClientSource:
    @pytest.mark.parametrize(
        ("version", "expected"),
        [
            (V3, Message(STREAM_START, 1, service_id="SSH", connection_id=1)),
            (V2, Message(STREAM_START, 1, service_id="SSH")),
            (V1, Message(STREAM_START, 1)),
        ],
    )
    def test_stream_start_format(self, version, expected):
        """STREAM_START carries serviceId from V2 and connectionId in V3 only."""
        protocol = source(version)

        ids = protocol.send_stream_start("" if version is V1 else "SSH")

        assert ids == (1, 1)
        assert_frames_sent(protocol, [expected])

    def test_stream_start_golden_bytes(self):
        """The V3 STREAM_START frame is the docs/protocol.md §5.5 vector."""
        protocol = source()

        protocol.send_stream_start("SSH")

        assert protocol.messages_to_send() == [
            bytes.fromhex("00 0b 08 02 10 01 2a 03 53 53 48 38 01")
        ]

    def test_control_messages_are_lone_frames_and_data_is_plain(self):
        """Every control message is queued as a LoneFrame (sent alone); DATA as plain bytes."""
        protocol = source()
        protocol.send_stream_start("SSH")
        protocol.send_data("SSH", 1, b"a")
        connection = protocol.send_connection_start("SSH")
        protocol.send_data("SSH", connection, b"b" * (MAX_PAYLOAD_SIZE + 1))
        protocol.send_connection_reset("SSH", connection)
        protocol.send_stream_reset("SSH")
        relay = TunnelProtocol(SERVICE, SOURCE, services=("SSH",))
        relay.send_service_ids()
        relay.send_session_reset()

        sent = protocol.messages_to_send() + relay.messages_to_send()

        assert [(decode_frames(m)[0].type, type(m)) for m in sent] == [
            (STREAM_START, LoneFrame),
            (DATA, bytes),
            (CONNECTION_START, LoneFrame),
            (DATA, bytes),
            (DATA, bytes),
            (CONNECTION_RESET, LoneFrame),
            (STREAM_RESET, LoneFrame),
            (SERVICE_IDS, LoneFrame),
            (SESSION_RESET, LoneFrame),
        ]

    def test_stream_ids_per_service(self):
        """Each service counts its stream ids from 1, +1 per stream, even across resets."""
        protocol = source()

        ids = [
            protocol.send_stream_start("SSH")[0],
            protocol.send_stream_start("RDP")[0],
            protocol.send_stream_start("SSH")[0],
        ]
        protocol.send_stream_reset("SSH")
        ids.append(protocol.send_stream_start("SSH")[0])

        assert ids == [1, 1, 2, 3]
        assert protocol.active_stream("SSH") == 3
        assert protocol.connection_ids("SSH") == frozenset({1})

    def test_stream_id_wraps(self):
        """The stream counter wraps from INT32_MAX to 1."""
        protocol = source()
        protocol.send_stream_start("SSH")
        protocol._streams["SSH"].last_stream_id = INT32_MAX - 1

        ids = [protocol.send_stream_start("SSH")[0] for _ in range(2)]

        assert ids == [INT32_MAX, 1]

    def test_v1_refuses_service_id(self):
        """V1 has no service ids: a non-empty one is local misuse."""
        protocol = source(V1)

        with pytest.raises(LocalProtocolError, match="V1"):
            protocol.send_stream_start("SSH")

    def test_connection_start(self):
        """CONNECTION_START hands out 2, 3, ... on the active stream (V3)."""
        protocol = source()
        protocol.send_stream_start("SSH")
        protocol.messages_to_send()

        ids = [protocol.send_connection_start("SSH") for _ in range(2)]

        assert ids == [2, 3]
        assert protocol.connection_ids("SSH") == frozenset({1, 2, 3})
        assert_frames_sent(
            protocol,
            [
                Message(CONNECTION_START, 1, service_id="SSH", connection_id=2),
                Message(CONNECTION_START, 1, service_id="SSH", connection_id=3),
            ],
        )

    def test_connection_cap(self):
        """Past max_connections, CONNECTION_START is refused; a reset frees a slot."""
        protocol = source(max_connections=2)
        protocol.send_stream_start("SSH")
        protocol.send_connection_start("SSH")

        with pytest.raises(LocalProtocolError, match="2 connections"):
            protocol.send_connection_start("SSH")
        protocol.send_connection_reset("SSH", 1)

        assert protocol.send_connection_start("SSH") == 3

    def test_connection_start_needs_stream(self):
        """CONNECTION_START without an active stream is local misuse."""
        protocol = source()

        with pytest.raises(LocalProtocolError, match="no active stream"):
            protocol.send_connection_start("SSH")

    @pytest.mark.parametrize("version", [V1, V2])
    def test_connection_start_needs_v3(self, version):
        """CONNECTION_START in V1/V2 is local misuse."""
        protocol = source(version)
        protocol.send_stream_start("")

        with pytest.raises(LocalProtocolError, match="V3"):
            protocol.send_connection_start("")

    @pytest.mark.parametrize(
        ("version", "service", "expected"),
        [
            (V3, "SSH", Message(DATA, 1, payload=b"hi", service_id="SSH", connection_id=1)),
            (V2, "SSH", Message(DATA, 1, payload=b"hi", service_id="SSH")),
            (V1, "", Message(DATA, 1, payload=b"hi")),
        ],
    )
    def test_data_format(self, version, service, expected):
        """DATA carries the fields of the version in use."""
        protocol = source(version)
        protocol.send_stream_start(service)
        protocol.messages_to_send()

        protocol.send_data(service, 1, b"hi")

        assert_frames_sent(protocol, [expected])

    def test_data_golden_bytes(self):
        """A V3 DATA frame is the docs/protocol.md §5.5 vector."""
        protocol = source()
        protocol.send_stream_start("SSH")
        protocol.messages_to_send()

        protocol.send_data("SSH", 1, b"hi")

        assert protocol.messages_to_send() == [
            bytes.fromhex("00 0f 08 01 10 01 22 02 68 69 2a 03 53 53 48 38 01")
        ]

    def test_data_split(self):
        """Data longer than max_payload_size is split into full frames and a remainder."""
        protocol = source()
        protocol.send_stream_start("SSH")
        protocol.messages_to_send()
        data = os.urandom(2 * MAX_PAYLOAD_SIZE + 10)

        protocol.send_data("SSH", 1, memoryview(data))
        sent = protocol.messages_to_send()
        messages = [m for message in sent for m in decode_frames(message)]

        assert [len(m.payload) for m in messages] == [MAX_PAYLOAD_SIZE, MAX_PAYLOAD_SIZE, 10]
        assert b"".join(m.payload for m in messages) == data
        assert all(len(message) <= 65537 for message in sent)

    def test_data_non_byte_memoryview(self):
        """A memoryview of wider items is sent as its raw bytes."""
        protocol = source(max_payload_size=3)
        protocol.send_stream_start("SSH")
        protocol.messages_to_send()
        view = memoryview(b"abcdefgh").cast("I")

        protocol.send_data("SSH", 1, view)
        messages = [m for message in protocol.messages_to_send() for m in decode_frames(message)]

        assert [m.payload for m in messages] == [b"abc", b"def", b"gh"]

    def test_data_empty(self):
        """Empty data sends nothing."""
        protocol = source()
        protocol.send_stream_start("SSH")
        protocol.messages_to_send()

        protocol.send_data("SSH", 1, b"")

        assert protocol.messages_to_send() == []

    def test_data_unknown_connection(self):
        """DATA for a connection that is not open is local misuse."""
        protocol = source()
        protocol.send_stream_start("SSH")

        with pytest.raises(LocalProtocolError, match="no such connection"):
            protocol.send_data("SSH", 2, b"x")
        with pytest.raises(LocalProtocolError, match="no such connection"):
            protocol.send_data("RDP", 1, b"x")

    def test_connection_reset(self):
        """CONNECTION_RESET is sent once; resetting an unknown connection is a no-op."""
        protocol = source()
        protocol.send_stream_start("SSH")
        protocol.messages_to_send()

        protocol.send_connection_reset("SSH", 1)
        protocol.send_connection_reset("SSH", 1)
        protocol.send_connection_reset("RDP", 1)

        assert_frames_sent(
            protocol, [Message(CONNECTION_RESET, 1, service_id="SSH", connection_id=1)]
        )
        assert protocol.connection_ids("SSH") == frozenset()
        assert protocol.active_stream("SSH") == 1

    @pytest.mark.parametrize("version", [V1, V2])
    def test_connection_reset_needs_v3(self, version):
        """CONNECTION_RESET in V1/V2 is local misuse (reset the stream instead)."""
        protocol = source(version)

        with pytest.raises(LocalProtocolError, match="reset the stream"):
            protocol.send_connection_reset("", 1)

    def test_stream_reset(self):
        """STREAM_RESET ends the active stream; with none it is a no-op; an id may be given."""
        protocol = source()
        protocol.send_stream_start("SSH")
        protocol.messages_to_send()

        protocol.send_stream_reset("SSH")
        protocol.send_stream_reset("SSH")
        protocol.send_stream_reset("RDP")
        protocol.send_stream_reset("RDP", 7)

        assert_frames_sent(
            protocol,
            [
                Message(STREAM_RESET, 1, service_id="SSH"),
                Message(STREAM_RESET, 7, service_id="RDP"),
            ],
        )
        assert protocol.active_stream("SSH") is None
        assert protocol.connection_ids("SSH") == frozenset()

    def test_stream_reset_other_id_keeps_active(self):
        """Resetting another stream id leaves the active stream alone."""
        protocol = source()
        protocol.send_stream_start("SSH")
        protocol.send_stream_start("SSH")
        protocol.messages_to_send()

        protocol.send_stream_reset("SSH", 1)

        assert_frames_sent(protocol, [Message(STREAM_RESET, 1, service_id="SSH")])
        assert protocol.active_stream("SSH") == 2

    @pytest.mark.parametrize("stream_id", [0, -1, INT32_MAX + 1])
    def test_stream_reset_id_range(self, stream_id):
        """A stream id outside 1..INT32_MAX is local misuse."""
        protocol = source()

        with pytest.raises(LocalProtocolError, match="out of range"):
            protocol.send_stream_reset("SSH", stream_id)

    @pytest.mark.parametrize(
        ("method", "args"),
        [
            ("send_service_ids", ()),
            ("send_session_reset", ()),
            ("messages_to_forward", ()),
        ],
    )
    def test_service_only_calls(self, method, args):
        """SERVICE-only calls are local misuse on a client."""
        protocol = source()

        with pytest.raises(LocalProtocolError, match="SERVICE side"):
            getattr(protocol, method)(*args)

    def test_receives_data_and_resets(self):
        """A source gets DATA, CONNECTION_RESET and STREAM_RESET for its active stream."""
        protocol = source()
        protocol.send_stream_start("SSH")
        protocol.send_connection_start("SSH")

        receive(
            protocol,
            frame(DATA, stream_id=1, service_id="SSH", connection_id=2, payload=b"up"),
            frame(CONNECTION_RESET, stream_id=1, service_id="SSH", connection_id=2),
            frame(STREAM_RESET, stream_id=1, service_id="SSH"),
        )

        assert_events_received(
            protocol,
            [
                DataReceived("SSH", 1, 2, b"up"),
                ConnectionReset("SSH", 1, 2),
                StreamReset("SSH", 1),
            ],
        )
        assert protocol.active_stream("SSH") is None

    def test_v2_data_without_connection_id(self):
        """DATA without connectionId is connection 1 (docs/protocol.md §6.9)."""
        protocol = source(V2)
        protocol.send_stream_start("SSH")

        receive(protocol, frame(DATA, stream_id=1, service_id="SSH", payload=b"x"))

        assert_events_received(protocol, [DataReceived("SSH", 1, 1, b"x")])

    def test_stale_messages_dropped(self):
        """DATA and resets for other streams, connections or services are dropped and counted."""
        protocol = source()
        protocol.send_stream_start("SSH")
        protocol.send_stream_start("SSH")

        receive(
            protocol,
            frame(DATA, stream_id=1, service_id="SSH", connection_id=1, payload=b"old"),
            frame(DATA, stream_id=2, service_id="SSH", connection_id=9, payload=b"?"),
            frame(DATA, stream_id=2, service_id="RDP", connection_id=1, payload=b"?"),
            frame(CONNECTION_RESET, stream_id=1, service_id="SSH", connection_id=1),
            frame(CONNECTION_RESET, stream_id=2, service_id="SSH", connection_id=9),
            frame(STREAM_RESET, stream_id=1, service_id="SSH"),
        )

        assert_events_received(protocol, [])
        assert protocol.dropped == 6
        assert protocol.active_stream("SSH") == 2

    def test_session_reset(self):
        """SESSION_RESET forgets every stream; the counters continue."""
        protocol = source()
        protocol.send_stream_start("SSH")
        protocol.send_stream_start("RDP")

        receive(protocol, frame(SESSION_RESET))

        assert_events_received(protocol, [SessionReset()])
        assert (protocol.active_stream("SSH"), protocol.active_stream("RDP")) == (None, None)
        assert protocol.send_stream_start("SSH") == (2, 1)

    @pytest.mark.parametrize("mtype", [STREAM_START, CONNECTION_START])
    def test_source_refuses_starts(self, mtype):
        """A source receiving STREAM_START or CONNECTION_START fails the session."""
        protocol = source()

        receive(protocol, frame(mtype, stream_id=1, service_id="SSH", connection_id=1))

        assert failure_of(protocol).code == 1008


class TestClientDestination:
    @pytest.mark.parametrize(
        ("start", "version", "event"),
        [
            (Message(STREAM_START, 1, service_id="SSH", connection_id=4), V3, ("SSH", 1, 4)),
            (Message(STREAM_START, 1, service_id="SSH"), V2, ("SSH", 1, 1)),
            (Message(STREAM_START, 1), V1, ("", 1, 1)),
        ],
    )
    def test_version_inference(self, start, version, event):
        """The first STREAM_START's content sets the destination's format."""
        protocol = destination()

        receive(
            protocol,
            frame(
                start.type,
                stream_id=1,
                service_id=start.service_id,
                connection_id=start.connection_id,
            ),
        )

        assert protocol.version is version
        assert_events_received(protocol, [StreamStarted(*event)])
        assert protocol.messages_to_send() == []

    @pytest.mark.parametrize(
        ("version", "service", "expected"),
        [
            (V3, "SSH", Message(DATA, 1, payload=b"ok", service_id="SSH", connection_id=1)),
            (V2, "SSH", Message(DATA, 1, payload=b"ok", service_id="SSH")),
            (V1, "", Message(DATA, 1, payload=b"ok")),
        ],
    )
    def test_replies_in_inferred_format(self, version, service, expected):
        """The destination sends DATA in the format it inferred."""
        protocol = started_destination(version)

        protocol.send_data(service, 1, b"ok")

        assert_frames_sent(protocol, [expected])

    def test_inferred_v2_caps_connection_id(self):
        """A destination started at V2 reports connection 1 whatever the content."""
        protocol = destination(version=V2)

        receive(protocol, frame(STREAM_START, stream_id=1, service_id="SSH", connection_id=5))

        assert protocol.version is V2
        assert_events_received(protocol, [StreamStarted("SSH", 1, 1)])

    def test_format_never_mixed(self):
        """A later STREAM_START in another format fails the session."""
        protocol = started_destination(V2)

        receive(protocol, frame(STREAM_START, stream_id=2, service_id="SSH", connection_id=1))

        assert failure_of(protocol).reason == "message format changed within the session"

    def test_replacement(self):
        """A new STREAM_START resets the active stream locally first, and sends nothing."""
        protocol = started_destination()

        receive(protocol, frame(STREAM_START, stream_id=2, service_id="SSH", connection_id=1))

        assert_events_received(protocol, [StreamReset("SSH", 1), StreamStarted("SSH", 2, 1)])
        assert protocol.messages_to_send() == []
        assert protocol.active_stream("SSH") == 2

    def test_connection_start(self):
        """CONNECTION_START on the active stream adds a connection."""
        protocol = started_destination()

        receive(protocol, frame(CONNECTION_START, stream_id=1, service_id="SSH", connection_id=2))

        assert_events_received(protocol, [ConnectionStarted("SSH", 1, 2)])
        assert protocol.connection_ids("SSH") == frozenset({1, 2})

    def test_connection_start_existing_id(self):
        """CONNECTION_START for an id in use resets that connection and answers CONNECTION_RESET."""
        protocol = started_destination()

        receive(protocol, frame(CONNECTION_START, stream_id=1, service_id="SSH", connection_id=1))

        assert_events_received(protocol, [ConnectionReset("SSH", 1, 1)])
        assert_frames_sent(
            protocol, [Message(CONNECTION_RESET, 1, service_id="SSH", connection_id=1)]
        )
        assert protocol.connection_ids("SSH") == frozenset()

    def test_connection_cap(self):
        """At the cap, CONNECTION_START is answered by CONNECTION_RESET and emits no event."""
        protocol = started_destination(max_connections=2)
        receive(protocol, frame(CONNECTION_START, stream_id=1, service_id="SSH", connection_id=2))
        protocol.events_received()

        receive(protocol, frame(CONNECTION_START, stream_id=1, service_id="SSH", connection_id=3))

        assert_events_received(protocol, [])
        assert_frames_sent(
            protocol, [Message(CONNECTION_RESET, 1, service_id="SSH", connection_id=3)]
        )
        assert protocol.connection_ids("SSH") == frozenset({1, 2})

    def test_connection_start_stale(self):
        """CONNECTION_START for another stream or an unknown service is dropped."""
        protocol = started_destination()

        receive(
            protocol,
            frame(CONNECTION_START, stream_id=2, service_id="SSH", connection_id=2),
            frame(CONNECTION_START, stream_id=1, service_id="RDP", connection_id=2),
        )

        assert_events_received(protocol, [])
        assert protocol.dropped == 2

    def test_connection_start_in_v2_session(self):
        """CONNECTION_START after a V2 STREAM_START fails the session (formats never mix)."""
        protocol = started_destination(V2)

        receive(protocol, frame(CONNECTION_START, stream_id=1, service_id="SSH", connection_id=2))

        assert failure_of(protocol).reason == "CONNECTION_START in a V1/V2 session"

    def test_connection_id_zero_is_one(self):
        """A V3 destination reads connectionId 0 on CONNECTION_START/DATA as 1."""
        protocol = started_destination()
        receive(protocol, frame(CONNECTION_RESET, stream_id=1, service_id="SSH"))

        receive(
            protocol,
            frame(CONNECTION_START, stream_id=1, service_id="SSH"),
            frame(DATA, stream_id=1, service_id="SSH", payload=b"z"),
        )

        assert_events_received(
            protocol,
            [
                ConnectionReset("SSH", 1, 1),
                ConnectionStarted("SSH", 1, 1),
                DataReceived("SSH", 1, 1, b"z"),
            ],
        )

    def test_data(self):
        """DATA on the active stream and a known connection is received; the rest is dropped."""
        protocol = started_destination()

        receive(
            protocol,
            frame(DATA, stream_id=1, service_id="SSH", connection_id=1, payload=b"a"),
            frame(DATA, stream_id=3, service_id="SSH", connection_id=1, payload=b"b"),
            frame(DATA, stream_id=1, service_id="SSH", connection_id=2, payload=b"c"),
        )

        assert_events_received(protocol, [DataReceived("SSH", 1, 1, b"a")])
        assert protocol.dropped == 2

    def test_data_from_bytearray(self):
        """DATA from a bytearray message (as websockets delivers it) is received as bytes."""
        protocol = started_destination()

        protocol.receive_message(
            bytearray(frame(DATA, stream_id=1, service_id="SSH", connection_id=1, payload=b"a"))
        )
        (event,) = protocol.events_received()

        assert event == DataReceived("SSH", 1, 1, b"a")
        assert type(event.data) is bytes

    def test_stream_reset_then_data_dropped(self):
        """After STREAM_RESET the stream's DATA is dropped."""
        protocol = started_destination()

        receive(
            protocol,
            frame(STREAM_RESET, stream_id=1, service_id="SSH"),
            frame(DATA, stream_id=1, service_id="SSH", connection_id=1, payload=b"late"),
        )

        assert_events_received(protocol, [StreamReset("SSH", 1)])
        assert protocol.dropped == 1

    def test_reset_failed_stream(self):
        """The destination can refuse a stream it cannot connect with STREAM_RESET."""
        protocol = started_destination()

        protocol.send_stream_reset("SSH")

        assert_frames_sent(protocol, [Message(STREAM_RESET, 1, service_id="SSH")])
        assert protocol.active_stream("SSH") is None

    def test_source_only_calls(self):
        """A destination cannot start streams or connections."""
        protocol = started_destination()

        with pytest.raises(LocalProtocolError, match="CLIENT source"):
            protocol.send_stream_start("SSH")
        with pytest.raises(LocalProtocolError, match="CLIENT source"):
            protocol.send_connection_start("SSH")


class TestClientFailures:
    @pytest.mark.parametrize(
        ("data", "code", "reason"),
        [
            (frame(9), 1008, "unknown message type"),
            (frame(0), 1008, "message type 0"),
            (frame(0, ignorable=True), 1008, "message type 0"),
            (bytes.fromhex("0001 08"), 1008, "invalid protobuf: bad varint"),
            (bytes.fromhex("0002 4001"), 1008, "invalid protobuf: field outside the schema"),
            (frame(DATA, stream_id=-1, service_id="SSH"), 1008, "stream id must be positive"),
            (frame(STREAM_RESET, stream_id=-5), 1008, "stream id must be positive"),
            (frame(STREAM_START, stream_id=0), 1008, "stream id must be positive"),
            (frame(DATA, stream_id=1, payload=bytes(11)), 1008, "payload too large"),
            (b"\x00\x15" + bytes(21), 1009, "frame of 21 bytes exceeds 20"),
            (bytes(31), 1009, "message of 31 bytes exceeds 30"),
        ],
    )
    def test_violations(self, data, code, reason):
        """Each violation emits ProtocolFailed with its close code and a fixed reason."""
        protocol = destination(max_frame_size=20, max_payload_size=10, max_message_size=30)

        protocol.receive_message(data)
        failed = failure_of(protocol)

        assert (failed.code, failed.reason) == (code, reason)
        assert str(protocol.failure) == reason
        assert isinstance(protocol.failure, FrameTooLarge) is (code == 1009)

    def test_input_ignored_after_failure(self):
        """After a violation, the rest of the message and later messages are ignored."""
        protocol = source()

        protocol.receive_message(frame(SERVICE_IDS) + frame(9) + frame(SESSION_RESET))
        events = protocol.events_received()
        receive(protocol, frame(SERVICE_IDS), frame(9))

        assert events == [ServiceIdsReceived(()), ProtocolFailed(1008, "unknown message type")]
        assert protocol.events_received() == []

    def test_ignorable_unknown_dropped(self):
        """An unknown type with ignorable set is dropped."""
        protocol = source()

        receive(protocol, frame(42, ignorable=True, payload=b"future"))

        assert_events_received(protocol, [])
        assert protocol.dropped == 1
        assert protocol.failure is None

    def test_service_only_receive(self):
        """A client never forwards."""
        protocol = destination()

        with pytest.raises(LocalProtocolError):
            protocol.messages_to_forward()


def started_relay(**kwargs) -> tuple[TunnelProtocol, TunnelProtocol]:
    """The relay's two ends after the source started stream 1 of SSH (events drained)."""
    relay_source, relay_destination = relay_pair(**kwargs)
    relay_source.receive_message(
        frame(STREAM_START, stream_id=1, service_id="SSH", connection_id=1)
    )
    relay_source.events_received()
    relay_source.messages_to_forward()
    return relay_source, relay_destination


DATA_1 = frame(DATA, stream_id=1, service_id="SSH", connection_id=1, payload=b"hello")


class TestServiceForwarding:
    def test_zero_copy_single_frame(self):
        """A message that is one valid frame is forwarded as the very same object."""
        relay_source, _ = started_relay()
        message = bytes(DATA_1)

        relay_source.receive_message(message)
        forwarded = relay_source.messages_to_forward()

        assert len(forwarded) == 1
        assert forwarded[0] is message
        assert relay_source.events_received() == []

    def test_zero_copy_several_frames(self):
        """A message of several whole valid DATA frames is forwarded as the same object."""
        _, relay_destination = started_relay()
        message = DATA_1 + DATA_1 + DATA_1

        relay_destination.receive_message(message)
        forwarded = relay_destination.messages_to_forward()

        assert len(forwarded) == 1
        assert forwarded[0] is message
        assert type(forwarded[0]) is bytes

    def test_control_frames_grouped_by_the_peer_are_forwarded_alone(self):
        """Each frame but DATA leaves a grouped message as a LoneFrame; DATA stays plain bytes."""
        relay_source, _ = started_relay()
        start = frame(STREAM_START, stream_id=2, service_id="SSH", connection_id=1)
        data_2 = frame(DATA, stream_id=2, service_id="SSH", connection_id=1, payload=b"hi")
        more = frame(CONNECTION_START, stream_id=2, service_id="SSH", connection_id=2)
        unknown = frame(99, ignorable=True)

        relay_source.receive_message(start + data_2 + data_2 + more + unknown + data_2)
        forwarded = relay_source.messages_to_forward()

        assert forwarded == [start, data_2, data_2, more, unknown, data_2]
        assert [type(f) for f in forwarded] == [
            LoneFrame, bytes, bytes, LoneFrame, LoneFrame, bytes,
        ]  # fmt: skip

    def test_a_lone_control_frame_is_marked(self):
        """A message that is one control frame is forwarded as a LoneFrame, equal bytes."""
        relay_source, _ = started_relay()
        reset = frame(STREAM_RESET, stream_id=1, service_id="SSH")

        relay_source.receive_message(reset)
        forwarded = relay_source.messages_to_forward()

        assert forwarded == [reset]
        assert type(forwarded[0]) is LoneFrame

    def test_split_frames(self):
        """Frames split across messages are forwarded whole, byte for byte, in order."""
        relay_source, _ = started_relay()
        stream = DATA_1 + DATA_1 + frame(STREAM_RESET, stream_id=1, service_id="SSH")
        forwarded = []

        for piece in (stream[:3], stream[3:25], stream[25:26], stream[26:]):
            relay_source.receive_message(piece)
            forwarded += relay_source.messages_to_forward()

        assert forwarded == [DATA_1, DATA_1, frame(STREAM_RESET, stream_id=1, service_id="SSH")]
        assert relay_source.events_received() == [StreamReset("SSH", 1)]

    def test_whole_frame_then_partial(self):
        """A whole frame followed by part of the next is forwarded at once, the rest later."""
        relay_source, _ = started_relay()

        relay_source.receive_message(DATA_1 + DATA_1[:4])
        first = relay_source.messages_to_forward()
        relay_source.receive_message(DATA_1[4:])
        second = relay_source.messages_to_forward()

        assert (first, second) == ([DATA_1], [DATA_1])

    def test_bytearray_message(self):
        """A bytearray message is forwarded as equal bytes."""
        relay_source, _ = started_relay()

        relay_source.receive_message(bytearray(DATA_1 + DATA_1))
        forwarded = relay_source.messages_to_forward()

        assert forwarded == [DATA_1, DATA_1]
        assert all(type(f) is bytes for f in forwarded)

    def test_ignorable_unknown_forwarded(self):
        """An unknown type with ignorable set is forwarded untouched."""
        relay_source, _ = started_relay()
        message = frame(99, ignorable=True, stream_id=-4, service_id="nope")

        relay_source.receive_message(message)

        assert relay_source.messages_to_forward() == [message]
        assert relay_source.failure is None

    def test_stale_ids_forwarded(self):
        """Stale stream ids are not violations: the receiver drops them."""
        relay_source, relay_destination = started_relay()
        stale = [
            frame(DATA, stream_id=7, service_id="SSH", connection_id=1, payload=b"x"),
            frame(STREAM_RESET, stream_id=7, service_id="SSH"),
            frame(CONNECTION_RESET, stream_id=7, service_id="SSH", connection_id=3),
        ]

        receive(relay_destination, *stale)

        assert relay_destination.messages_to_forward() == stale
        assert relay_destination.events_received() == [ConnectionReset("SSH", 7, 3)]
        assert relay_source.active_stream("SSH") == 1

    def test_nothing_after_violation(self):
        """Valid frames before a violation are forwarded; nothing after it, ever."""
        relay_source, _ = started_relay()

        relay_source.receive_message(DATA_1 + frame(SESSION_RESET) + DATA_1)
        forwarded = relay_source.messages_to_forward()
        relay_source.receive_message(DATA_1)

        assert forwarded == [DATA_1]
        assert relay_source.messages_to_forward() == []
        assert failure_of(relay_source).code == 1008
        assert relay_source.events_received() == []


class TestServiceValidation:
    @pytest.mark.parametrize(
        ("end", "data", "code", "reason"),
        [
            ("source", frame(0), 1008, "message type 0"),
            ("source", frame(9), 1008, "unknown message type"),
            ("source", frame(-3), 1008, "unknown message type"),
            (
                "source",
                frame(SESSION_RESET),
                1008,
                "clients never send SESSION_RESET or SERVICE_IDS",
            ),
            (
                "destination",
                frame(SERVICE_IDS),
                1008,
                "clients never send SESSION_RESET or SERVICE_IDS",
            ),
            (
                "destination",
                frame(STREAM_START, stream_id=2, service_id="SSH", connection_id=1),
                1008,
                "only the source sends STREAM_START",
            ),
            (
                "source",
                frame(DATA, stream_id=0, service_id="SSH"),
                1008,
                "stream id must be positive",
            ),
            (
                "source",
                frame(DATA, stream_id=-1, service_id="SSH"),
                1008,
                "stream id must be positive",
            ),
            (
                "source",
                frame(STREAM_START, stream_id=0, service_id="SSH"),
                1008,
                "stream id must be positive",
            ),
            (
                "source",
                frame(STREAM_RESET, stream_id=-1, service_id="SSH"),
                1008,
                "stream id must be positive",
            ),
            (
                "destination",
                frame(CONNECTION_RESET, service_id="SSH"),
                1008,
                "stream id must be positive",
            ),
            (
                "source",
                frame(CONNECTION_START, stream_id=-9, service_id="SSH"),
                1008,
                "stream id must be positive",
            ),
            (
                "source",
                frame(DATA, stream_id=1, service_id="SSH", payload=bytes(11)),
                1008,
                "payload too large",
            ),
            ("source", frame(SERVICE_IDS, payload=bytes(11)), 1008, "payload too large"),
            (
                "source",
                frame(STREAM_START, stream_id=2, service_id="BAD"),
                1008,
                "unknown service id",
            ),
            (
                "destination",
                frame(DATA, stream_id=1, service_id="RDP", payload=b"x"),
                1008,
                "no STREAM_START for this service",
            ),
            (
                "destination",
                frame(STREAM_RESET, stream_id=1, service_id="RDP"),
                1008,
                "no STREAM_START for this service",
            ),
            (
                "source",
                frame(CONNECTION_START, stream_id=1, service_id="RDP", connection_id=2),
                1008,
                "no STREAM_START for this service",
            ),
            (
                "source",
                frame(DATA, stream_id=1, payload=b"x"),
                1008,
                "no STREAM_START for this service",
            ),
            (
                "source",
                frame(CONNECTION_RESET, stream_id=1, service_id="BAD"),
                1008,
                "unknown service id",
            ),
            ("source", bytes.fromhex("0003 0801 10"), 1008, "invalid protobuf: bad varint"),
            (
                "source",
                bytes.fromhex("0004 0801 4001"),
                1008,
                "invalid protobuf: field outside the schema",
            ),
            ("source", b"\x00\x1a" + bytes(26), 1009, "frame of 26 bytes exceeds 25"),
            ("destination", bytes(41), 1009, "message of 41 bytes exceeds 40"),
        ],
    )
    def test_violations(self, end, data, code, reason):
        """Each broken docs/protocol.md §6 rule: ProtocolFailed with its code; nothing forwarded."""
        relay_source, relay_destination = started_relay(
            max_frame_size=25, max_payload_size=10, max_message_size=40
        )
        protocol = relay_source if end == "source" else relay_destination

        protocol.receive_message(data)
        failed = failure_of(protocol)

        assert (failed.code, failed.reason) == (code, reason)
        assert protocol.messages_to_forward() == []

    @pytest.mark.parametrize(
        "data",
        [
            frame(STREAM_START, stream_id=2, service_id="SSH"),
            frame(DATA, stream_id=1, service_id="SSH", payload=b"x"),
            frame(STREAM_RESET, stream_id=1, service_id="SSH"),
        ],
    )
    def test_service_id_after_v1_stream(self, data):
        """A serviceId after a stream started without one (V1) is a violation."""
        relay_source, _ = relay_pair()
        relay_source.receive_message(frame(STREAM_START, stream_id=1))
        started = relay_source.events_received()

        relay_source.receive_message(data)

        assert started == [StreamStarted("", 1, 1)]
        assert failure_of(relay_source).reason == "service id on a stream started without one"

    def test_stream_table_tracking(self):
        """STREAM_START and matching STREAM_RESET from either end update the shared table."""
        relay_source, relay_destination = relay_pair()

        receive(
            relay_source,
            frame(STREAM_START, stream_id=1, service_id="SSH", connection_id=1),
            frame(STREAM_START, stream_id=1, service_id="RDP", connection_id=1),
            frame(STREAM_START, stream_id=2, service_id="SSH", connection_id=1),
            frame(CONNECTION_START, stream_id=2, service_id="SSH", connection_id=2),
        )
        receive(
            relay_destination,
            frame(CONNECTION_RESET, stream_id=2, service_id="SSH", connection_id=2),
            frame(STREAM_RESET, stream_id=1, service_id="RDP"),
        )

        assert relay_source.events_received() == [
            StreamStarted("SSH", 1, 1),
            StreamStarted("RDP", 1, 1),
            StreamStarted("SSH", 2, 1),
            ConnectionStarted("SSH", 2, 2),
        ]
        assert relay_destination.events_received() == [
            ConnectionReset("SSH", 2, 2),
            StreamReset("RDP", 1),
        ]
        assert relay_destination.active_stream("SSH") == 2
        assert relay_source.active_stream("RDP") is None
        assert relay_source._table.started == {"SSH", "RDP"}
        assert relay_source.connection_ids("SSH") == frozenset()

    def test_v1_stream_with_tunnel_services(self):
        """A V1 STREAM_START (no serviceId) is valid even when the tunnel has services."""
        relay_source, relay_destination = relay_pair()

        relay_source.receive_message(frame(STREAM_START, stream_id=1))
        relay_destination.receive_message(frame(DATA, stream_id=1, payload=b"x"))

        assert relay_source.failure is None
        assert relay_destination.failure is None
        assert relay_destination.active_stream("") == 1

    @pytest.mark.parametrize(
        ("version", "services", "expected"),
        [
            (V3, ("SSH", "RDP"), [bytes.fromhex("000c 0805 3203 535348 3203 524450")]),
            (V2, (), [bytes.fromhex("0002 0805")]),
            (V1, ("SSH",), []),
        ],
    )
    def test_send_service_ids(self, version, services, expected):
        """SERVICE_IDS lists the services (even none); V1 sends nothing."""
        protocol = TunnelProtocol(SERVICE, DESTINATION, services=services, version=version)

        protocol.send_service_ids()

        assert protocol.messages_to_send() == expected

    def test_send_session_reset(self):
        """The relay can send SESSION_RESET."""
        protocol = TunnelProtocol(SERVICE, SOURCE)

        protocol.send_session_reset()

        assert protocol.messages_to_send() == [bytes.fromhex("0002 0804")]

    def test_send_stream_reset(self):
        """A relay-originated STREAM_RESET clears the table; with no stream it is a no-op."""
        relay_source, relay_destination = started_relay()

        relay_destination.send_stream_reset("SSH")
        relay_destination.send_stream_reset("SSH")
        relay_destination.send_stream_reset("RDP")
        relay_destination.send_stream_reset("RDP", 4)

        assert_frames_sent(
            relay_destination,
            [
                Message(STREAM_RESET, 1, service_id="SSH"),
                Message(STREAM_RESET, 4, service_id="RDP"),
            ],
        )
        assert relay_source.active_stream("SSH") is None

    def test_send_connection_reset(self):
        """The relay can answer CONNECTION_START with CONNECTION_RESET on the active stream."""
        relay_source, _ = started_relay()

        relay_source.send_connection_reset("SSH", 2)
        relay_source.send_connection_reset("RDP", 2)

        assert_frames_sent(
            relay_source, [Message(CONNECTION_RESET, 1, service_id="SSH", connection_id=2)]
        )

    @pytest.mark.parametrize(
        ("method", "args"),
        [
            ("send_stream_start", ("SSH",)),
            ("send_connection_start", ("SSH",)),
            ("send_data", ("SSH", 1, b"x")),
        ],
    )
    def test_client_only_calls(self, method, args):
        """Calls only a local proxy makes are local misuse on the SERVICE side."""
        relay_source, _ = started_relay()

        with pytest.raises(LocalProtocolError, match="CLIENT"):
            getattr(relay_source, method)(*args)


def sha256(data: bytes) -> str:
    """Hex digest, for readable comparisons of large payloads."""
    return hashlib.sha256(data).hexdigest()


def one_byte_pieces(data: bytes) -> list[bytes]:
    """Cut a WebSocket message into 1-byte messages."""
    return [data[i : i + 1] for i in range(len(data))]


class TestTunnelPair:
    @pytest.mark.parametrize("version", [V1, V2, V3])
    def test_data_both_ways(self, version):
        """A stream carries data both ways intact through the relay, in every version."""
        pair = TunnelPair(source_version=version)
        pair.connect()
        service = "" if version is V1 else "SSH"
        up = os.urandom(300_000)
        down = os.urandom(200_001)

        stream_id, connection_id = pair.source.send_stream_start(service)
        pair.source.send_data(service, connection_id, up)
        pair.pump()
        pair.destination.send_data(service, connection_id, down)
        pair.pump()

        assert sha256(pair.received("destination")) == sha256(up)
        assert sha256(pair.received("source")) == sha256(down)
        assert pair.take("source") == [ServiceIdsReceived(("SSH",))]
        assert pair.take("destination") == [
            ServiceIdsReceived(("SSH",)),
            StreamStarted(service, stream_id, 1),
        ]
        assert pair.destination.version is version
        assert pair.take("relay_source") == [StreamStarted(service, 1, 1)]
        assert pair.relay_source.failure is pair.relay_destination.failure is None

    def test_forwarded_bytes_identical(self):
        """The relay forwards DATA messages zero copy, and STREAM_START as equal bytes."""
        pair = TunnelPair()
        pair.connect()
        pair.source.send_stream_start("SSH")
        pair.source.send_data("SSH", 1, os.urandom(100_000))
        sent = pair.source.messages_to_send()

        for message in sent:
            pair.relay_source.receive_message(message)
        forwarded = pair.relay_source.messages_to_forward()

        assert forwarded == sent
        assert len(sent) == 3
        assert all(f is s for f, s in zip(forwarded[1:], sent[1:], strict=True))
        assert type(forwarded[0]) is LoneFrame

    def test_v3_connections(self):
        """Several V3 connections carry separate data; resets close them one by one."""
        pair = TunnelPair()
        pair.connect()
        pair.source.send_stream_start("SSH")
        second = pair.source.send_connection_start("SSH")
        pair.pump()
        pair.take("destination")
        pair.take("relay_source")

        pair.source.send_data("SSH", 1, b"one")
        pair.source.send_data("SSH", second, b"two")
        pair.source.send_connection_reset("SSH", 1)
        pair.pump()
        pair.destination.send_data("SSH", second, b"back")
        pair.destination.send_connection_reset("SSH", second)
        pair.pump()

        assert pair.take("destination") == [
            DataReceived("SSH", 1, 1, b"one"),
            DataReceived("SSH", 1, 2, b"two"),
            ConnectionReset("SSH", 1, 1),
        ]
        assert pair.take("source")[-2:] == [
            DataReceived("SSH", 1, 2, b"back"),
            ConnectionReset("SSH", 1, 2),
        ]
        assert (
            pair.source.connection_ids("SSH")
            == pair.destination.connection_ids("SSH")
            == frozenset()
        )
        assert pair.source.active_stream("SSH") == pair.destination.active_stream("SSH") == 1

    def test_two_services(self):
        """Streams of two services run side by side."""
        pair = TunnelPair(services=("SSH", "RDP"))
        pair.connect()

        pair.source.send_stream_start("SSH")
        pair.source.send_stream_start("RDP")
        pair.source.send_data("RDP", 1, b"rdp")
        pair.source.send_data("SSH", 1, b"ssh")
        pair.pump()

        assert pair.take("destination")[-4:] == [
            StreamStarted("SSH", 1, 1),
            StreamStarted("RDP", 1, 1),
            DataReceived("RDP", 1, 1, b"rdp"),
            DataReceived("SSH", 1, 1, b"ssh"),
        ]

    def test_one_byte_messages(self):
        """Every WebSocket message cut into 1-byte messages still delivers the same data."""
        pair = TunnelPair(split=one_byte_pieces)
        pair.connect()
        data = os.urandom(5_000)

        pair.source.send_stream_start("SSH")
        pair.source.send_data("SSH", 1, data)
        pair.pump()

        assert pair.received("destination") == data
        assert [m.type for f in pair.forwarded for m in decode_frames(f)] == [STREAM_START, DATA]

    def test_destination_refuses_stream(self):
        """A destination that cannot connect resets the stream; the source sees StreamReset."""
        pair = TunnelPair()
        pair.connect()
        pair.source.send_stream_start("SSH")
        pair.pump()

        pair.destination.send_stream_reset("SSH")
        pair.pump()

        assert pair.take("source")[-1] == StreamReset("SSH", 1)
        assert pair.table.active == {}
        assert pair.source.send_stream_start("SSH") == (2, 1)

    def test_relay_resets_on_reconnect(self):
        """On a peer reconnect the relay resets the other peer's streams (docs/protocol.md §7.6)."""
        pair = TunnelPair()
        pair.connect()
        pair.source.send_stream_start("SSH")
        pair.pump()

        for service_id, stream_id in list(pair.table.active.items()):
            pair.relay_source.send_stream_reset(service_id, stream_id)
        pair.pump()

        assert pair.take("source")[-1] == StreamReset("SSH", 1)
        assert pair.source.active_stream("SSH") is None
        assert pair.table.active == {}

    def test_session_reset(self):
        """A relay SESSION_RESET clears the client's streams."""
        pair = TunnelPair()
        pair.connect()
        pair.source.send_stream_start("SSH")
        pair.pump()

        pair.relay_destination.send_session_reset()
        pair.pump()

        assert pair.take("destination")[-1] == SessionReset()
        assert pair.destination.active_stream("SSH") is None


# Fuzzing. One cheap binary draw per argument keeps 2000 examples within a few seconds:
# the blob is decoded into hostile-but-valid messages (5 bytes each) and cut into messages.
ROLES = st.sampled_from(
    [(CLIENT, SOURCE), (CLIENT, DESTINATION), (SERVICE, SOURCE), (SERVICE, DESTINATION)]
)
FUZZ_LIMITS = {
    "max_frame_size": 40,
    "max_payload_size": 12,
    "max_connections": 2,
    "max_message_size": 60,
}
TYPES = [0, 1, 1, 1, 2, 3, 4, 5, 6, 7, 9, -1]
STREAM_IDS = [1, 1, 2, 0, -1, 3, INT32_MAX, -(2**31)]
SERVICES = ["SSH", "SSH", "", "RDP", "bad"]
CONNECTIONS = [0, 1, 1, 2, 3]
REASONS = {
    "unknown message type",
    "message type 0",
    "payload too large",
    "stream id must be positive",
    "a source received STREAM_START",
    "a source received CONNECTION_START",
    "message format changed within the session",
    "CONNECTION_START in a V1/V2 session",
    "clients never send SESSION_RESET or SERVICE_IDS",
    "only the source sends STREAM_START",
    "unknown service id",
    "service id on a stream started without one",
    "no STREAM_START for this service",
}


def hostile_frames(blob: bytes) -> bytes:
    """Decode a blob into a stream of valid frames with hostile field values."""
    out = []
    for i in range(0, len(blob) - 4, 5):
        b0, b1, b2, b3 = blob[i : i + 4]
        mtype = TYPES[b0 % len(TYPES)]
        out.append(
            frame(
                mtype,
                stream_id=STREAM_IDS[b1 % len(STREAM_IDS)],
                ignorable=bool(b0 & 0x80),
                payload=bytes(b3 % 14),
                service_id=SERVICES[b2 % len(SERVICES)],
                available_service_ids=("SSH",) if b3 & 0x80 else (),
                connection_id=CONNECTIONS[(b2 >> 4) % len(CONNECTIONS)],
            )
        )
    return b"".join(out)


def cut_points(data: bytes, cuts: bytes) -> list[bytes]:
    """Cut data into messages at the positions the bytes of ``cuts`` pick."""
    points = sorted(c * len(data) // 255 for c in cuts)
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def fuzz_target(side: Side, mode: Mode, setup: int) -> TunnelProtocol:
    """A protocol in an interesting state: streams started on the source or in the table."""
    if side is SERVICE:
        relay_source, relay_destination = relay_pair(**FUZZ_LIMITS)
        if setup & 1:
            relay_source.receive_message(frame(STREAM_START, stream_id=1, service_id="SSH"))
        if setup & 2:
            relay_source.receive_message(frame(STREAM_START, stream_id=1))
        protocol = relay_source if mode is SOURCE else relay_destination
    else:
        protocol = TunnelProtocol(
            side, mode, services=("SSH",), version=[V1, V2, V3][setup % 3], **FUZZ_LIMITS
        )
        if mode is SOURCE and setup & 4:
            service = "" if protocol.version is V1 else "SSH"
            protocol.send_stream_start(service)
            if protocol.version is V3:
                protocol.send_connection_start(service)
    protocol.events_received()
    protocol.messages_to_send()
    if side is SERVICE:
        protocol.messages_to_forward()
    return protocol


def run_and_check(protocol: TunnelProtocol, messages: list[bytes]) -> None:
    """Feed messages (never raising) and check the invariants after each one."""
    failures = 0
    forwarded = []
    fed = 0
    for message in messages:
        failed_before = protocol.failure is not None
        protocol.receive_message(message)
        fed += len(message)
        events = protocol.events_received()
        for sent in protocol.messages_to_send():
            assert len(decode_frames(sent)) == 1
        for event in events:
            if isinstance(event, ProtocolFailed):
                failures += 1
                assert event is events[-1]
                assert event.code in {1008, 1009}
                assert event.reason.isascii()
                assert len(event.reason) <= 123
                assert (
                    event.reason in REASONS
                    or event.code == 1009
                    or event.reason.startswith("invalid protobuf")
                )
            elif isinstance(event, DataReceived):
                assert protocol.side is CLIENT
                assert event.stream_id > 0
                assert event.connection_id >= 1
                assert len(event.data) <= FUZZ_LIMITS["max_payload_size"]
        if failed_before:
            assert events == []
        if protocol.side is SERVICE:
            new = protocol.messages_to_forward()
            assert not (failed_before and new)
            forwarded += new
            table = protocol._table
            assert all(sid > 0 for sid in table.active.values())
            assert set(table.active) <= table.started <= {"", "SSH", "RDP"}
        else:
            for stream in protocol._streams.values():
                assert (stream.state is IDLE) == (stream.stream_id == 0)
                assert len(stream.connections) <= FUZZ_LIMITS["max_connections"]
                if stream.state is IDLE:
                    assert not stream.connections
    assert failures <= 1
    assert (failures == 1) == (protocol.failure is not None)
    if protocol.side is SERVICE:
        stream = b"".join(messages)
        out = b"".join(forwarded)
        decode_frames(out)
        assert stream.startswith(out)
        if protocol.failure is None:
            assert len(out) + len(protocol._frames) == fed


class TestFuzz:
    @settings(max_examples=2000, deadline=None)
    @given(
        data=st.binary(max_size=100),
        cuts=st.binary(max_size=4),
        role=ROLES,
        setup=st.integers(0, 7),
    )
    def test_arbitrary_bytes(self, data, cuts, role, setup):
        """Arbitrary bytes on every side and mode never raise and keep the invariants."""
        protocol = fuzz_target(*role, setup)

        run_and_check(protocol, cut_points(data, cuts))

    @settings(max_examples=2000, deadline=None)
    @given(
        blob=st.binary(max_size=80), cuts=st.binary(max_size=4), role=ROLES, setup=st.integers(0, 7)
    )
    def test_hostile_messages(self, blob, cuts, role, setup):
        """Valid frames with hostile values, grouped anyhow, never raise and keep the invariants."""
        protocol = fuzz_target(*role, setup)

        run_and_check(protocol, cut_points(hostile_frames(blob), cuts))
