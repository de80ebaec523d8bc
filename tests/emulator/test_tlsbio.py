"""Tests for agent.emulator.tlsbio: server-side TLS through memory BIOs, on real sockets."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from agent.emulator.tlsbio import ServerTls
from tests.emulator import fixtures
from tests.emulator.fixtures import SCALE


mqtt_pki = fixtures.mqtt_pki


class Server:
    """Runs ``session`` on each accepted connection wrapped in ServerTls; keeps the outcome."""

    def __init__(self, pki, session) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.server.cert, pki.server.key)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(cafile=str(pki.ca_file))
        self.session = session
        self.outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    async def _serve(self, reader, writer) -> None:
        tls = ServerTls(self.context, reader, writer)
        try:
            self.outcome.set_result(await self.session(tls))
        except Exception as exc:
            self.outcome.set_exception(exc)
        finally:
            writer.close()

    async def __aenter__(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self._server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc_info) -> None:
        self._server.close()
        await self._server.wait_closed()


def _client(pki, pair=None, version=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    if pair is not None:
        context.load_cert_chain(pair.cert, pair.key)
    if version is not None:
        context.maximum_version = version
    return context


class TestServerTls:
    async def test_round_trip(self, mqtt_pki):
        """After the handshake: the peer CN, exact reads, buffered rest, writes, EOF."""

        async def session(tls: ServerTls):
            await tls.handshake()
            head = await tls.readexactly(3)
            rest = await tls.read()
            await tls.write(b"pong:" + head + rest)
            end = await tls.read()
            return tls.common_name(), head, rest, end

        server = Server(mqtt_pki, session)
        async with server as port, asyncio.timeout(10 * SCALE):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=_client(mqtt_pki, mqtt_pki.thing("dev1"))
            )
            writer.write(b"abcdef")
            answer = await reader.readexactly(11)
            writer.close()
            name, head, rest, end = await server.outcome

        assert (name, head, rest, end) == ("dev1", b"abc", b"def", b"")
        assert answer == b"pong:abcdef"

    @pytest.mark.parametrize(
        ("version", "reason"),
        [
            (ssl.TLSVersion.TLSv1_2, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
            (ssl.TLSVersion.TLSv1_3, "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
        ],
    )
    async def test_refusal_sends_the_alert(self, mqtt_pki, version, reason):
        """A client without a certificate receives the TLS alert, not a bare reset."""

        async def session(tls: ServerTls):
            await tls.handshake()

        async def handshake_and_read(port: int) -> bytes:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=_client(mqtt_pki, version=version)
            )
            try:
                return await reader.read(10)  # TLS 1.3 refuses after the client's Finished
            finally:
                writer.transport.abort()

        server = Server(mqtt_pki, session)
        async with server as port, asyncio.timeout(10 * SCALE):
            with pytest.raises(ssl.SSLError) as caught:
                await handshake_and_read(port)
            with pytest.raises(ssl.SSLError) as server_side:
                await server.outcome

        assert caught.value.reason == reason
        assert server_side.value.reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATE")

    async def test_peer_closing_during_handshake(self, mqtt_pki):
        """A peer that leaves mid-handshake is a ConnectionError, not a hang."""

        async def session(tls: ServerTls):
            await tls.handshake()

        server = Server(mqtt_pki, session)
        async with server as port, asyncio.timeout(10 * SCALE):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
            await writer.drain()
            writer.close()
            with pytest.raises(ConnectionError):
                await server.outcome
