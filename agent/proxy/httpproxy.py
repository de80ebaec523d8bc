"""
HTTP CONNECT through an outbound proxy (``https_proxy``), as the AWS localproxy supports.
"""

from __future__ import annotations

import asyncio
import base64
import os
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from agent.exceptions import AgentError


__all__ = ["HttpProxy", "ProxyConnectError", "open_tunnel", "proxy_from_environment"]

MAX_RESPONSE_HEAD = 16 * 1024


class ProxyConnectError(AgentError, OSError):
    """
    The outbound proxy refused or botched the CONNECT request.
    """


@dataclass(frozen=True, slots=True)
class HttpProxy:
    """
    An outbound HTTP proxy; credentials stay out of ``repr``.
    """

    host: str
    port: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> HttpProxy:
        """
        Parse ``http://[user:password@]host[:port]`` (a bare ``host:port`` works too).
        """
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in {"http", ""} or not parts.hostname:
            raise ValueError("expected http://[user:password@]host[:port]")
        return cls(
            host=parts.hostname,
            port=parts.port or 80,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


def _bypassed(host: str) -> bool:
    no_proxy = os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or ""
    for raw in no_proxy.split(","):
        entry = raw.strip().lower().lstrip(".")
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return True
    return False


def proxy_from_environment(host: str) -> HttpProxy | None:
    """
    The proxy to reach ``host`` through, from ``https_proxy``/``HTTPS_PROXY`` and ``no_proxy``.
    """
    url = os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")
    if not url or _bypassed(host.lower()):
        return None
    return HttpProxy.parse(url)


class _ConnectResponse(asyncio.Protocol):
    def __init__(self) -> None:
        self.head = bytearray()
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end >= 0 and not self.done.done():
            if len(self.head) > end + 4:
                # The tunnel peer cannot speak before our TLS hello: anything more is a proxy bug.
                self.done.set_exception(ProxyConnectError("proxy sent data after its response"))
            else:
                self.done.set_result(bytes(self.head[:end]))
        elif len(self.head) > MAX_RESPONSE_HEAD and not self.done.done():
            self.done.set_exception(ProxyConnectError("proxy response head too large"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ProxyConnectError(f"proxy closed the connection: {exc or ''}"))


async def open_tunnel(proxy: HttpProxy, host: str, port: int) -> asyncio.Transport:
    """
    Open a TCP connection to ``host:port`` through ``proxy``; returns the raw transport.

    Raises:
        ProxyConnectError: If the proxy does not answer 200.
        OSError: If the proxy cannot be reached.
    """
    loop = asyncio.get_running_loop()
    transport, reader = await loop.create_connection(_ConnectResponse, proxy.host, proxy.port)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.username is not None:
        credentials = f"{proxy.username}:{proxy.password or ''}".encode()
        lines.append(f"Proxy-Authorization: Basic {base64.b64encode(credentials).decode()}")
    transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        head = await reader.done
    except BaseException:
        transport.close()
        raise
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[1] != "200":
        transport.close()
        raise ProxyConnectError(f"proxy refused CONNECT: {status_line}")
    return transport
