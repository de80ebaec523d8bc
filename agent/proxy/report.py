"""
The report channel's writer: per-connection figures for whoever started the proxy.

Only with the hidden ``--report-fd N`` flag (the agent's supervisor, ``tunnel-agent
connect``): lines go to descriptor N in the format of :mod:`agent.protocol.report`.
The channel is advisory: a full pipe drops a line rather than stall the data path, and a
closed one turns the reporter off. Each line is shorter than ``PIPE_BUF``, so a write is
whole or nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING

from agent.protocol.report import ReportLine, encode_report


if TYPE_CHECKING:
    from agent.proxy.local import LocalConnection


__all__ = ["ConnectionReporter"]

# Totals go out at most this often while bytes flow.
TOTALS_INTERVAL = 1.0


class ConnectionReporter:
    """
    Writes opened / closed / totals lines to an inherited descriptor.
    """

    def __init__(self, fd: int) -> None:
        """
        Take ownership of ``fd`` (made non-blocking).
        """
        self._fd: int | None = fd
        os.set_blocking(fd, False)
        self.bytes_in = 0
        self.bytes_out = 0
        self.connections = 0
        self._timer: asyncio.TimerHandle | None = None

    def _write(self, line: ReportLine) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, encode_report(line))
        except BlockingIOError:
            pass  # the reader is behind: drop this line, a later totals line catches up
        except OSError:
            self.close()

    def _totals(self) -> None:
        self._timer = None
        self._write(
            ReportLine(
                "totals",
                connections=self.connections,
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
            )
        )

    def flowed(self, *, into: int = 0, out: int = 0) -> None:
        """
        Count bytes from (``into``) and to (``out``) the tunnel; totals follow within a second.
        """
        self.bytes_in += into
        self.bytes_out += out
        if self._timer is None and self._fd is not None:
            self._timer = asyncio.get_running_loop().call_later(TOTALS_INTERVAL, self._totals)

    def opened(self, local: LocalConnection) -> None:
        """
        A local connection joined the tunnel.
        """
        self.connections += 1
        self._write(ReportLine("opened", service=local.service_id, connection=local.connection_id))
        self._totals_now()

    def closed(self, local: LocalConnection, *, refused: bool) -> None:
        """
        A local connection ended, with its byte counts.
        """
        self.connections = max(0, self.connections - 1)
        self._write(
            ReportLine(
                "closed",
                service=local.service_id,
                connection=local.connection_id,
                bytes_in=local.bytes_in,
                bytes_out=local.bytes_out,
                refused=refused,
            )
        )
        self._totals_now()

    def _totals_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._totals()

    def close(self) -> None:
        """
        Stop reporting and close the descriptor.
        """
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
