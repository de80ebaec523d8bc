"""
systemd's notify protocol: ``READY=1``, ``STATUS=...``, ``WATCHDOG=1`` over a datagram.

A few lines instead of a dependency: one ``AF_UNIX``/``SOCK_DGRAM`` socket to
``$NOTIFY_SOCKET`` (``@`` prefix = abstract namespace), see sd_notify(3). When
the variable is unset (not under systemd) there is simply no notifier.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

import structlog


if TYPE_CHECKING:
    from collections.abc import Mapping


__all__ = ["SdNotifier", "watchdog_interval"]

log = structlog.get_logger("agent.daemon.sdnotify")


class SdNotifier:
    """
    Sends state changes to the service manager; never raises on a send failure.
    """

    def __init__(self, address: str) -> None:
        """
        Open a datagram socket for ``address``.

        Args:
            address: A socket path, or ``@name`` for the abstract namespace.
        """
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> SdNotifier | None:
        """
        Build a notifier from ``$NOTIFY_SOCKET``, or return ``None`` when it is unset.

        Args:
            environ: Environment to read; :data:`os.environ` by default.

        Returns:
            A notifier, or ``None``.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        return cls(address) if address.startswith(("/", "@")) else None

    def notify(self, *assignments: str) -> bool:
        """
        Send ``VAR=value`` assignments in one datagram.

        Args:
            *assignments: e.g. ``"READY=1"``, ``"STATUS=2 tunnels"``.

        Returns:
            Whether the datagram was sent.
        """
        message = "\n".join(assignments).encode()
        try:
            self._socket.sendto(message, self._address)
        except OSError as exc:
            log.warning("sd_notify_failed", error=exc.strerror)
            return False
        return True

    def close(self) -> None:
        """
        Close the socket.
        """
        self._socket.close()


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """
    Return how often to send ``WATCHDOG=1``: half of ``$WATCHDOG_USEC`` (sd_watchdog_enabled(3)).

    Args:
        environ: Environment to read; :data:`os.environ` by default.

    Returns:
        Seconds between pings, or ``None`` when the watchdog is off or meant for another pid.
    """
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 2_000_000
