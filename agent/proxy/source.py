"""
The source side: listens on local ports and opens a stream (or a V3 connection) per accepted socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from agent.protocol import LocalProtocolError, ProtocolVersion, ServiceIdsReceived
from agent.proxy.local import Bridge, LocalConnection, reset_transport
from agent.proxy.mapping import MappingError, match_services


if TYPE_CHECKING:
    from agent.proxy.options import ProxyOptions

__all__ = ["SourceBridge"]

log = logging.getLogger("agent.proxy")


class SourceBridge(Bridge):
    """
    Accepts local connections for each mapped service and carries them through the tunnel.
    """

    servers: dict[str, asyncio.Server]

    def __init__(self, options: ProxyOptions) -> None:
        """
        Start with no listener; they open once the tunnel's services are known.
        """
        super().__init__(options)
        self.servers = {}
        self.ports: dict[str, int] = {}
        self.listening = asyncio.Event()
        self._listen_task: asyncio.Task[None] | None = None

    def _on_service_ids(self, event: ServiceIdsReceived) -> None:
        try:
            ports = match_services(self.options.source_ports, event.service_ids)
        except MappingError as exc:
            self.fail(f"service map does not match the tunnel: {exc}")
            return
        if not self.servers and self._listen_task is None:
            self._listen_task = asyncio.get_running_loop().create_task(self._listen(ports))

    async def start_without_service_ids(self) -> None:
        """
        Listen with the map as given (V1 sessions announce no services).
        """
        if not self.servers and self._listen_task is None:
            await self._listen(self.options.source_ports)

    async def _listen(self, ports: dict[str, int]) -> None:
        loop = asyncio.get_running_loop()
        address = self.options.bind_address or "localhost"
        for service, port in ports.items():
            try:
                server = await loop.create_server(
                    lambda service=service: _Accepted(self, service),
                    address,
                    port,
                    family=socket.AF_INET if address == "localhost" else 0,
                    reuse_address=True,
                )
            except OSError as exc:
                self.fail(f"cannot listen on {address}:{port}: {exc}")
                return
            bound = server.sockets[0].getsockname()[1]
            self.servers[service] = server
            self.ports[service] = bound
            # The same words as the AWS localproxy, so scripts can find the port.
            log.info("Listening for new connection on port %d service=%s", bound, service or "-")
        self.listening.set()

    async def close(self) -> None:
        """
        Stop listening.
        """
        for server in self.servers.values():
            server.close()
        for server in self.servers.values():
            await server.wait_closed()
        self.servers.clear()

    def accept(self, service: str) -> LocalConnection | None:
        """
        Open a stream or a V3 connection for a newly accepted local socket; None refuses it.
        """
        conn = self.conn
        if conn is None:
            log.warning("connection refused: tunnel not connected service=%s", service or "-")
            return None
        tunnel = conn.tunnel
        version = tunnel.version
        tunnel_service = "" if version is ProtocolVersion.V1 else service
        try:
            if tunnel.active_stream(tunnel_service) is None:
                stream_id, connection_id = tunnel.send_stream_start(tunnel_service)
                log.info("stream started service=%s stream=%d", service or "-", stream_id)
            elif version is ProtocolVersion.V3:
                connection_id = tunnel.send_connection_start(tunnel_service)
            else:
                log.warning("connection refused: V1/V2 carry one connection per service")
                return None
        except LocalProtocolError as exc:
            log.warning("connection refused service=%s: %s", service or "-", exc)
            return None
        conn.flush()
        local = LocalConnection(self, tunnel_service, connection_id)
        self.add_local(local)
        return local


class _Accepted(asyncio.Protocol):
    """
    What a listener creates: hands the socket over to a LocalConnection, or refuses it.
    """

    def __init__(self, bridge: SourceBridge, service: str) -> None:
        self._bridge = bridge
        self._service = service

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        local = self._bridge.accept(self._service)
        if local is None:
            # Refused with a reset: an EOF would look like a complete, empty answer.
            reset_transport(transport)
            return
        # From now on the transport calls the LocalConnection directly (no indirection per read).
        transport.set_protocol(local)
        local.connection_made(transport)
