"""
The interface every tunnel-notification source implements (docs/architecture.md §5.1).

A source connects and subscribes in ``__aenter__``, disconnects in ``__aexit__``
and yields :class:`RawNotification` objects from ``async for``. It never parses
the payload: validation lives only in the pure :mod:`agent.daemon.notification`
(docs/architecture.md §5.1), so the MQTT and Greengrass sources stay thin and cannot disagree.

SDK callbacks arrive on CRT threads; implementations hand them to the event
loop with ``loop.call_soon_threadsafe`` into the one :class:`NotificationQueue`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable

import structlog


if TYPE_CHECKING:
    from collections.abc import AsyncIterator


__all__ = ["NotificationQueue", "NotificationSource", "RawNotification"]

_log = structlog.get_logger(__name__)


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
        Hide the payload: it carries the destination access token (docs/architecture.md §7.4).
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


class _Closed:
    """
    Queue sentinel: the source was closed; iteration ends.
    """


_CLOSED = _Closed()


class NotificationQueue:
    """
    Notifications on their way from a source's callbacks (in the loop) to the daemon.

    Bounded: when full, the oldest notification is dropped and counted (a newer one
    carries a fresher token). :meth:`close` ends every iteration.

    Args:
        size: Notifications held at most.
        source: The source's name in log events.

    Raises:
        ValueError: ``size`` is below 1.
    """

    def __init__(self, size: int, *, source: str) -> None:
        """
        Create an empty, open queue.
        """
        if size < 1:
            raise ValueError("queue_size must be >= 1")
        self._queue: asyncio.Queue[RawNotification | _Closed] = asyncio.Queue(size)
        self._source = source
        self.dropped = 0

    def put(self, notification: RawNotification) -> None:
        """
        Add a notification, dropping the oldest one when full.
        """
        self._put(notification)

    def close(self) -> None:
        """
        End every iteration, now and later, once the notifications before it are read.
        """
        self._put(_CLOSED)

    def __aiter__(self) -> AsyncIterator[RawNotification]:
        """
        Iterate over notifications until the queue is closed.
        """
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RawNotification]:
        while True:
            item = await self._queue.get()
            if isinstance(item, _Closed):
                self._put(_CLOSED)  # for any other iterator still waiting
                return
            yield item

    def _put(self, item: RawNotification | _Closed) -> None:
        if self._queue.full():
            dropped = self._queue.get_nowait()
            if isinstance(dropped, RawNotification):
                self.dropped += 1
                _log.warning("notification_dropped", source=self._source, reason="queue_full")
        self._queue.put_nowait(item)
