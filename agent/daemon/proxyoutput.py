"""
Reading a proxy's output: each line's level, and whether the proxy is connected.

Two formats are understood: the AWS localproxy's ``[time]{pid}[level]   message`` and the
bundled proxy's ``time LEVEL message``; any other line counts as info. A proxy's
``[warning]``/``[error]`` lines are logged at those levels, so they show up where an
operator looks (``journalctl -p warning``).

Connected means the proxy said its WebSocket to the tunnel is up. A proxy that has not
said so ``connect_timeout`` seconds after it started, or after it said the connection
dropped, is reported once: ``proxy_not_connected`` (warning) with its last warning or
error line, and ``connected: false`` in the status file. A proxy retrying a TLS error
forever (a CA it cannot use, say) is otherwise indistinguishable from a working one.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from agent.logging import secrets


if TYPE_CHECKING:
    from collections.abc import Callable

    from structlog.typing import FilteringBoundLogger


__all__ = ["ConnectionWatch", "ProxyLine", "parse_line"]

# AWS localproxy: "[2019-01-17T21:37:15.528290]{632}[info]    Starting proxy ...".
_AWS_LINE = re.compile(
    r"\[[^\]]*\](?:\{\d+\})?\s*\[(?P<level>trace|debug|info|warning|error|fatal)\]\s*(?P<message>.*)"
)
# The bundled proxy (agent/proxy/cli.py): "2024-05-01T12:00:00.123 WARNING message".
_BUNDLED_LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?\s+"
    r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+(?P<message>.*)"
)
_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.ERROR,
    "critical": logging.ERROR,
}
_CONNECTED = re.compile(
    r"connected to the tunnel\b"  # bundled
    r"|Successfully established websocket connection"  # AWS
)
_DISCONNECTED = re.compile(
    r"connection lost\b"  # bundled, before it reconnects
    r"|Error from io_ctx::run\(\)"  # AWS, before it sets the WebSocket up again
)
# Longest error line kept for the status file.
_MAX_ERROR = 500


@dataclass(frozen=True, slots=True)
class ProxyLine:
    """
    One output line, understood.

    Attributes:
        level: A :mod:`logging` level: the line's own, or INFO if it has none.
        message: The text after the time stamp and level.
        event: ``connected``, ``disconnected``, or ``None`` for any other line.
    """

    level: int
    message: str
    event: Literal["connected", "disconnected"] | None


def parse_line(text: str) -> ProxyLine:
    """
    Classify one line printed by the bundled proxy or the AWS localproxy.

    Args:
        text: The line, without its newline.

    Returns:
        Its level, message and connection event.
    """
    match = _AWS_LINE.match(text) or _BUNDLED_LINE.match(text)
    if match is None:
        return ProxyLine(logging.INFO, text, None)
    level, message = _LEVELS[match["level"].lower()], match["message"]
    event: Literal["connected", "disconnected"] | None = None
    if _CONNECTED.match(message):
        event = "connected"
    elif _DISCONNECTED.match(message):
        event = "disconnected"
    return ProxyLine(level, message, event)


class ConnectionWatch:
    """
    One proxy process's connection state, as its output tells it.
    """

    def __init__(
        self,
        *,
        log: FilteringBoundLogger,
        timeout: float,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """
        Start watching: the clock for the first connection runs from now.

        Args:
            log: Logger bound to the tunnel and the proxy's pid.
            timeout: Seconds a proxy may take to connect before it is reported.
            on_change: Called when ``connected`` changes (or a new error while not connected).
        """
        self._log = log
        self._timeout = timeout
        self._on_change = on_change
        self._loop = asyncio.get_running_loop()
        self._since = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._published_error: str | None = None
        self._closed = False
        self.connected: bool | None = None
        """``True`` once connected; ``None`` while connecting; ``False`` once overdue."""
        self.last_error: str | None = None
        """The latest warning or error line (masked), cleared on connection."""
        self._arm()

    def _arm(self) -> None:
        self._cancel()
        self._since = self._loop.time()
        if not self._closed:
            self._timer = self._loop.call_later(self._timeout, self._overdue)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _changed(self) -> None:
        self._published_error = self.last_error
        if self._on_change is not None:
            self._on_change()

    def _overdue(self) -> None:
        self._timer = None
        if self.connected is not None:
            return
        self.connected = False
        self._log.warning("proxy_not_connected", timeout=self._timeout, last_error=self.last_error)
        self._changed()

    def feed(self, text: str, stream: str) -> None:
        """
        Log one output line at its level and update the connection state.

        Args:
            text: The line, without its newline.
            stream: ``stdout`` or ``stderr``.
        """
        line = parse_line(text)
        self._log.log(line.level, "proxy_output", stream=stream, line=text)
        if line.level >= logging.WARNING:
            # Masked here too: the status file never holds a token either.
            self.last_error = secrets.mask(line.message)[:_MAX_ERROR]
        if line.event == "connected" and self.connected is not True:
            self._cancel()
            self._log.info("proxy_connected", after=round(self._loop.time() - self._since, 3))
            self.connected, self.last_error = True, None
            self._changed()
        elif line.event == "disconnected" and self.connected is True:
            self.connected = None
            self._arm()
            self._changed()
        elif self.connected is False and self.last_error != self._published_error:
            self._changed()

    def close(self) -> None:
        """
        Stop the clock for good: the process has exited (its last lines may still come).
        """
        self._closed = True
        self._cancel()
