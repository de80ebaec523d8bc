"""
The destination side: connects each stream (and V3 connection) to the mapped local service.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from agent.protocol import ConnectionStarted, ProtocolVersion, ServiceIdsReceived, StreamStarted
from agent.proxy.local import Bridge, LocalConnection
from agent.proxy.mapping import MappingError, Target, match_services


if TYPE_CHECKING:
    from agent.proxy.options import ProxyOptions

__all__ = ["DestinationBridge"]

log = logging.getLogger("agent.proxy")


class DestinationBridge(Bridge):
    """
    Opens local connections when the source starts streams or connections.
    """

    def __init__(self, options: ProxyOptions) -> None:
        """
        Start with the map as configured; SERVICE_IDS renames a lone unnamed mapping.
        """
        super().__init__(options)
        self.targets: dict[str, Target] = dict(self.options.targets)
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers[StreamStarted] = self._on_stream_started  # type: ignore[assignment]
        self._handlers[ConnectionStarted] = self._on_connection_started  # type: ignore[assignment]

    def _on_service_ids(self, event: ServiceIdsReceived) -> None:
        try:
            self.targets = match_services(self.options.targets, event.service_ids)
        except MappingError as exc:
            self.fail(f"service map does not match the tunnel: {exc}")
            return
        log.info(
            "services mapped %s",
            ",".join(f"{name}={target}" for name, target in self.targets.items()),
        )

    def _target(self, service_id: str) -> Target | None:
        target = self.targets.get(service_id)
        if target is None and service_id == "" and len(self.targets) == 1:
            # A V1 stream carries no service id: it goes to the only mapping.
            target = next(iter(self.targets.values()))
        return target

    def _on_stream_started(self, event: StreamStarted) -> None:
        log.info("stream started service=%s stream=%d", event.service_id or "-", event.stream_id)
        self._open(event.service_id, event.connection_id, stream_start=True)

    def _on_connection_started(self, event: ConnectionStarted) -> None:
        self._open(event.service_id, event.connection_id, stream_start=False)

    def _open(self, service_id: str, connection_id: int, *, stream_start: bool) -> None:
        target = self._target(service_id)
        local = LocalConnection(self, service_id, connection_id)
        self.add_local(local)
        if target is None:
            log.warning("no mapping for service=%s", service_id or "-")
            self._refuse(local, stream_start=stream_start)
            return
        task = asyncio.get_running_loop().create_task(
            self._connect(local, target, stream_start=stream_start)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, local: LocalConnection, target: Target, *, stream_start: bool) -> None:
        loop = asyncio.get_running_loop()
        options = self.options
        attempts = max(1, options.tcp_connect_retries)
        for attempt in range(1, attempts + 1):
            if local.closed:
                return
            try:
                if target.path is not None:
                    await loop.create_unix_connection(lambda: local, target.path)
                else:
                    # -b in destination mode: the local address connections come from,
                    # as the AWS localproxy does (docs/protocol.md §9.5).
                    source = None if options.bind_address is None else (options.bind_address, 0)
                    await loop.create_connection(
                        lambda: local, target.host, target.port, local_addr=source
                    )
            except OSError as exc:
                log.warning(
                    "connect to %s failed (attempt %d/%d): %s",
                    target,
                    attempt,
                    attempts,
                    exc.strerror or exc,
                )
                if attempt < attempts:
                    await asyncio.sleep(options.tcp_connect_delay)
            else:
                return
        if not local.closed:
            self._refuse(local, stream_start=stream_start)

    def refused(self, local: LocalConnection) -> bool:
        """
        Whether a closed connection was refused: the local service never accepted it.
        """
        return local.transport is None

    def _refuse(self, local: LocalConnection, *, stream_start: bool) -> None:
        """
        Tell the source the local service is unreachable (docs/protocol.md §6.3).
        """
        answered = local.closed_by_peer  # the source already ended it: nothing to reset
        local.closed_by_peer = True
        local.abandon()
        conn = self.conn
        if conn is None or answered:
            return
        tunnel = conn.tunnel
        if tunnel.active_stream(local.service_id) is None:
            return
        if stream_start or tunnel.version is not ProtocolVersion.V3:
            tunnel.send_stream_reset(local.service_id)
        else:
            tunnel.send_connection_reset(local.service_id, local.connection_id)
        conn.flush()

    async def close(self) -> None:
        """
        Cancel pending connection attempts.
        """
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
