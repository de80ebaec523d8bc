"""
What the bundled proxy reports on its private channel: connections and bytes.

The supervisor gives the bundled proxy the write end of a pipe (``--report-fd``); this
module reads the JSON lines of :mod:`agent.protocol.report` from the read end. An external
binary (the AWS localproxy) has no such channel: its figures stay unknown (``None``), and
only what its output says (connected, last error) is known of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from typing import TYPE_CHECKING

from agent.protocol.report import parse_report


if TYPE_CHECKING:
    from collections.abc import Callable

    from structlog.typing import FilteringBoundLogger


__all__ = ["ProxyFigures", "is_bundled"]

_LINE_LIMIT = 4096


def is_bundled(argv: tuple[str, ...] | list[str]) -> bool:
    """
    Whether ``argv`` starts the bundled proxy (``python -m agent.proxy``).
    """
    return tuple(argv[1:3]) == ("-m", "agent.proxy")


class ProxyFigures:
    """
    One proxy's live figures, kept up to date from its report channel.

    Attributes:
        connections: Local connections open now.
        bytes_in: Bytes from the tunnel to the local services, all connections so far.
        bytes_out: Bytes from the local services into the tunnel.
        refused: Connections the local service refused, so far.
    """

    def __init__(
        self, *, log: FilteringBoundLogger, on_change: Callable[[], None] | None = None
    ) -> None:
        """
        Start with zeros; :meth:`watch` reads a descriptor.
        """
        self._log = log
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self.connections = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.refused = 0

    def feed(self, data: bytes) -> bool:
        """
        Apply one line; return whether anything changed.
        """
        line = parse_report(data)
        if line is None:
            return False
        if line.event == "totals":
            changed = (line.connections, line.bytes_in, line.bytes_out) != (
                self.connections,
                self.bytes_in,
                self.bytes_out,
            )
            self.connections, self.bytes_in, self.bytes_out = (
                line.connections,
                line.bytes_in,
                line.bytes_out,
            )
            return changed
        if line.event == "closed":
            self._log.info(
                "proxy_connection_closed",
                service=line.service,
                connection=line.connection,
                bytes_in=line.bytes_in,
                bytes_out=line.bytes_out,
                refused=line.refused,
            )
            if line.refused:
                self.refused += 1
                return True
        else:
            self._log.info(
                "proxy_connection_opened", service=line.service, connection=line.connection
            )
        return False

    async def watch(self, fd: int) -> None:
        """
        Read lines from ``fd`` (which this object then owns) until the writer closes it.
        """
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=_LINE_LIMIT, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        pipe = os.fdopen(fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(functools.partial(_same, protocol), pipe)
        self._task = asyncio.ensure_future(self._read(reader, transport))

    async def _read(self, reader: asyncio.StreamReader, transport: asyncio.ReadTransport) -> None:
        try:
            while True:
                try:
                    data = await reader.readline()
                except ValueError:
                    continue  # an over-long line: not ours to trust, skip it
                if not data:
                    return
                if self.feed(data) and self._on_change is not None:
                    self._on_change()
        finally:
            transport.close()

    async def close(self) -> None:
        """
        Stop reading (the proxy has exited, or is handed on).
        """
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _same(protocol: asyncio.StreamReaderProtocol) -> asyncio.StreamReaderProtocol:
    return protocol
