"""
The one exception tree of the agent, the bundled local proxy and the emulator.

A module of its own so that every layer can import it without cycles::

    AgentError
    ├── ConfigError
    ├── ProtocolError (abstract)
    │   ├── LocalProtocolError
    │   └── RemoteProtocolError
    │       └── FrameTooLarge
    ├── NotificationError
    │   └── InvalidNotification
    └── ProxyStartError

Each part roots its own errors here too (the emulator's ``StoreError``, the
proxy's ``MappingError`` ...), so ``except AgentError`` catches everything this
package raises on purpose. The exit statuses of the commands live here as well,
beside the errors that cause them.
"""

from __future__ import annotations

from typing import Any, Self


__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "AgentError",
    "ConfigError",
    "FrameTooLarge",
    "InvalidNotification",
    "LocalProtocolError",
    "NotificationError",
    "ProtocolError",
    "ProxyStartError",
    "RemoteProtocolError",
]

#: Stopped on request, or the command did what it was asked.
EXIT_OK = 0
#: A runtime failure.
EXIT_FAILURE = 1
#: Bad command-line usage (argparse's own status).
EXIT_USAGE = 2
#: EX_CONFIG: the configuration is invalid. The unit's RestartPreventExitStatus=78
#: stops systemd from restarting into the same error forever.
EXIT_CONFIG = 78


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


class NotificationError(AgentError):
    """
    A tunnel notification could not be handled.
    """


class InvalidNotification(NotificationError):
    """
    A tunnel notification payload failed validation; it is dropped.
    """


class ProxyStartError(AgentError):
    """
    A local proxy process could not be started.
    """
