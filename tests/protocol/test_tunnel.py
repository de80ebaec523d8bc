"""Tests for agent.protocol.tunnel: every side and mode, the relay checks, pairs and fuzzing."""

from __future__ import annotations

import hashlib
import os

import pytest

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
        """The V3 STREAM_START frame is the data-plane §4 vector."""
        protocol = source()

        protocol.send_stream_start("SSH")

        assert protocol.messages_to_send() == [
            bytes.fromhex("00 0b 08 02 10 01 2a 03 53 53 48 38 01")
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
        """A V3 DATA frame is the data-plane §4 vector."""
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
        """DATA without connectionId is connection 1 (data-plane §5 IDs)."""
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
