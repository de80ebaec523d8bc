"""
The broker's front door: mutual TLS, then the AWS IoT rule "client id = thing name".

AWS IoT Core, with the usual ``iot:Connect`` policy on
``client/${iot:Connection.Thing.ThingName}``, refuses a certificate that connects with
any client id but its own thing's name: CONNACK "not authorized", and the thing already
connected under that id keeps its session. Mosquitto 2.0.11 cannot refuse that: with
``use_identity_as_username`` it skips every authentication check, the dynamic-security
plugin's pinned ``clientid`` included, so a thing could take over another thing's session.

So the gate terminates the device's TLS itself (:mod:`.tlsbio`, so that a refused
handshake still ends with the alert a TLS server sends), reads the CONNECT, and either answers
CONNACK "not authorized" or opens a TLS connection to mosquitto on a loopback port and
forwards the bytes unchanged, both ways. Mosquitto still decides everything else (ACLs,
sessions, CONNACK): it sees the same identity, because the gate connects with a
certificate of the same CN, issued by a CA only the gate holds and only the backend
listener trusts (``identity_context`` gives the TLS context for one CN).

Identities outside the thing-name space (the emulator's own, with a ``.``) may use any
client id: the notifier and the broker administration connect side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from agent.emulator.tlsbio import ServerTls
from agent.exceptions import AgentError
from agent.protocol.ids import THING_NAME


if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable


__all__ = [
    "CONNACK_NOT_AUTHORIZED_V3",
    "CONNACK_NOT_AUTHORIZED_V5",
    "ConnectGate",
    "ConnectRequest",
    "MalformedConnect",
    "allowed",
    "parse_connect",
]

log = structlog.get_logger(__name__)

# CONNACK refusals: MQTT 3.1/3.1.1 return code 5, MQTT 5 reason code 0x87 with no properties.
CONNACK_NOT_AUTHORIZED_V3 = b"\x20\x02\x00\x05"
CONNACK_NOT_AUTHORIZED_V5 = b"\x20\x03\x00\x87\x00"
_CONNECT = 0x10
# A CONNECT holds a client id, credentials and a will: AWS IoT caps whole messages at 128 KB.
_MAX_CONNECT = 256 * 1024
_PROTOCOLS = {(b"MQIsdp", 3), (b"MQTT", 4), (b"MQTT", 5)}
_CHUNK = 64 * 1024


class MalformedConnect(AgentError):
    """
    The first packet is not a CONNECT the gate can read; the connection is dropped.
    """


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """
    What the gate needs from a CONNECT packet.

    Attributes:
        protocol_level: 3 (MQTT 3.1), 4 (3.1.1) or 5.
        client_id: The client identifier, possibly empty.
        packet: The whole packet, forwarded unchanged.
    """

    protocol_level: int
    client_id: str
    packet: bytes


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value = 0
    for index in range(4):
        if offset + index >= len(data):
            raise MalformedConnect("truncated variable byte integer")
        byte = data[offset + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, offset + index + 1
    raise MalformedConnect("variable byte integer over 4 bytes")


def _string(data: bytes, offset: int) -> tuple[bytes, int]:
    if offset + 2 > len(data):
        raise MalformedConnect("truncated string length")
    end = offset + 2 + int.from_bytes(data[offset : offset + 2], "big")
    if end > len(data):
        raise MalformedConnect("truncated string")
    return data[offset + 2 : end], end


def parse_connect(packet: bytes) -> ConnectRequest:
    """
    Read protocol level and client id from one complete CONNECT packet.

    Args:
        packet: Fixed header, remaining length and the rest of the packet.

    Raises:
        MalformedConnect: Not a CONNECT, an unknown protocol, or truncated.
    """
    if not packet or packet[0] != _CONNECT:
        raise MalformedConnect("the first packet is not a CONNECT")
    length, offset = _varint(packet, 1)
    if offset + length != len(packet):
        raise MalformedConnect("remaining length does not match the packet")
    name, offset = _string(packet, offset)
    if offset + 4 > len(packet):
        raise MalformedConnect("truncated variable header")
    level = packet[offset]
    if (name, level) not in _PROTOCOLS:
        raise MalformedConnect(f"unsupported protocol {name!r} level {level}")
    offset += 4  # level, connect flags, keep alive
    if level == 5:
        properties, offset = _varint(packet, offset)
        offset += properties
    client_id, _ = _string(packet, offset)
    try:
        text = client_id.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedConnect("client id is not UTF-8") from None
    return ConnectRequest(level, text, packet)


def allowed(identity: str, client_id: str) -> bool:
    """
    Whether certificate CN ``identity`` may connect with ``client_id``.

    A thing (a CN shaped like a thing name) only under its own name; any other
    identity (the emulator's) under any client id.
    """
    return client_id == identity or not THING_NAME.fullmatch(identity)


async def _read_packet(reader: ServerTls) -> bytes:
    header = await reader.readexactly(1)
    if header[0] != _CONNECT:
        raise MalformedConnect("the first packet is not a CONNECT")
    encoded = b""
    for _ in range(4):
        encoded += await reader.readexactly(1)
        if not encoded[-1] & 0x80:
            break
    length, _ = _varint(encoded, 0)
    if length > _MAX_CONNECT:
        raise MalformedConnect(f"CONNECT of {length} bytes")
    return header + encoded + await reader.readexactly(length)


async def _device_to_broker(device: ServerTls, broker: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):  # ssl.SSLError included
        while data := await device.read(_CHUNK):
            broker.write(data)
            await broker.drain()


async def _broker_to_device(broker: asyncio.StreamReader, device: ServerTls) -> None:
    with contextlib.suppress(OSError):
        while data := await broker.read(_CHUNK):
            await device.write(data)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()


class ConnectGate:
    """
    A TLS listener in front of mosquitto that enforces "client id = thing name".

    Args:
        host: Listen address.
        port: Listen port; 0 picks a free one (see :attr:`port` after :meth:`start`).
        server: TLS context presenting the broker's certificate and requiring a client
            certificate from the emulator CA.
        backend: ``(host, port)`` of mosquitto's loopback listener.
        identity_context: Returns the client TLS context that speaks to the backend as a
            given CN (may issue a certificate on first use).
        handshake_timeout: Seconds for the TLS handshake, then as many for the CONNECT.
    """

    def __init__(  # noqa: PLR0913 - keyword-only listener settings, each documented
        self,
        *,
        host: str,
        port: int,
        server: ssl.SSLContext,
        backend: tuple[str, int],
        identity_context: Callable[[str], Awaitable[ssl.SSLContext]],
        handshake_timeout: float = 10.0,
    ) -> None:
        """
        Record the settings; nothing listens before :meth:`start`.
        """
        self.host = host
        self.port = port
        self._server_context = server
        self._backend = backend
        self._identity_context = identity_context
        self._handshake_timeout = handshake_timeout
        self._server: asyncio.Server | None = None
        # Each device connection's task and writer: closing aborts the writers, and the
        # tasks then end by themselves.
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self) -> None:
        """
        Start listening.

        Raises:
            OSError: The address cannot be bound.
        """
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """
        Stop listening and drop every forwarded connection.
        """
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in self._connections.values():
            writer.transport.abort()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # noqa: S101 - start_server runs each client in a task
        self._connections[task] = writer
        try:
            await self._serve(reader, writer)
        finally:
            del self._connections[task]
            writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        device = ServerTls(self._server_context, reader, writer)
        try:
            async with asyncio.timeout(self._handshake_timeout):
                await device.handshake()
        except ssl.SSLError as exc:
            # The alert went out; a client with no or a foreign certificate ends here.
            log.info("mqtt_tls_refused", reason=exc.reason or str(exc))
            return
        except (OSError, TimeoutError):
            return  # the client went away or stalled: nothing to answer
        try:
            async with asyncio.timeout(self._handshake_timeout):
                connect = parse_connect(await _read_packet(device))
        except MalformedConnect as exc:
            # AWS IoT drops such a connection without a word; so does the gate.
            log.info("mqtt_gate_dropped", reason=str(exc))
            return
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            return
        identity = device.common_name()
        if identity is None or not allowed(identity, connect.client_id):
            log.info(
                "mqtt_connect_refused",
                identity=identity,
                client_id=connect.client_id,
                reason="client id is not the thing name",
            )
            refusal = CONNACK_NOT_AUTHORIZED_V5
            if connect.protocol_level < 5:
                refusal = CONNACK_NOT_AUTHORIZED_V3
            with contextlib.suppress(OSError):
                await device.write(refusal)
            await _close(writer)
            return
        await self._forward(identity, connect, device)

    async def _forward(self, identity: str, connect: ConnectRequest, device: ServerTls) -> None:
        try:
            context = await self._identity_context(identity)
            host, port = self._backend
            up_reader, up_writer = await asyncio.open_connection(host, port, ssl=context)
        except (OSError, ssl.SSLError) as exc:
            log.warning("mqtt_gate_backend_unreachable", identity=identity, error=str(exc))
            return
        try:
            up_writer.write(connect.packet)
            # Whichever side ends first ends both.
            pipes = [
                asyncio.ensure_future(_device_to_broker(device, up_writer)),
                asyncio.ensure_future(_broker_to_device(up_reader, device)),
            ]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        finally:
            up_writer.transport.abort()
