"""
The proxy's life: connect, run a WebSocket session, and decide between reconnecting and exiting.

Exit rules follow the AWS localproxy (docs/protocol.md §8): a close frame or a 4xx handshake ends
the proxy with status 0; connection failures and 5xx are retried with backoff; an abrupt drop
reconnects at once with the same token and client token.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from typing import TYPE_CHECKING

from websockets.client import ClientProtocol
from websockets.typing import Subprotocol
from websockets.uri import WebSocketURI

from agent import __version__
from agent.common.retry import backoff
from agent.protocol import (
    MAX_WS_MESSAGE_SIZE,
    SOURCE,
    ProtocolVersion,
    Side,
    TunnelProtocol,
)
from agent.proxy.destination import DestinationBridge
from agent.proxy.httpproxy import ProxyConnectError, open_tunnel, proxy_from_environment
from agent.proxy.source import SourceBridge
from agent.proxy.websocket import HandshakeFailed, TunnelWebSocket


if TYPE_CHECKING:
    from agent.proxy.local import Bridge
    from agent.proxy.options import ProxyOptions


__all__ = ["run_proxy", "ssl_context_for"]

log = logging.getLogger("agent.proxy")
# websockets logs request headers (the access token) at DEBUG: keep its logger above that.
_ws_log = logging.getLogger("agent.proxy.websocket")
_ws_log.setLevel(logging.WARNING)

CONNECT_TIMEOUT = 15.0
STOP_TIMEOUT = 2.0
# A session that lasted this long (seconds) worked: after it drops, reconnect without delay.
STABLE_SESSION = 2.0


# Built contexts by (CA path, verify): a launcher builds one before forking and every
# proxy it forks shares it, copy-on-write (agent/proxy/launcher.py).
_ssl_contexts: dict[tuple[str | None, bool], ssl.SSLContext] = {}


def ssl_context_for(options: ProxyOptions) -> ssl.SSLContext:
    """
    The TLS context for ``options``, built once per CA path and verify flag.
    """
    key = (options.ca_path, options.verify)
    context = _ssl_contexts.get(key)
    if context is None:
        context = _ssl_contexts[key] = _ssl_context(options)
    return context


def _ssl_context(options: ProxyOptions) -> ssl.SSLContext:
    """
    TLS is verified by default; ``-c`` names a CA file or a hashed CA directory.
    """
    if options.ca_path is None:
        context = ssl.create_default_context()
    elif os.path.isdir(options.ca_path):  # noqa: PTH112 - pathlib costs memory (cli.py)
        context = ssl.create_default_context(capath=options.ca_path)
    else:
        context = ssl.create_default_context(cafile=options.ca_path)
    if not options.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _Dialer:
    """
    Builds and opens one WebSocket session.
    """

    def __init__(self, options: ProxyOptions, bridge: Bridge) -> None:
        self.options = options
        self.bridge = bridge
        self.ssl_context = ssl_context_for(options) if options.tls else None
        self.proxy = proxy_from_environment(options.host)
        # Built from its parts, not parsed from a string: the host and port are validated
        # already, and urllib's parser is code each forked proxy would run once more.
        self.uri = WebSocketURI(
            secure=options.tls,
            host=options.host.lower(),
            port=options.port,
            path="/tunnel",
            query=f"local-proxy-mode={options.mode.query}",
        )

    def _connection(self) -> TunnelWebSocket:
        options = self.options
        ws = ClientProtocol(
            self.uri,
            subprotocols=[Subprotocol(ProtocolVersion.V3.subprotocol)],
            max_size=MAX_WS_MESSAGE_SIZE,
            logger=_ws_log,
        )
        request = ws.connect()
        headers = request.headers
        if "User-Agent" in headers:
            del headers["User-Agent"]
        headers["User-Agent"] = f"localproxy iot-tunnel-agent/{__version__}"
        headers["access-token"] = options.token
        if options.client_token:
            headers["client-token"] = options.client_token
        services = tuple(options.source_ports or options.targets)
        tunnel = TunnelProtocol(
            Side.CLIENT,
            options.mode,
            services=services,
            version=options.version if options.mode is SOURCE else ProtocolVersion.V3,
            max_connections=options.max_connections,
        )
        return TunnelWebSocket(
            ws, tunnel, request, self.bridge, ping_interval=options.ping_interval
        )

    async def open(self) -> TunnelWebSocket:
        loop = asyncio.get_running_loop()
        options = self.options
        conn = self._connection()
        async with asyncio.timeout(CONNECT_TIMEOUT):
            if self.proxy is None:
                await loop.create_connection(
                    lambda: conn,
                    options.host,
                    options.port,
                    ssl=self.ssl_context,
                    server_hostname=options.host if self.ssl_context else None,
                )
            else:
                raw = await open_tunnel(self.proxy, options.host, options.port)
                transport = raw
                if self.ssl_context is not None:
                    upgraded = await loop.start_tls(
                        raw, conn, self.ssl_context, server_hostname=options.host
                    )
                    if upgraded is None:
                        raise ProxyConnectError("TLS through the proxy failed")
                    transport = upgraded
                else:
                    raw.set_protocol(conn)
                conn.connection_made(transport)
            try:
                await conn.handshake
            except BaseException:
                if conn.transport is not None:
                    conn.transport.abort()
                raise
        return conn


async def _wait_session(conn: TunnelWebSocket, bridge: Bridge, stop: asyncio.Event) -> str:
    """
    Wait until the session ends, the proxy is asked to stop, or the bridge hits a fatal error.
    """
    stopped: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
    failed: asyncio.Future[object] = asyncio.ensure_future(bridge.fatal_event.wait())
    ended: asyncio.Future[object] = asyncio.shield(conn.ended)
    done, pending = await asyncio.wait(
        {stopped, failed, ended}, return_when=asyncio.FIRST_COMPLETED
    )
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if ended in done:
        return "ended"
    return "stop" if stop.is_set() else "fatal"


async def _close(conn: TunnelWebSocket, code: int, reason: str) -> None:
    conn.close(code, reason)
    try:
        async with asyncio.timeout(STOP_TIMEOUT + 0.5):
            await asyncio.shield(conn.ended)
    except TimeoutError:
        if conn.transport is not None:
            conn.transport.abort()


async def _run_session(conn: TunnelWebSocket, bridge: Bridge, stop: asyncio.Event) -> int | None:
    """
    Carry one WebSocket session to its end.

    Returns:
        The exit status when the proxy should exit, None to reconnect.
    """
    options = bridge.options
    log.info(
        "connected to the tunnel mode=%s subprotocol=%s channel_id=%s",
        options.mode.query,
        conn.ws.subprotocol,
        conn.channel_id or "-",
    )
    if conn.ws.subprotocol == ProtocolVersion.V1.subprotocol and isinstance(bridge, SourceBridge):
        await bridge.start_without_service_ids()
    outcome = await _wait_session(conn, bridge, stop)
    if outcome == "stop":
        await _close(conn, 1000, "")
        return 0
    if outcome == "fatal":
        log.error("%s", bridge.fatal)
        await _close(conn, 1000, "")
        return 1
    end = conn.ended.result()
    if end.close is not None:
        # A close frame of any code ends the proxy (docs/protocol.md §8.3).
        log.info(
            "tunnel closed by the service code=%d reason=%s",
            end.close.code,
            end.close.reason or "-",
        )
        return 0
    log.warning("connection lost (%s), reconnecting", end.error)
    return None


def _attach_reporter(options: ProxyOptions, bridge: Bridge) -> None:
    if options.report_fd is None:
        return
    from agent.proxy.report import ConnectionReporter  # noqa: PLC0415 - only when asked

    try:
        bridge.reporter = ConnectionReporter(options.report_fd)
    except OSError:
        log.warning("report channel fd %d is not usable", options.report_fd)


async def run_proxy(options: ProxyOptions, stop: asyncio.Event) -> int:
    """
    Run the proxy until the tunnel ends or ``stop`` is set.

    Returns:
        The process exit status: 0 when the tunnel ended or the proxy was stopped, 1 when the
        tunnel cannot be used (service map mismatch).
    """
    bridge: SourceBridge | DestinationBridge = (
        SourceBridge(options) if options.mode is SOURCE else DestinationBridge(options)
    )
    _attach_reporter(options, bridge)
    session = _Dialer(options, bridge)
    loop = asyncio.get_running_loop()
    delays = backoff(initial=0.05, maximum=options.reconnect_delay, jitter=0.5)
    try:
        while not stop.is_set():
            try:
                conn = await session.open()
            except HandshakeFailed as exc:
                if not exc.retryable:
                    log.error("tunnel refused the connection: %s", exc)  # noqa: TRY400 - no traceback
                    return 0
                log.warning("handshake failed, retrying: %s", exc)
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                log.warning("cannot reach %s:%d, retrying: %s", options.host, options.port, exc)
            else:
                started = loop.time()
                code = await _run_session(conn, bridge, stop)
                if code is not None:
                    return code
                if loop.time() - started >= STABLE_SESSION:
                    # Reconnect at once after a session that worked; back off if that fails.
                    delays = backoff(initial=0.05, maximum=options.reconnect_delay, jitter=0.5)
                    continue
                # A session that breaks as soon as it opens (a misbehaving service, say) is
                # retried with backoff like a failed connection: no reconnection storm.
            try:
                async with asyncio.timeout(next(delays)):
                    await stop.wait()
            except TimeoutError:
                pass
        return 0
    finally:
        await bridge.close()
        if bridge.reporter is not None:
            bridge.reporter.close()
