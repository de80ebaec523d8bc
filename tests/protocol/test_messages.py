"""Tests for agent.protocol.messages: golden vectors, the strict scanner, the DATA encoder."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import runtime_version
from google.protobuf.message import DecodeError
from google.protobuf.unknown_fields import UnknownFieldSet
from hypothesis import HealthCheck, given, settings, strategies as st

from agent.protocol import (
    DATA,
    INT32_MAX,
    STREAM_START,
    V1,
    V3,
    LocalProtocolError,
    Message,
    MessageType,
    ProtocolVersion,
    RemoteProtocolError,
    decode_message,
    encode_frame,
    encode_message,
)
from agent.protocol._pb import message_pb2
from agent.protocol.messages import (
    UINT32_MAX,
    MessageScanner,
    encode_data_frame,
    scan_message,
)

from .helpers import load_vectors


ROOT = Path(__file__).resolve().parents[2]
VECTORS = load_vectors()


def vector_message(fields: dict[str, object]) -> Message:
    """Build the Message a vector's JSON describes."""
    fields = dict(fields)
    payload = bytes.fromhex(str(fields.pop("payload_hex", "")))
    available = tuple(fields.pop("available_service_ids", ()))  # type: ignore[call-overload]
    mtype = int(fields.pop("type"))  # type: ignore[call-overload]
    return Message(
        MessageType(mtype) if mtype in MessageType._value2member_map_ else mtype,
        payload=payload,
        available_service_ids=available,
        **fields,  # type: ignore[arg-type]
    )


def upb_decode(body: bytes) -> tuple[object, ...] | None:
    """Decode with the upb runtime, strictly (None if invalid or with unknown fields)."""
    try:
        pb = message_pb2.Message.FromString(body)
    except DecodeError:
        return None
    if len(UnknownFieldSet(pb)):
        return None
    return (
        pb.type,
        pb.streamId,
        pb.ignorable,
        pb.payload,
        pb.serviceId,
        tuple(pb.availableServiceIds),
        pb.connectionId,
    )


def scan_decode(body: bytes) -> tuple[object, ...] | None:
    """Decode with scan_message, in the same shape as upb_decode."""
    try:
        mtype, sid, ignorable, start, end, service, available, conn = scan_message(
            body, 0, len(body)
        )
    except RemoteProtocolError:
        return None
    return (mtype, sid, ignorable, body[start:end], service, available, conn)


def varint(value: int, padding: int = 0) -> bytes:
    """Encode a varint, optionally with ``padding`` redundant zero groups (non-minimal)."""
    groups = []
    while True:
        groups.append(value & 0x7F)
        value >>= 7
        if not value:
            break
    groups.extend([0] * padding)
    return bytes([g | 0x80 for g in groups[:-1]] + [groups[-1]])


@st.composite
def raw_fields(draw: st.DrawFn) -> bytes:
    """Protobuf-shaped bytes: valid, non-minimal, unknown, mistyped and broken fields."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        number = draw(st.integers(0, 9))
        wire = draw(st.sampled_from([0, 0, 2, 2, 1, 3, 4, 5, 6, 7]))
        out += varint(number << 3 | wire, draw(st.sampled_from([0, 0, 0, 1, 3, 4, 5])))
        if wire == 0:
            value = draw(
                st.integers(0, 5)
                | st.integers(0, 2**64 - 1)
                | st.sampled_from([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**70 - 1])
            )
            out += varint(value, draw(st.sampled_from([0, 0, 0, 1, 2, 9])))
        elif wire == 2:
            content = draw(
                st.binary(max_size=6)
                | st.sampled_from(["SSH", "é", "\x00", "𝄞"]).map(str.encode)
                | st.sampled_from([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82"])
            )
            length = len(content) + draw(st.sampled_from([0, 0, 0, 0, -1, 1, 2**31]))
            out += varint(max(length, 0), draw(st.sampled_from([0, 0, 1, 4, 5])))
            out += content
        elif wire == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire == 5:
            out += draw(st.binary(min_size=4, max_size=4))
    if draw(st.booleans()) and out:
        out = out[: draw(st.integers(0, len(out) - 1))]
    return bytes(out)


class TestGoldenVectors:
    @pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
    def test_decode(self, vector):
        """Every vector frame decodes to the message the vector describes."""
        data = bytes.fromhex(vector["hex"])

        assert data[0] << 8 | data[1] == len(data) - 2
        assert decode_message(data[2:]) == vector_message(vector["message"])

    @pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
    def test_encode(self, vector):
        """Every vector message encodes to exactly the vector bytes."""
        data = bytes.fromhex(vector["hex"])

        assert encode_frame(encode_message(vector_message(vector["message"]))) == data

    @pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
    def test_matches_protobuf(self, vector):
        """The generated protobuf code parses every vector like the scanner does."""
        body = bytes.fromhex(vector["hex"])[2:]

        assert upb_decode(body) == scan_decode(body)
        assert upb_decode(body) is not None

    def test_data_frame_encoder(self):
        """The DATA hot-path encoder writes the golden DATA frames byte for byte."""
        golden = {v["name"]: bytes.fromhex(v["hex"]) for v in VECTORS}

        assert encode_data_frame(1, b"SSH", 1, b"hi") == golden["data_v3"]
        assert encode_data_frame(1, b"", 0, b"hi") == golden["data_v1"]


class TestDecodeMessage:
    def test_unknown_type_kept_as_int(self):
        """An unknown type value is kept as a plain int instead of failing."""
        msg = decode_message(bytes.fromhex("0809 1801"))

        assert msg.type == 9
        assert not isinstance(msg.type, MessageType)
        assert msg.ignorable is True

    def test_known_type_is_enum(self):
        """A known type value decodes to the MessageType member."""
        msg = decode_message(bytes.fromhex("0801"))

        assert msg.type is DATA

    @pytest.mark.parametrize(
        "hex_body",
        [
            "08",  # truncated varint
            "2203 41",  # truncated length-delimited field
            "4001",  # field 8: outside the schema
            "0a00",  # type sent length-delimited: not the schema's wire type
            "1d 01020304",  # streamId as fixed32
            "0005",  # field number 0
            "0f",  # wire type 7
            "2a02 fffe",  # serviceId not UTF-8
            "3202 c080",  # availableServiceIds overlong UTF-8
            "08ffffffffffffffffffff01",  # 11-byte varint
            "88808080800005",  # 6-byte tag
            "22 8180808080 41",  # 6-byte length
        ],
    )
    def test_invalid(self, hex_body):
        """Invalid protobuf and fields outside the schema raise RemoteProtocolError."""
        with pytest.raises(RemoteProtocolError):
            decode_message(bytes.fromhex(hex_body))

    def test_last_value_wins(self):
        """A repeated scalar field keeps its last value, as protobuf does."""
        msg = decode_message(bytes.fromhex("0801 0802 2a0141 2a0142 3201 41 3201 42"))

        assert msg == Message(STREAM_START, service_id="B", available_service_ids=("A", "B"))

    def test_wide_varints(self):
        """Negative and oversized varints are read as int32/uint32 like protobuf."""
        msg = decode_message(bytes.fromhex("10ffffffffffffffffff01 38ffffffffff01 18 8002"))

        assert (msg.stream_id, msg.connection_id, msg.ignorable) == (-1, UINT32_MAX, True)

    @pytest.mark.parametrize("kind", [bytearray, memoryview])
    def test_buffer_types(self, kind):
        """Bodies in a bytearray or memoryview decode like bytes, payload as bytes."""
        body = bytes.fromhex("08 01 10 01 22 02 68 69 2a 03 53 53 48 38 01")

        msg = decode_message(kind(body))

        assert msg == decode_message(body)
        assert type(msg.payload) is bytes

    def test_scan_returns_payload_offsets(self):
        """scan_message reports the payload as offsets into the buffer, without copying it."""
        data = bytes.fromhex("00 0f 08 01 10 01 22 02 68 69 2a 03 53 53 48 38 01")

        scanned = scan_message(data, 2, len(data))

        assert scanned == (1, 1, False, 8, 10, "SSH", (), 1)

    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=raw_fields())
    def test_scanner_agrees_with_protobuf(self, body):
        """For protobuf-shaped input the scanner accepts exactly what upb accepts, same values."""
        assert scan_decode(body) == upb_decode(body)

    @settings(max_examples=500, deadline=None)
    @given(body=st.binary(max_size=40))
    def test_scanner_agrees_on_garbage(self, body):
        """For arbitrary bytes the scanner and upb agree too."""
        assert scan_decode(body) == upb_decode(body)


def scanner_frames(blob: bytes) -> list[bytes]:
    """Frames that often share a DATA layout: few stream ids, sizes and trailers."""
    frames = []
    for i in range(0, len(blob) - 2, 3):
        b0, b1, b2 = blob[i : i + 3]
        body = encode_message(
            Message(
                DATA if b0 % 5 else STREAM_START,
                stream_id=1 + b0 % 2,
                payload=bytes([b1]) * (b1 % 3),
                service_id=["SSH", "RDP", ""][b2 % 3],
                connection_id=b2 % 2,
            )
        )
        if b0 & 0x80:
            body += b"\x40\x01"  # an unknown trailing field: same size, different tail
        frames.append(body)
    return frames


class TestMessageScanner:
    def test_cache_hit(self):
        """A DATA frame like the previous one but for its payload is decoded from the cache."""
        scanner = MessageScanner()
        first = encode_data_frame(1, b"SSH", 1, b"ab")
        second = encode_data_frame(1, b"SSH", 1, b"cd")

        scanner.scan(first, 2, len(first))
        cached = scanner._fields
        result = scanner.scan(second, 2, len(second))

        assert result == scan_message(second, 2, len(second))
        assert scanner._fields is cached

    def test_same_size_other_fields(self):
        """A same-size DATA frame with other ids is scanned in full, then cached."""
        scanner = MessageScanner()
        first = encode_data_frame(1, b"SSH", 1, b"ab")
        second = encode_data_frame(2, b"RDP", 3, b"ab")

        scanner.scan(first, 2, len(first))
        result = scanner.scan(second, 2, len(second))

        assert result == (1, 2, False, 8, 10, "RDP", (), 3)
        assert scanner._fields == result

    def test_invalid_after_cached(self):
        """A frame that only looks like the cached one still fails when invalid."""
        scanner = MessageScanner()
        good = bytearray(encode_data_frame(1, b"SSH", 1, b"ab"))
        bad = bytearray(good)
        bad[-1] = 0x80  # the connectionId varint now runs off the end

        scanner.scan(good, 2, len(good))

        with pytest.raises(RemoteProtocolError):
            scanner.scan(bad, 2, len(bad))

    @settings(max_examples=500, deadline=None)
    @given(blob=st.binary(max_size=60), as_bytearray=st.booleans())
    def test_agrees_with_scan_message(self, blob, as_bytearray):
        """Over any run of frames the cached scanner returns what scan_message returns."""
        scanner = MessageScanner()
        frames = scanner_frames(blob)

        for body in frames:
            data = bytearray(b"xx" + body) if as_bytearray else b"xx" + body
            try:
                expected = scan_message(data, 2, len(data))
            except RemoteProtocolError:
                with pytest.raises(RemoteProtocolError):
                    scanner.scan(data, 2, len(data))
            else:
                assert scanner.scan(data, 2, len(data)) == expected


class TestEncodeMessage:
    @pytest.mark.parametrize(
        "msg",
        [
            Message(DATA, stream_id=INT32_MAX + 1),
            Message(DATA, connection_id=-1),
            Message(DATA, connection_id=UINT32_MAX + 1),
            Message(2**31),
        ],
    )
    def test_out_of_range(self, msg):
        """Out-of-range fields raise LocalProtocolError, not a protobuf error."""
        with pytest.raises(LocalProtocolError):
            encode_message(msg)

    @settings(max_examples=300, deadline=None)
    @given(
        mtype=st.integers(-(2**31), 2**31 - 1),
        stream_id=st.integers(-(2**31), 2**31 - 1),
        ignorable=st.booleans(),
        payload=st.binary(max_size=20),
        service_id=st.text(max_size=5),
        available=st.lists(st.text(max_size=4), max_size=3).map(tuple),
        connection_id=st.integers(0, UINT32_MAX),
    )
    def test_round_trip(
        self, mtype, stream_id, ignorable, payload, service_id, available, connection_id
    ):
        """decode_message(encode_message(m)) == m, and the bytes are protobuf's own."""
        msg = Message(
            type=MessageType(mtype) if 0 <= mtype <= 7 else mtype,
            stream_id=stream_id,
            ignorable=ignorable,
            payload=payload,
            service_id=service_id,
            available_service_ids=available,
            connection_id=connection_id,
        )
        oracle = message_pb2.Message(
            type=mtype,
            streamId=stream_id,
            ignorable=ignorable,
            payload=payload,
            serviceId=service_id,
            availableServiceIds=available,
            connectionId=connection_id,
        ).SerializeToString()

        body = encode_message(msg)

        assert body == oracle
        assert decode_message(body) == msg

    def test_unencodable_string(self):
        """A lone surrogate in a service id is a LocalProtocolError."""
        with pytest.raises(LocalProtocolError, match="cannot encode"):
            encode_message(Message(DATA, stream_id=1, service_id="\ud800"))


class TestEncodeDataFrame:
    @settings(max_examples=300, deadline=None)
    @given(
        stream_id=st.integers(1, INT32_MAX),
        service_id=st.text(max_size=8),
        connection_id=st.integers(0, UINT32_MAX),
        payload=st.binary(max_size=300) | st.integers(0, 70000).map(bytes),
    )
    def test_equals_protobuf(self, stream_id, service_id, connection_id, payload):
        """The hand-written DATA encoder produces protobuf's bytes, prefix included."""
        body = message_pb2.Message(
            type=int(DATA),
            streamId=stream_id,
            payload=payload,
            serviceId=service_id,
            connectionId=connection_id,
        ).SerializeToString()

        if len(body) > 65535:
            with pytest.raises(LocalProtocolError):
                encode_data_frame(stream_id, service_id.encode(), connection_id, payload)
        else:
            assert encode_data_frame(
                stream_id, service_id.encode(), connection_id, payload
            ) == encode_frame(body)

    def test_empty_payload(self):
        """An empty payload is omitted, as protobuf omits empty fields."""
        framed = encode_data_frame(1, b"", 0, b"")

        assert framed == bytes.fromhex("00 04 08 01 10 01")

    def test_too_large(self):
        """A frame over the 2-byte prefix raises LocalProtocolError."""
        with pytest.raises(LocalProtocolError, match="too large"):
            encode_data_frame(1, b"SSH", 1, bytes(65530))

    def test_memoryview_payload(self):
        """A memoryview slice is encoded without conversion by the caller."""
        data = memoryview(b"xxhixx")[2:4]

        assert encode_data_frame(1, b"", 0, data) == bytes.fromhex("00 08 08 01 10 01 22 02 68 69")


class TestEnums:
    def test_subprotocols(self):
        """Each version maps to its Sec-WebSocket-Protocol value and back."""
        names = [v.subprotocol for v in ProtocolVersion]

        assert names == [
            "aws.iot.securetunneling-1.0",
            "aws.iot.securetunneling-2.0",
            "aws.iot.securetunneling-3.0",
        ]
        assert [ProtocolVersion.from_subprotocol(n) for n in names] == [V1, ProtocolVersion.V2, V3]

    def test_unknown_subprotocol(self):
        """An unsupported subprotocol raises ValueError."""
        with pytest.raises(ValueError, match="unsupported"):
            ProtocolVersion.from_subprotocol("aws.iot.securetunneling-4.0")

    def test_message_type_values(self):
        """MessageType values are the docs/protocol.md §5.3 ones."""
        values = {m.name: m.value for m in MessageType}

        assert values == {
            "UNKNOWN": 0,
            "DATA": 1,
            "STREAM_START": 2,
            "STREAM_RESET": 3,
            "SESSION_RESET": 4,
            "SERVICE_IDS": 5,
            "CONNECTION_START": 6,
            "CONNECTION_RESET": 7,
        }


class TestGeneratedCode:
    def test_regenerated_code_is_identical(self, tmp_path):
        """`make proto` output equals the committed _pb files (no drift from message.proto)."""
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                "-Iagent/protocol",
                f"--python_out={tmp_path}",
                f"--pyi_out={tmp_path}",
                "agent/protocol/message.proto",
            ],
            cwd=ROOT,
            check=True,
        )
        committed = ROOT / "agent" / "protocol" / "_pb"

        for name in ("message_pb2.py", "message_pb2.pyi"):
            assert filecmp.cmp(tmp_path / name, committed / name, shallow=False), name

    def test_gencode_version_accepted_by_runtime(self):
        """The gencode version check passes with the installed protobuf runtime."""
        source = (ROOT / "agent" / "protocol" / "_pb" / "message_pb2.py").read_text()
        marker = "# Protobuf Python Version: "
        gencode = next(line for line in source.splitlines() if line.startswith(marker))
        major, minor, patch = (int(p) for p in gencode.removeprefix(marker).split("."))

        runtime_version.ValidateProtobufRuntimeVersion(
            runtime_version.Domain.PUBLIC, major, minor, patch, "", "message.proto"
        )
        assert (major, minor) <= (runtime_version.MAJOR, runtime_version.MINOR)

    def test_schema(self):
        """The generated descriptor has the 7 fields of docs/protocol.md §5.3 with their numbers."""
        fields = {f.name: (f.number, f.type) for f in message_pb2.Message.DESCRIPTOR.fields}
        fd = message_pb2.Message.DESCRIPTOR.fields[0]

        assert message_pb2.DESCRIPTOR.package == "com.amazonaws.iot.securedtunneling"
        assert fields == {
            "type": (1, fd.TYPE_ENUM),
            "streamId": (2, fd.TYPE_INT32),
            "ignorable": (3, fd.TYPE_BOOL),
            "payload": (4, fd.TYPE_BYTES),
            "serviceId": (5, fd.TYPE_STRING),
            "availableServiceIds": (6, fd.TYPE_STRING),
            "connectionId": (7, fd.TYPE_UINT32),
        }
