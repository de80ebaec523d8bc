"""
SEAM 1: the interface every tunnel-notification source implements.

A source connects and subscribes in ``__aenter__``, disconnects in ``__aexit__``
and yields :class:`RawNotification` objects from ``async for``. It never parses
the payload: validation lives only in the pure :mod:`agent.daemon.notification`
(STYLE §3), so the MQTT and Greengrass sources stay thin and cannot disagree.

SDK callbacks arrive on CRT threads; implementations hand them to the event
loop with ``loop.call_soon_threadsafe`` into a bounded queue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable


if TYPE_CHECKING:
    from collections.abc import AsyncIterator


__all__ = ["NotificationSource", "RawNotification"]


@dataclass(frozen=True, slots=True)
class RawNotification:
    """
    One message received on ``$aws/things/<thing>/tunnels/notify``.

    Attributes:
        topic: The topic the message arrived on.
        payload: The raw bytes; parsed and validated only by :mod:`agent.daemon.notification`.
    """

    topic: str
    payload: bytes

    def __repr__(self) -> str:
        """
        Hide the payload: it carries the destination access token (STYLE §7).
        """
        return f"RawNotification(topic={self.topic!r}, payload=<{len(self.payload)} bytes>)"


@runtime_checkable
class NotificationSource(Protocol):
    """
    Where tunnel notifications come from (MQTT, Greengrass IPC, or a test fake).

    Connect and subscribe on ``__aenter__``, disconnect on ``__aexit__``;
    ``async for notification in source`` receives until the source is closed.
    """

    async def __aenter__(self) -> Self:
        """
        Connect and subscribe to the notify topic.
        """
        ...

    async def __aexit__(self, *exc_info: object) -> None:
        """
        Disconnect cleanly; ends any pending iteration.
        """
        ...

    def __aiter__(self) -> AsyncIterator[RawNotification]:
        """
        Return an iterator over received notifications.
        """
        ...
