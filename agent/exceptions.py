"""
The one exception tree of the agent, the bundled local proxy and the emulator.

A module of its own so that every layer can import it without cycles::

    AgentError
    ├── ConfigError
    ├── ProtocolError (abstract)
    │   ├── LocalProtocolError
    │   └── RemoteProtocolError
    │       └── FrameTooLarge
    ├── InvalidState (also AssertionError)
    ├── TunnelClosed
    │   ├── TunnelClosedOK
    │   └── TunnelClosedError
    ├── NotificationError
    │   └── InvalidNotification
    └── ProxyError
        ├── ProxyStartError
        └── ProxyExited
"""

from __future__ import annotations

from typing import Any, Self


__all__ = [
    "AgentError",
    "ConfigError",
    "FrameTooLarge",
    "InvalidNotification",
    "InvalidState",
    "LocalProtocolError",
    "NotificationError",
    "ProtocolError",
    "ProxyError",
    "ProxyExited",
    "ProxyStartError",
    "RemoteProtocolError",
    "TunnelClosed",
    "TunnelClosedError",
    "TunnelClosedOK",
]


class AgentError(Exception):
    """
    Root of every error this package raises on purpose.
    """


class ConfigError(AgentError):
    """
    The configuration is invalid; the daemon exits with status 78 (EX_CONFIG).
    """


class ProtocolError(AgentError):
    """
    A violation of the tunnel protocol. Abstract: raise a subclass.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:  # noqa: ARG004
        """
        Refuse direct instantiation, as h11 does, so every raise says whose fault it is.
        """
        if cls is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        return super().__new__(cls)


class LocalProtocolError(ProtocolError):
    """
    Our own code misused the protocol (a bug on this side).
    """


class RemoteProtocolError(ProtocolError):
    """
    The peer sent something the protocol does not allow.
    """


class FrameTooLarge(RemoteProtocolError):
    """
    A tunnel frame or WebSocket message exceeded the configured limit.
    """


class InvalidState(AgentError, AssertionError):
    """
    An operation was attempted in a state that does not allow it.
    """


class TunnelClosed(AgentError):
    """
    The tunnel's WebSocket is closed.

    Attributes:
        code: WebSocket close code (1006 when no close frame was received).
        reason: Close reason sent by the peer, possibly empty.
    """

    def __init__(self, code: int, reason: str = "") -> None:
        """
        Record the close code and reason.
        """
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        """
        Render as ``code reason``.
        """
        return f"{self.code} {self.reason}".rstrip()


class TunnelClosedOK(TunnelClosed):
    """
    The tunnel was closed normally (1000 or 1001).
    """


class TunnelClosedError(TunnelClosed):
    """
    The tunnel was closed abnormally or with an error code.
    """


class NotificationError(AgentError):
    """
    A tunnel notification could not be handled.
    """


class InvalidNotification(NotificationError):
    """
    A tunnel notification payload failed validation; it is dropped.
    """


class ProxyError(AgentError):
    """
    A local proxy process failed.
    """


class ProxyStartError(ProxyError):
    """
    A local proxy process could not be started.
    """


class ProxyExited(ProxyError):
    """
    A local proxy process exited.

    Attributes:
        returncode: The process' exit status (negative: killed by that signal).
    """

    def __init__(self, returncode: int) -> None:
        """
        Record the exit status.
        """
        super().__init__(returncode)
        self.returncode = returncode
