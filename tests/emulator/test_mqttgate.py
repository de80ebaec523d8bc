"""Tests for agent.emulator.mqttgate: CONNECT parsing, the client-id rule, forwarding."""

from __future__ import annotations

import asyncio
import ssl

import pytest
import structlog.testing

from agent.emulator.mqttgate import (
    CONNACK_NOT_AUTHORIZED_V3,
    CONNACK_NOT_AUTHORIZED_V5,
    ConnectGate,
    MalformedConnect,
    allowed,
    parse_connect,
)
from agent.emulator.pki import PRIVILEGED_IDENTITY
from tests.emulator import fixtures
from tests.emulator.fixtures import SCALE


mqtt_pki = fixtures.mqtt_pki


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def connect_packet(client_id: str, *, level: int = 4, properties: bytes = b"") -> bytes:
    """An MQTT CONNECT with clean start, keep alive 60 and ``client_id``."""
    name = b"MQIsdp" if level == 3 else b"MQTT"
    header = len(name).to_bytes(2, "big") + name + bytes([level, 0x02]) + (60).to_bytes(2, "big")
    if level == 5:
        header += _varint(len(properties)) + properties
    identifier = client_id.encode()
    body = header + len(identifier).to_bytes(2, "big") + identifier
    return b"\x10" + _varint(len(body)) + body


class TestParseConnect:
    @pytest.mark.parametrize("level", [3, 4, 5])
    def test_levels(self, level):
        """MQTT 3.1, 3.1.1 and 5 CONNECTs give their level and client id."""
        packet = connect_packet("dev1", level=level)

        request = parse_connect(packet)

        assert (request.protocol_level, request.client_id, request.packet) == (
            level,
            "dev1",
            packet,
        )

    def test_v5_properties_are_skipped(self):
        """Properties before the payload (session expiry, receive maximum) are stepped over."""
        properties = b"\x11\x00\x00\x0e\x10" + b"\x21\x00\x0a"
        packet = connect_packet("thing:1_a-b", level=5, properties=properties)

        assert parse_connect(packet).client_id == "thing:1_a-b"

    def test_long_client_id_and_remaining_length(self):
        """A two-byte remaining length and a long UTF-8 client id parse."""
        packet = connect_packet("é" * 100)

        assert parse_connect(packet).client_id == "é" * 100

    @pytest.mark.parametrize(
        ("packet", "reason"),
        [
            (b"", "not a CONNECT"),
            (b"\x30\x02\x00\x00", "not a CONNECT"),
            (connect_packet("a")[:-1], "does not match"),
            (connect_packet("a") + b"x", "does not match"),
            (b"\x10\xff\xff\xff\xff\x01", "over 4 bytes"),
            (b"\x10\x06\x00\x04MQTT", "truncated variable header"),
            (connect_packet("a").replace(b"MQTT", b"MQTX"), "unsupported protocol"),
            (connect_packet("a", level=5).replace(b"MQTT\x05", b"MQTT\x06"), "unsupported"),
            (connect_packet("ab").replace(b"\x00\x02ab", b"\x00\x02\xff\xfe"), "UTF-8"),
        ],
    )
    def test_malformed(self, packet, reason):
        """Anything but a complete, known CONNECT is refused with the reason."""
        with pytest.raises(MalformedConnect, match=reason):
            parse_connect(packet)


class TestAllowed:
    @pytest.mark.parametrize(
        ("identity", "client_id", "expected"),
        [
            ("dev1", "dev1", True),
            ("dev1", "dev2", False),
            ("dev1", "DEV1", False),
            ("dev1", "", False),
            ("dev1", "dev1-suffix", False),
            (PRIVILEGED_IDENTITY, "anything", True),
            (PRIVILEGED_IDENTITY, "", True),
        ],
    )
    def test_rule(self, identity, client_id, expected):
        """A thing connects under its own name only; the emulator's identity under any id."""
        assert allowed(identity, client_id) is expected


class Backend:
    """A TLS server standing in for mosquitto: records bytes, answers a CONNACK, echoes."""

    def __init__(self, pki) -> None:
        self.received = bytearray()
        self.identities: list[str | None] = []
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(pki.server.cert, pki.server.key)
        self._context.verify_mode = ssl.CERT_REQUIRED
        self._context.load_verify_locations(cafile=str(pki.ca_file))
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._context)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        subject = dict(rdn[0] for rdn in writer.get_extra_info("peercert")["subject"])
        self.identities.append(subject.get("commonName"))
        first = True
        while data := await reader.read(65536):
            self.received += data
            writer.write(b"\x20\x02\x00\x00" if first else data)
            first = False
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def gate(mqtt_pki):
    backend = Backend(mqtt_pki)
    port = await backend.start()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(mqtt_pki.server.cert, mqtt_pki.server.key)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cafile=str(mqtt_pki.ca_file))

    async def identity_context(name: str) -> ssl.SSLContext:
        # The real broker issues a gate certificate per name; the stand-in reuses the thing's.
        pair = mqtt_pki.admin if name == PRIVILEGED_IDENTITY else mqtt_pki.thing(name)
        context = ssl.create_default_context(cafile=str(mqtt_pki.ca_file))
        context.check_hostname = False
        context.load_cert_chain(pair.cert, pair.key)
        return context

    instance = ConnectGate(
        host="127.0.0.1",
        port=0,
        server=server,
        backend=("127.0.0.1", port),
        identity_context=identity_context,
        handshake_timeout=5 * SCALE,
    )
    await instance.start()
    instance.stand_in = backend
    try:
        yield instance
    finally:
        await instance.close()
        await backend.close()


async def _open(gate, pki, name):
    pair = pki.admin if name == PRIVILEGED_IDENTITY else pki.thing(name)
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    context.load_cert_chain(pair.cert, pair.key)
    return await asyncio.open_connection("127.0.0.1", gate.port, ssl=context)


async def _read_all(reader) -> bytes:
    async with asyncio.timeout(5 * SCALE):
        return await reader.read()


class TestGate:
    @pytest.mark.parametrize(
        ("level", "refusal"),
        [
            (3, CONNACK_NOT_AUTHORIZED_V3),
            (4, CONNACK_NOT_AUTHORIZED_V3),
            (5, CONNACK_NOT_AUTHORIZED_V5),
        ],
    )
    async def test_refusal_bytes_and_close(self, gate, mqtt_pki, level, refusal):
        """Another thing's client id gets its version's CONNACK refusal, then EOF."""
        reader, writer = await _open(gate, mqtt_pki, "thing2")
        with structlog.testing.capture_logs() as logs:
            writer.write(connect_packet("thing1", level=level))
            answer = await _read_all(reader)
        writer.close()

        assert answer == refusal
        assert gate.stand_in.identities == []
        assert [(e["event"], e["identity"], e["client_id"]) for e in logs] == [
            ("mqtt_connect_refused", "thing2", "thing1")
        ]

    async def test_forwards_bytes_both_ways_as_the_same_identity(self, gate, mqtt_pki):
        """An allowed CONNECT and what follows it in the same write reach the backend unchanged."""
        reader, writer = await _open(gate, mqtt_pki, "thing1")
        packet = connect_packet("thing1", level=5)
        writer.write(packet + b"\x82rest-of-stream")
        async with asyncio.timeout(5 * SCALE):
            connack = await reader.readexactly(4)
            writer.write(b"ping")
            echoed = await reader.readexactly(len(b"\x82rest-of-stream" + b"ping"))
        writer.close()

        assert connack == b"\x20\x02\x00\x00"
        assert echoed == b"\x82rest-of-stream" + b"ping"
        assert bytes(gate.stand_in.received) == packet + b"\x82rest-of-stream" + b"ping"
        assert gate.stand_in.identities == ["thing1"]

    async def test_not_a_connect_is_dropped(self, gate, mqtt_pki):
        """A first packet that is not a CONNECT closes the connection without an answer."""
        reader, writer = await _open(gate, mqtt_pki, "thing1")
        with structlog.testing.capture_logs() as logs:
            writer.write(b"\x30\x05\x00\x01tabc")
            answer = await _read_all(reader)
        writer.close()

        assert answer == b""
        assert [e["event"] for e in logs] == ["mqtt_gate_dropped"]

    async def test_close_ends_forwarded_connections(self, gate, mqtt_pki):
        """Closing the gate ends a live forwarded connection (the device sees EOF)."""
        reader, writer = await _open(gate, mqtt_pki, "thing1")
        writer.write(connect_packet("thing1"))
        async with asyncio.timeout(5 * SCALE):
            await reader.readexactly(4)

        await gate.close()
        try:
            rest = await _read_all(reader)
        except ConnectionResetError:
            rest = b""
        writer.close()

        assert rest == b""

    async def test_backend_unreachable(self, gate, mqtt_pki):
        """With mosquitto gone, an allowed client is disconnected and a warning logged."""
        await gate.stand_in.close()
        reader, writer = await _open(gate, mqtt_pki, "thing1")
        with structlog.testing.capture_logs() as logs:
            writer.write(connect_packet("thing1"))
            answer = await _read_all(reader)
        writer.close()

        assert answer == b""
        assert [e["event"] for e in logs] == ["mqtt_gate_backend_unreachable"]
