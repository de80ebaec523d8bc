"""
The emulator's data plane: the WebSocket relay between a tunnel's source and destination.

Per tunnel, at most one live WebSocket per mode. Every valid tunnel frame goes to the other
mode byte for byte (docs/protocol.md §7.3); the relay checks fields with ``TunnelProtocol`` in
the SERVICE role and never rewrites them. Only WebSocket message boundaries may change: DATA
frames are grouped, every other frame travels alone (docs/protocol.md §5.7). Backpressure
crosses the relay: when one peer's socket is full, the relay stops reading the other.
Connections that have not upgraded yet get a deadline and limits
(:mod:`agent.emulator.admission`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from websockets.frames import Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from agent.emulator.admission import (
    HANDSHAKE_TIMEOUT,
    MAX_UNAUTHENTICATED,
    MAX_UNAUTHENTICATED_PER_IP,
    Admission,
    Ticket,
)
from agent.emulator.store import HandshakeRejected, StoreEvent, TunnelStore
from agent.emulator.trim import Trimmer
from agent.protocol import (
    MAX_WS_MESSAGE_SIZE,
    Mode,
    ProtocolFailed,
    ProtocolVersion,
    Side,
    StreamTable,
    TunnelProtocol,
)
from agent.ws.buffered import CLOSE_TIMEOUT, BufferedWebSocket


if TYPE_CHECKING:
    import ssl
    from collections.abc import Sequence

    from websockets.frames import Frame
    from websockets.http11 import Request


__all__ = ["Relay"]

log = logging.getLogger("agent.emulator.relay")
_ws_log = logging.getLogger("agent.emulator.relay.websocket")
_ws_log.setLevel(logging.WARNING)  # websockets logs request headers (tokens) at DEBUG

CLIENT_TOKEN = re.compile(r"[a-zA-Z0-9-]{32,128}")
MAX_REQUEST_SIZE = 4096
WRITE_HIGH_WATER = 512 * 1024
_SUPPORTED = {version.subprotocol: version for version in ProtocolVersion}


def _select_subprotocol(
    protocol: ServerProtocol, subprotocols: Sequence[Subprotocol]
) -> Subprotocol | None:
    """
    Pick the highest version both sides support (a choice, docs/protocol.md §3.2).
    """
    offered = [
        _SUPPORTED[name]
        for name in subprotocols
        if name in _SUPPORTED and name in (protocol.available_subprotocols or ())
    ]
    return Subprotocol(max(offered).subprotocol) if offered else None


class _TunnelPair:
    """
    One tunnel's two WebSockets and the stream table they share.
    """

    def __init__(self, tunnel_id: str) -> None:
        self.tunnel_id = tunnel_id
        self.peers: dict[Mode, _Peer] = {}
        self.streams = StreamTable()

    def other(self, peer: _Peer) -> _Peer | None:
        assert peer.mode is not None  # noqa: S101 - only attached peers ask
        return self.peers.get(Mode.DESTINATION if peer.mode is Mode.SOURCE else Mode.SOURCE)


class _Peer(BufferedWebSocket):
    """
    The relay's end of one client WebSocket.
    """

    ws: ServerProtocol

    def __init__(self, relay: Relay, ticket: Ticket) -> None:
        ws = ServerProtocol(
            subprotocols=[Subprotocol(v.subprotocol) for v in relay.versions],
            select_subprotocol=_select_subprotocol,
            max_size=MAX_WS_MESSAGE_SIZE,
            logger=_ws_log,
        )
        # The tunnel core comes with the handshake.
        super().__init__(ws, None, max_size=MAX_WS_MESSAGE_SIZE, high_water=WRITE_HIGH_WATER)
        self.relay = relay
        # The connection's place among the unauthenticated ones, until the upgrade is accepted.
        self.ticket = ticket
        self.id = next(relay.ids)
        self.session: _TunnelPair | None = None
        self.mode: Mode | None = None
        self._blocked: _Peer | None = None

    # BufferedWebSocket hooks

    def _connected(self) -> None:
        self.relay.peers.add(self)

    def _frame_received(self, frame: Frame) -> None:
        if frame.opcode is Opcode.TEXT:
            self.ws.fail(1003, "binary frames only")

    def _messages_received(self, tunnel: TunnelProtocol) -> None:
        """
        Close on a protocol violation (docs/protocol.md §6.11), and forward the valid frames.
        """
        for event in tunnel.events_received():
            if isinstance(event, ProtocolFailed):
                log.warning(
                    "peer violated the protocol tunnel=%s mode=%s code=%d reason=%s",
                    self.session.tunnel_id if self.session else "-",
                    tunnel.mode.query,
                    event.code,
                    event.reason,
                )
                if self.ws.state is State.OPEN:
                    self.ws.fail(event.code, event.reason)
                    self._ws_dirty = True
        messages = tunnel.messages_to_forward()
        if messages:
            self._forward(messages)

    def _disconnected(self, exc: Exception | None) -> None:  # noqa: ARG002
        self.ticket.release()
        # A lost TLS transport still holds our bound methods: without this, each connection
        # would be a reference cycle, its buffers freed only when the garbage collector runs.
        self.transport = None
        self.relay.peer_gone(self)
        if self._blocked is not None:
            self._blocked.resume_reading()
            self._blocked = None
        session = self.session
        if session is not None and self.mode is not None and session.peers.get(self.mode) is self:
            del session.peers[self.mode]
            # The other side is not told (a choice, docs/protocol.md §7.5); only the state changes.
            self.relay.store.set_connected(session.tunnel_id, self.mode.query, connected=False)
            log.info("peer disconnected tunnel=%s mode=%s", session.tunnel_id, self.mode.query)

    def pause_writing(self) -> None:
        # Our client is slow: stop reading the peer that feeds it.
        if self.session is not None:
            other = self.session.other(self)
            if other is not None and other.transport is not None:
                other.transport.pause_reading()
                self._blocked = other

    def resume_writing(self) -> None:
        if self._blocked is not None:
            self._blocked.resume_reading()
            self._blocked = None

    # helpers

    def write_messages(self, messages: list[bytes]) -> None:
        """
        Send what websockets queued (a pong, say) first, then tunnel messages as binary frames.

        DATA frames share WebSocket messages, up to the size limit; any other frame travels
        alone (docs/protocol.md §5.7).
        """
        if self._ws_dirty:
            self._flush_ws()
        if messages and self.ws.state is State.OPEN and self.transport is not None:
            self.transport.writelines(self._writer.frames(messages))

    def _forward(self, messages: list[bytes]) -> None:
        assert self.session is not None  # noqa: S101 - tunnel exists only after attaching
        other = self.session.other(self)
        if other is None or other.ws.state is not State.OPEN:
            # Peer absent: the frame is dropped (a choice, docs/protocol.md §7.4).
            return
        other.write_messages(messages)

    def _reject(self, request: Request, status: int, reason: str) -> None:
        del request
        response = self.ws.reject(status, reason)
        self.ws.send_response(response)
        log.info("handshake rejected status=%d reason=%s", status, reason)
        self._flush_ws()

    def _request_received(self, request: Request) -> None:
        """
        Check the upgrade request (docs/protocol.md §3) and attach to the tunnel's session.
        """
        checked = _check_request(request)
        if isinstance(checked, str):
            self._reject(request, 400, checked)
            return
        mode, token, client_token = checked
        response = self.ws.accept(request)
        subprotocol = self.ws.subprotocol
        if response.status_code != 101 or subprotocol is None:
            # Checked before the token so that a wrong subprotocol does not spend the CAT.
            self._reject(request, 400, "No supported sec-websocket-protocol")
            return
        try:
            tunnel = self.relay.store.authenticate(
                mode=mode.query, token=token, client_token=client_token
            )
        except HandshakeRejected as exc:
            self._reject(request, exc.status, exc.message)
            return
        response.headers["channel-id"] = secrets.token_hex(8)
        self.ws.send_response(response)
        self._flush_ws()
        self.ticket.release()
        session = self.relay.session(tunnel.tunnel_id)
        self.session = session
        self.mode = mode
        self.tunnel = TunnelProtocol(
            Side.SERVICE,
            mode,
            services=tunnel.services,
            version=_SUPPORTED[subprotocol],
            streams=session.streams,
        )
        self.relay.attach(self)


def _check_request(request: Request) -> tuple[Mode, str, str | None] | str:
    """
    Check path, mode, token headers and client-token shape, in that order (docs/protocol.md §3.3).

    Returns:
        (mode, access token, client token), or the plain-text reason of a 400.
    """
    headers = request.headers
    size = len(request.path) + sum(len(k) + len(v) + 4 for k, v in headers.raw_items())
    if size > MAX_REQUEST_SIZE:
        return "Request header fields too large"
    url = urlsplit(request.path)
    if url.path != "/tunnel":
        return "Invalid path"
    modes = parse_qs(url.query).get("local-proxy-mode", [])
    if len(modes) != 1 or modes[0] not in {"source", "destination"}:
        return "Invalid local-proxy-mode"
    cookies = [
        value.strip().removeprefix("awsiot-tunnel-token=")
        for header in headers.get_all("cookie")
        for value in header.split(";")
        if value.strip().startswith("awsiot-tunnel-token=")
    ]
    tokens = headers.get_all("access-token") + cookies
    if len(tokens) != 1 or not tokens[0]:
        return "Invalid access token: exactly one access token is required"
    client_tokens = headers.get_all("client-token")
    if len(client_tokens) > 1 or (client_tokens and not CLIENT_TOKEN.fullmatch(client_tokens[0])):
        return "Invalid client token: malformed client-token header"
    return Mode.parse(modes[0]), tokens[0], client_tokens[0] if client_tokens else None


class Relay:
    """
    The ``wss://HOST:PORT/tunnel`` endpoint of the emulator.
    """

    def __init__(  # noqa: PLR0913 - keyword-only knobs with defaults
        self,
        store: TunnelStore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        versions: Sequence[ProtocolVersion] = tuple(ProtocolVersion),
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
        max_unauthenticated_per_ip: int = MAX_UNAUTHENTICATED_PER_IP,
    ) -> None:
        """
        Prepare the relay; ``start`` listens.

        Args:
            store: The tunnel store that authenticates handshakes and records connection states.
            host: Listen address (loopback by default).
            port: Listen port; 0 picks a free one (see ``port`` after ``start``).
            ssl_context: Server TLS context; None serves plain ``ws://`` (tests only).
            versions: Subprotocol versions accepted (all by default).
            handshake_timeout: Seconds from the TCP accept to an accepted upgrade, TLS
                handshake included; then the connection is aborted.
            max_unauthenticated: Connections not yet upgraded, at once; at the limit the
                oldest is dropped for the new one.
            max_unauthenticated_per_ip: Connections not yet upgraded from one source address,
                at once; beyond it new ones are refused.
        """
        self.store = store
        self.versions = tuple(versions)
        self.host = host
        self.port = port
        # Closed connections leave heap holes; the trimmer gives them back to the system.
        self.trimmer = Trimmer()
        self.admission = Admission(
            lambda ticket: _Peer(self, ticket),
            failed=self.trimmer.closed,
            ssl_context=ssl_context,
            timeout=handshake_timeout,
            max_total=max_unauthenticated,
            max_per_ip=max_unauthenticated_per_ip,
        )
        self.sessions: dict[str, _TunnelPair] = {}
        self.peers: set[_Peer] = set()
        self._all_gone = asyncio.Event()
        self.ids = itertools.count(1)
        store.listeners.append(self._store_changed)

    async def start(self) -> None:
        """
        Listen for WebSocket clients.
        """
        self.port = await self.admission.listen(self.host, self.port)

    async def close(self, *, abort: bool = False) -> None:
        """
        Close every tunnel socket with 1001 and stop listening.

        Args:
            abort: Drop the TCP connections without a close frame instead, as a network loss
                would (docs/protocol.md §7.7): clients with a client token reconnect.
        """
        await self.admission.close()
        for peer in list(self.peers):
            if abort and peer.transport is not None:
                peer.transport.abort()
            else:
                peer.close(1001, "relay shutting down")
        if self.peers:
            self._all_gone.clear()
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT + 0.5):
                    await self._all_gone.wait()
            except TimeoutError:
                pass
        for peer in list(self.peers):
            if peer.transport is not None:
                peer.transport.abort()
        self.trimmer.cancel()
        if self._store_changed in self.store.listeners:
            self.store.listeners.remove(self._store_changed)

    def peer_gone(self, peer: _Peer) -> None:
        """
        Forget a closed connection.
        """
        self.peers.discard(peer)
        self.trimmer.closed()
        if not self.peers:
            self._all_gone.set()

    def session(self, tunnel_id: str) -> _TunnelPair:
        """
        The tunnel's session, created on first use.
        """
        session = self.sessions.get(tunnel_id)
        if session is None:
            session = self.sessions[tunnel_id] = _TunnelPair(tunnel_id)
        return session

    def attach(self, peer: _Peer) -> None:
        """
        Make ``peer`` the live WebSocket of its mode (docs/protocol.md §7.6).
        """
        session, mode, tunnel = peer.session, peer.mode, peer.tunnel
        assert session is not None  # noqa: S101 - set by the handshake
        assert mode is not None  # noqa: S101
        assert tunnel is not None  # noqa: S101
        old = session.peers.get(mode)
        session.peers[mode] = peer
        if old is not None:
            old.close(1000, "replaced by a new connection")
        other = session.other(peer)
        if session.streams.active and other is not None and other.tunnel is not None:
            for service_id, stream_id in list(session.streams.active.items()):
                other.tunnel.send_stream_reset(service_id, stream_id)
            other.flush()
        session.streams.clear()
        tunnel.send_service_ids()
        peer.flush()
        self.store.set_connected(session.tunnel_id, mode.query, connected=True)
        log.info(
            "peer connected tunnel=%s mode=%s subprotocol=%s replaced=%s",
            session.tunnel_id,
            mode.query,
            peer.ws.subprotocol,
            old is not None,
        )

    def _store_changed(self, event: StoreEvent) -> None:
        session = self.sessions.get(event.tunnel.tunnel_id)
        if session is None:
            return
        if event.kind == "closed":
            del self.sessions[event.tunnel.tunnel_id]
            for peer in list(session.peers.values()):
                peer.close(1000, "tunnel closed")
        elif event.kind == "rotated" and not self.store.replace_on_rotate:
            for mode_name in event.modes:
                rotated = session.peers.get(Mode.parse(mode_name))
                if rotated is not None:
                    rotated.close(1000, "access token rotated")
