"""
Server-side TLS over a plain asyncio stream, driven through memory BIOs.

asyncio's own TLS drops the connection as soon as a server-side handshake fails, before
OpenSSL's alert has left: a client without a certificate then sees a reset, not the
"certificate required" alert a TLS server (mosquitto, AWS IoT) sends, and reports a socket
error instead of a TLS one. Driving :class:`ssl.SSLObject` by hand lets every alert out first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

from cryptography import x509
from cryptography.x509.oid import NameOID


__all__ = ["ServerTls"]

_CHUNK = 64 * 1024


class ServerTls:
    """
    The server side of one TLS connection on an accepted asyncio stream.

    Args:
        context: Server context (certificate, client verification).
        reader: The accepted connection's reader.
        writer: The accepted connection's writer.
    """

    def __init__(
        self, context: ssl.SSLContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """
        Wrap the stream; nothing is exchanged before :meth:`handshake`.
        """
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._reader = reader
        self._writer = writer
        self._buffer = bytearray()

    async def handshake(self) -> None:
        """
        Run the TLS handshake.

        Raises:
            ssl.SSLError: The handshake failed; the alert has been sent.
            ConnectionError: The peer closed the connection first.
        """
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionResetError("closed during the TLS handshake") from None
                continue
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    await self._flush()
                raise
            await self._flush()
            return

    def common_name(self) -> str | None:
        """
        The subject CN of the verified peer certificate, if any.
        """
        der = self._tls.getpeercert(binary_form=True)
        if der is None:
            return None
        names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(
            NameOID.COMMON_NAME
        )
        return str(names[0].value) if names else None

    async def read(self, size: int = _CHUNK) -> bytes:
        """
        Return up to ``size`` decrypted bytes; ``b""`` once the peer has closed.

        Raises:
            ssl.SSLError: The peer sent something that is not valid TLS.
        """
        if self._buffer:
            data = bytes(self._buffer[:size])
            del self._buffer[:size]
            return data
        return await self._decrypt(size)

    async def readexactly(self, size: int) -> bytes:
        """
        Return exactly ``size`` decrypted bytes; what comes after waits for :meth:`read`.

        Raises:
            asyncio.IncompleteReadError: The peer closed first.
            ssl.SSLError: The peer sent something that is not valid TLS.
        """
        while len(self._buffer) < size:
            chunk = await self._decrypt(_CHUNK)
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(self._buffer), size)
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def _decrypt(self, size: int) -> bytes:
        while True:
            try:
                return self._tls.read(size)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    async def write(self, data: bytes) -> None:
        """
        Encrypt and send ``data``.
        """
        self._tls.write(data)
        await self._flush()

    async def _flush(self) -> None:
        data = self._outgoing.read()
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _fill(self) -> bool:
        data = await self._reader.read(_CHUNK)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True
