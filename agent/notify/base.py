"""
The interface every tunnel-notification source implements (docs/architecture.md §5.1).

A source connects and subscribes in ``__aenter__``, disconnects in ``__aexit__``
and yields :class:`RawNotification` objects from ``async for``. It never parses
the payload: validation lives only in the pure :mod:`agent.daemon.notification`,
so the MQTT and Greengrass sources stay thin and cannot disagree.

Each notification carries its :class:`Acknowledgement`. The daemon calls it once
the notification is handled (whatever the outcome), so a source that can tell
its broker (MQTT: the PUBACK) does so only then; a notification never
acknowledged is redelivered by the broker. Nothing between the source and the
daemon drops a notification: the queue is unbounded, and the source bounds what
is in flight (MQTT: Receive Maximum).

SDK callbacks arrive on CRT threads; implementations hand them to the event
loop with ``loop.call_soon_threadsafe`` into the one :class:`NotificationQueue`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Self, runtime_checkable

import structlog


if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable


__all__ = [
    "Acknowledgement",
    "NotificationQueue",
    "NotificationSource",
    "PublishResult",
    "Publisher",
    "RawNotification",
]

_log = structlog.get_logger(__name__)


class Acknowledgement:
    """
    Tells a notification's source that it was handled; only the first call counts.

    Idempotent and thread-safe. Without a callback (a source with nothing to
    acknowledge) it only records that it was called.

    Args:
        callback: Runs once, in the caller's thread, on the first call.
    """

    __slots__ = ("_callback", "_done", "_lock")

    def __init__(self, callback: Callable[[], object] | None = None) -> None:
        """
        Create an acknowledgement not yet given.
        """
        self._callback = callback
        self._done = False
        self._lock = threading.Lock()

    @property
    def done(self) -> bool:
        """
        Whether the acknowledgement was given.
        """
        return self._done

    def __call__(self) -> None:
        """
        Acknowledge: run the callback the first time, do nothing afterwards.
        """
        with self._lock:
            if self._done:
                return
            self._done = True
            callback, self._callback = self._callback, None
        if callback is not None:
            callback()


@dataclass(frozen=True, slots=True)
class RawNotification:
    """
    One message received on ``$aws/things/<thing>/tunnels/notify``.

    Attributes:
        topic: The topic the message arrived on.
        payload: The raw bytes; parsed and validated only by :mod:`agent.daemon.notification`.
        ack: Call once the notification is handled (:class:`Acknowledgement`).
    """

    topic: str
    payload: bytes
    ack: Acknowledgement = field(default_factory=Acknowledgement, compare=False)

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


@dataclass(frozen=True, slots=True)
class PublishResult:
    """
    What became of a QoS 1 publish.

    Attributes:
        ok: The broker accepted it (PUBACK success).
        reason: The PUBACK reason or the client error, by name, when not ok.
        refused: The broker refused it (a PUBACK failure code: typically the IoT policy).
    """

    ok: bool
    reason: str | None = None
    refused: bool = False


@runtime_checkable
class Publisher(Protocol):
    """
    The optional half of a source: publishing on the same connection (the shadow report).

    A source that can publish implements this as well; the MQTT source does, the
    Greengrass source does not.
    """

    async def publish(self, topic: str, payload: bytes) -> PublishResult:
        """
        Publish at QoS 1 and wait for the outcome (queued while offline).
        """
        ...


class NotificationQueue:
    """
    Notifications on their way from a source's callbacks (in the loop) to the daemon.

    Unbounded, and never drops: the source bounds it (MQTT: the broker sends at
    most Receive Maximum unacknowledged notifications). :meth:`close` ends every
    iteration once the notifications before it are read.

    Args:
        source: The source's name in log events.
        warn_above: Log ``notification_backlog`` (warning) each time the backlog
            grows past this many; ``None`` for never.

    Raises:
        ValueError: ``warn_above`` is below 1.
    """

    def __init__(self, *, source: str, warn_above: int | None = None) -> None:
        """
        Create an empty, open queue.
        """
        if warn_above is not None and warn_above < 1:
            raise ValueError("warn_above must be >= 1")
        self._items: collections.deque[RawNotification] = collections.deque()
        self._waiters: set[asyncio.Future[None]] = set()
        self._closed = False
        self._source = source
        self._warn_above = warn_above
        self._warned = False
        #: The most notifications ever waiting at once.
        self.high_water = 0

    def __len__(self) -> int:
        """
        Notifications waiting to be read.
        """
        return len(self._items)

    def put(self, notification: RawNotification) -> None:
        """
        Add a notification (never drops one).
        """
        self._items.append(notification)
        size = len(self._items)
        self.high_water = max(self.high_water, size)
        if self._warn_above is not None:
            if size > self._warn_above and not self._warned:
                self._warned = True
                _log.warning("notification_backlog", source=self._source, waiting=size)
            elif size <= self._warn_above // 2:
                self._warned = False
        self._wake()

    def close(self) -> None:
        """
        End every iteration, now and later, once the notifications before it are read.
        """
        self._closed = True
        self._wake()

    def __aiter__(self) -> AsyncIterator[RawNotification]:
        """
        Iterate over notifications until the queue is closed.
        """
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RawNotification]:
        while True:
            while self._items:
                yield self._items.popleft()
            if self._closed:
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                await waiter
            finally:
                self._waiters.discard(waiter)

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
