"""
The relay's door: accepting connections, with a deadline and limits until they upgrade.

A connection is unauthenticated from the TCP accept until its WebSocket upgrade is accepted. The
TLS handshake and the upgrade request together must fit in one deadline, or the connection is
aborted. Per source address, connections beyond the limit are refused at once, before any TLS
work. At the relay-wide limit the oldest unauthenticated connection makes room for the new one:
refusing instead would let a flood from many addresses keep every real client out until the
deadline, while dropping the oldest only costs a flood its own connections. Upgraded tunnel
connections count for nothing here.

The door accepts sockets itself and starts TLS on those it lets in
(``loop.connect_accepted_socket``): an asyncio server's protocol learns the peer's address only
after the TLS handshake, too late to refuse a connection before spending TLS on it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Coroutine
    from typing import Any

    from agent.ws.buffered import BufferedWebSocket


__all__ = [
    "HANDSHAKE_TIMEOUT",
    "MAX_UNAUTHENTICATED",
    "MAX_UNAUTHENTICATED_PER_IP",
    "Admission",
    "Ticket",
]

log = logging.getLogger("agent.emulator.relay")

# Seconds from the TCP accept to an accepted WebSocket upgrade (TLS handshake included).
HANDSHAKE_TIMEOUT = 10.0
MAX_UNAUTHENTICATED = 256
MAX_UNAUTHENTICATED_PER_IP = 64
# Listen backlog, as asyncio's servers have it.
_BACKLOG = 100
# Seconds to wait after accept() failed for want of resources (file descriptors, say).
_ACCEPT_RETRY_DELAY = 1.0
# Seconds between two warnings about refused or dropped connections; the rest are counted.
_WARN_INTERVAL = 5.0


class Ticket:
    """
    One unauthenticated connection's place: its deadline, and how to drop it.

    ``release`` gives the place back (upgrade accepted, or connection gone); it may be called any
    number of times.
    """

    __slots__ = ("_admission", "_timer", "address", "protocol", "sock", "task")

    def __init__(self, admission: Admission, address: str, sock: socket.socket) -> None:
        """
        Take a place and start the deadline.
        """
        self._admission = admission
        self.address = address
        self.sock = sock
        # The relay's protocol (made when TLS starts) and the task that connects it.
        self.protocol: BufferedWebSocket | None = None
        self.task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            admission.timeout, self._expire
        )

    @property
    def pending(self) -> bool:
        """
        Whether the connection still holds its place.
        """
        return self._timer is not None

    def remaining(self) -> float:
        """
        Seconds left before the deadline (a little at least: ``ssl_handshake_timeout`` > 0).
        """
        if self._timer is None:
            return self._admission.timeout
        return max(self._timer.when() - asyncio.get_running_loop().time(), 0.001)

    def release(self) -> None:
        """
        Give the place back and stop the deadline.
        """
        # The protocol holds the ticket: without this, each connection would be a reference
        # cycle, its buffers freed only when the garbage collector next runs.
        self.protocol = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._admission.released(self)

    def abort(self) -> None:
        """
        Drop the connection without a word (during TLS: end the handshake), give the place back.
        """
        protocol = self.protocol
        self.release()
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()
        elif self.task is not None:
            # Still in the TLS handshake: cancelling it aborts the socket.
            self.task.cancel()
            if protocol is None:
                self.sock.close()  # the task has not started: the loop never had the socket

    def _expire(self) -> None:
        log.debug("handshake deadline passed address=%s", self.address)
        self._admission.expired += 1
        self.abort()


class Admission:
    """
    Accepts the relay's TCP connections, starts TLS, and hands each one to a relay protocol.

    Args:
        connected: Makes the protocol of an admitted connection; it calls ``release`` on the
            ticket when the upgrade is accepted and when the connection is lost.
        failed: Called when an admitted connection ends before reaching its protocol (its TLS
            handshake failed or ran out of time).
        ssl_context: Server TLS context; None for plain TCP.
        timeout: Seconds for the TLS handshake plus the upgrade request.
        max_total: Unauthenticated connections at once, all addresses together.
        max_per_ip: Unauthenticated connections at once from one source address.

    Raises:
        ValueError: A limit below 1 or a timeout that is not positive.
    """

    def __init__(  # noqa: PLR0913 - keyword-only knobs with defaults
        self,
        connected: Callable[[Ticket], BufferedWebSocket],
        *,
        failed: Callable[[], None] = lambda: None,
        ssl_context: ssl.SSLContext | None,
        timeout: float = HANDSHAKE_TIMEOUT,
        max_total: int = MAX_UNAUTHENTICATED,
        max_per_ip: int = MAX_UNAUTHENTICATED_PER_IP,
    ) -> None:
        """
        Prepare (no event loop needed yet); ``listen`` starts accepting.
        """
        if not 0 < timeout < math.inf:
            raise ValueError("the handshake timeout must be a positive number of seconds")
        if max_total < 1 or max_per_ip < 1:
            raise ValueError("connection limits must be at least 1")
        self.connected = connected
        self.failed = failed
        self.ssl_context = ssl_context
        self.timeout = timeout
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self._sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        # Insertion order is age order: the first ticket is the oldest.
        self._tickets: dict[Ticket, None] = {}
        self._per_ip: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Counters, for logs and tests.
        self.refused = 0
        self.dropped = 0
        self.expired = 0
        self._warned_at = -_WARN_INTERVAL
        self._unwarned = 0

    @property
    def pending(self) -> int:
        """
        Unauthenticated connections now.
        """
        return len(self._tickets)

    async def listen(self, host: str, port: int) -> int:
        """
        Listen on every address of ``host``, as ``loop.create_server`` does, and start accepting.

        Returns:
            The port of the first address (the one picked, if ``port`` was 0).

        Raises:
            OSError: An address could not be bound.
        """
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        try:
            for family, kind, proto, _, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(_BACKLOG)
                sock.setblocking(False)  # noqa: FBT003 - the socket API
        except OSError:
            self._close_sockets()
            raise
        self._accepting = [self._spawn(self._accept(sock)) for sock in self._sockets]
        return int(self._sockets[0].getsockname()[1])

    async def close(self) -> None:
        """
        Stop accepting, abort every unauthenticated connection and wait for their tasks.
        """
        for task in self._accepting:
            task.cancel()  # before the socket closes: the loop still watches it
        self._close_sockets()
        for ticket in list(self._tickets):
            ticket.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)

    def released(self, ticket: Ticket) -> None:
        """
        Forget a ticket (``Ticket.release`` calls this once).
        """
        del self._tickets[ticket]
        left = self._per_ip[ticket.address] - 1
        if left:
            self._per_ip[ticket.address] = left
        else:
            del self._per_ip[ticket.address]

    def _admit(self, address: str, sock: socket.socket) -> Ticket | None:
        """
        Give a new connection a place, making room if need be; None if its address has no room.
        """
        if self._per_ip.get(address, 0) >= self.max_per_ip:
            self.refused += 1
            self._warn("refused", address)
            return None
        if len(self._tickets) >= self.max_total:
            oldest = next(iter(self._tickets))
            self.dropped += 1
            self._warn("dropped the oldest for", address)
            oldest.abort()
        ticket = Ticket(self, address, sock)
        self._tickets[ticket] = None
        self._per_ip[address] = self._per_ip.get(address, 0) + 1
        return ticket

    async def _accept(self, sock: socket.socket) -> None:
        """
        Accept connections on ``sock`` until it closes; refused ones are closed at once.
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except (ConnectionAbortedError, InterruptedError):
                continue
            except OSError as exc:
                log.warning("accept failed error=%s; retrying", exc)
                await asyncio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            address = str(peer[0]) if isinstance(peer, tuple) else str(peer)
            ticket = self._admit(address, conn)
            if ticket is None:
                conn.close()
            else:
                ticket.task = self._spawn(self._connect(ticket))
            # Let the connections already in run between two accepts.
            await asyncio.sleep(0)

    async def _connect(self, ticket: Ticket) -> None:
        """
        Run the TLS handshake, if any, and give the connection to a relay protocol.
        """

        def protocol() -> BufferedWebSocket:
            ticket.protocol = self.connected(ticket)
            return ticket.protocol

        loop = asyncio.get_running_loop()
        try:
            if self.ssl_context is None:
                await loop.connect_accepted_socket(protocol, ticket.sock)
            else:
                await loop.connect_accepted_socket(
                    protocol,
                    ticket.sock,
                    ssl=self.ssl_context,
                    ssl_handshake_timeout=ticket.remaining(),
                )
        except OSError as exc:
            # A failed handshake: the loop closed the socket.
            log.debug("TLS handshake failed address=%s error=%r", ticket.address, exc)
            ticket.release()
            self.failed()
        except asyncio.CancelledError:
            # The deadline, or the relay closing: the loop aborted the socket.
            ticket.release()
            self.failed()
            raise
        finally:
            ticket.task = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def _warn(self, what: str, address: str) -> None:
        """
        Warn about a refused or dropped connection, at most once per interval.
        """
        self._unwarned += 1
        now = asyncio.get_running_loop().time()
        if now - self._warned_at >= _WARN_INTERVAL:
            log.warning(
                "unauthenticated connection limit reached: %s address=%s connections=%d "
                "(per-ip limit %d, relay limit %d)",
                what,
                address,
                self._unwarned,
                self.max_per_ip,
                self.max_total,
            )
            self._warned_at = now
            self._unwarned = 0
