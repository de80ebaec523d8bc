"""
Tunnel notifications through the Greengrass nucleus' IPC (``SubscribeToIoTCore``).

Deployed as a Greengrass component, the agent does not open an MQTT connection of
its own: the nucleus already holds the thing's connection to AWS IoT Core and
relays ``$aws/things/<thing>/tunnels/notify`` over its local IPC socket, provided
the recipe's ``accessControl`` grants ``aws.greengrass#SubscribeToIoTCore`` on
that topic (packaging/greengrass/recipe.yaml).

Invariants: this module never parses a payload (docs/architecture.md §5.1): every message, even a
malformed one, is handed over raw as a :class:`RawNotification` and validated
downstream by :mod:`agent.daemon.notification`. SDK callbacks run on the SDK's threads;
they only ever call ``loop.call_soon_threadsafe``. A stream that closes while the
source is open is re-established with backoff, on a fresh IPC connection.

Delivery: IPC has no acknowledgement. The nucleus holds the QoS 1 subscription in
its own persistent session and acknowledges each message to AWS IoT Core when *it*
receives it, before relaying it here; so a notification relayed while this source
is not subscribed, or received and not yet handled when the agent dies, is gone.
Once received, nothing drops it: the queue is unbounded (a backlog is logged), and
each notification's acknowledgement is a no-op.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, Protocol, Self

import structlog

from agent.common.loop import call_in_loop
from agent.common.retry import backoff
from agent.exceptions import ConfigError, NotificationError
from agent.notify.base import NotificationQueue, RawNotification
from agent.protocol.ids import THING_NAME


if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator, Mapping


__all__ = [
    "QOS_AT_LEAST_ONCE",
    "GreengrassNotificationSource",
    "IpcClient",
    "default_client_factory",
]

_log = structlog.get_logger(__name__)

# The nucleus sets this for every component it runs (Greengrass "component environment").
_THING_NAME_ENV = "AWS_IOT_THING_NAME"
# A backlog this long means notifications arrive faster than proxies start: say so.
_BACKLOG_WARNING = 100
# The AWS IoT thing-name pattern (CreateThing API).
# awsiot.greengrasscoreipc.model.QOS.AT_LEAST_ONCE: a notification published while the
# stream was briefly down is redelivered rather than lost (docs/protocol.md §17.3).
QOS_AT_LEAST_ONCE = "1"


class IpcClient(Protocol):
    """
    The slice of ``GreengrassCoreIPCClientV2`` this source uses (the test seam).
    """

    def subscribe_to_iot_core(
        self,
        *,
        topic_name: str,
        qos: str,
        on_stream_event: Callable[[Any], None],
        on_stream_error: Callable[[Exception], bool],
        on_stream_closed: Callable[[], None],
    ) -> tuple[Any, Any]:
        """
        Subscribe synchronously; return ``(response, operation)``.
        """
        ...

    def close(self) -> Any:
        """
        Close the IPC connection and the client's callback executor.
        """
        ...


def default_client_factory() -> IpcClient:
    """
    Connect to the nucleus with the SDK's V2 client (blocking; run it in a thread).

    The SDK reads the socket path and the auth token from the environment the
    nucleus gives its components (``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT``,
    ``SVCUID``).

    Returns:
        A connected ``GreengrassCoreIPCClientV2``.
    """
    # Imported here so that merely importing this module (the registry does it lazily
    # anyway) does not load the IPC client outside Greengrass.
    from awsiot.greengrasscoreipc.clientv2 import (  # noqa: PLC0415
        GreengrassCoreIPCClientV2,
    )

    # executor=None: our callbacks only hop to the event loop, so they may run on the
    # CRT thread; a thread pool could reorder two notifications (rotation, docs/protocol.md §17.3).
    client: IpcClient = GreengrassCoreIPCClientV2(executor=None)
    return client


class GreengrassNotificationSource:
    """
    A :class:`~agent.notify.base.NotificationSource` fed by Greengrass IPC.

    Args:
        thing_name: The thing whose notify topic to subscribe to; defaults to
            ``$AWS_IOT_THING_NAME``, which the nucleus sets for its components.
        client_factory: Returns a connected IPC client; blocking, called in a
            worker thread. Tests pass a fake here: the nucleus cannot run in CI.
        retry_initial: First delay before re-subscribing after the stream closed.
        retry_max: Largest such delay.
        environ: Environment to read the thing name from; defaults to ``os.environ``.

    Raises:
        ConfigError: No thing name was given and ``$AWS_IOT_THING_NAME`` is unset.
    """

    def __init__(
        self,
        *,
        thing_name: str | None = None,
        client_factory: Callable[[], IpcClient] = default_client_factory,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """
        Record the configuration; nothing connects before ``__aenter__``.
        """
        env = os.environ if environ is None else environ
        name = thing_name or env.get(_THING_NAME_ENV)
        if not name:
            raise ConfigError(
                f"the Greengrass notification source needs a thing name (${_THING_NAME_ENV})"
            )
        # The name goes into a topic: MQTT wildcards or '/' would widen the subscription.
        if not THING_NAME.fullmatch(name):
            raise ConfigError(f"thing name {name!r} does not match [a-zA-Z0-9:_-]{{1,128}}")
        self.thing_name = name
        self.topic = f"$aws/things/{name}/tunnels/notify"
        self._factory = client_factory
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._queue = NotificationQueue(source="greengrass", warn_above=_BACKLOG_WARNING)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: IpcClient | None = None
        self._operation: Any = None
        # Bumped on each subscription so late callbacks of a replaced stream are ignored.
        self._generation = 0
        self._closing = False
        self._resubscriber: asyncio.Task[None] | None = None
        self.resubscriptions = 0

    async def __aenter__(self) -> Self:
        """
        Connect to the nucleus and subscribe to the notify topic.

        Raises:
            NotificationError: The nucleus refused the connection or the subscription
                (typically: the deployment lacks the recipe's ``accessControl``).
        """
        self._loop = asyncio.get_running_loop()
        self._closing = False
        await self._subscribe()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """
        Stop re-subscribing, close the stream and the connection, end iteration.
        """
        self._closing = True
        if self._resubscriber is not None:
            task, self._resubscriber = self._resubscriber, None
            task.cancel()
            # gather() returns the task's CancelledError instead of raising it, while a
            # cancellation of this coroutine itself still propagates (docs/architecture.md §6.5).
            await asyncio.gather(task, return_exceptions=True)
        await self._disconnect()
        self._queue.close()

    def __aiter__(self) -> AsyncIterator[RawNotification]:
        """
        Return an iterator over received notifications, ending once closed.
        """
        return aiter(self._queue)

    @property
    def waiting(self) -> int:
        """
        Notifications received and not yet taken by the daemon.
        """
        return len(self._queue)

    # -- connection management (event loop) ---------------------------------------

    async def _subscribe(self) -> None:
        self._generation += 1
        generation = self._generation
        try:
            self._client = await asyncio.to_thread(self._factory)
        except Exception as exc:
            raise NotificationError(f"cannot connect to the Greengrass nucleus IPC: {exc}") from exc
        client = self._client
        try:
            _response, self._operation = await asyncio.to_thread(
                lambda: client.subscribe_to_iot_core(
                    topic_name=self.topic,
                    qos=QOS_AT_LEAST_ONCE,
                    on_stream_event=lambda event: self._on_stream_event(generation, event),
                    on_stream_error=lambda error: self._on_stream_error(generation, error),
                    on_stream_closed=lambda: self._on_stream_closed(generation),
                )
            )
        except Exception as exc:
            await self._disconnect()
            raise NotificationError(
                f"SubscribeToIoTCore on {self.topic} refused: {type(exc).__name__}: {exc}"
            ) from exc
        _log.info("notify_subscribed", source="greengrass", topic=self.topic)

    async def _disconnect(self) -> None:
        # Invalidate callbacks first: closing the stream fires on_stream_closed.
        self._generation += 1
        operation, self._operation = self._operation, None
        client, self._client = self._client, None
        if operation is not None:
            await asyncio.to_thread(_close_quietly, operation)
        if client is not None:
            await asyncio.to_thread(_close_quietly, client)

    async def _resubscribe(self, delays: Iterator[float]) -> None:
        await self._disconnect()
        while not self._closing:
            delay = next(delays)
            _log.info("reconnect_scheduled", source="greengrass", delay=round(delay, 3))
            await asyncio.sleep(delay)
            try:
                await self._subscribe()
            except NotificationError as exc:
                _log.warning("notify_resubscribe_failed", source="greengrass", error=str(exc))
                continue
            self.resubscriptions += 1
            return

    def _start_resubscribe(self, generation: int) -> None:
        if self._closing or generation != self._generation or self._resubscriber is not None:
            return
        delays = backoff(initial=self._retry_initial, maximum=self._retry_max)
        self._resubscriber = asyncio.get_running_loop().create_task(self._resubscribe(delays))
        self._resubscriber.add_done_callback(self._resubscribe_done)

    def _resubscribe_done(self, task: asyncio.Task[None]) -> None:
        if self._resubscriber is task:
            self._resubscriber = None
        if not task.cancelled() and task.exception() is not None:
            _log.error("notify_resubscribe_crashed", source="greengrass", exc_info=task.exception())

    # -- SDK callbacks (SDK threads) --------------------------------------------------

    def _call_in_loop(self, callback: Callable[..., None], *args: object) -> None:
        if self._loop is not None:
            call_in_loop(self._loop, callback, *args)

    def _on_stream_event(self, generation: int, event: Any) -> None:
        message = getattr(event, "message", None)
        if message is None:
            return
        payload = message.payload
        notification = RawNotification(
            topic=message.topic_name or self.topic,
            payload=bytes(payload) if payload is not None else b"",
        )
        self._call_in_loop(self._deliver, generation, notification)

    def _deliver(self, generation: int, notification: RawNotification) -> None:
        if generation == self._generation and not self._closing:
            self._queue.put(notification)

    def _on_stream_error(self, generation: int, error: Exception) -> bool:
        self._call_in_loop(self._log_stream_error, generation, type(error).__name__, str(error))
        # True closes the stream; on_stream_closed then re-subscribes on a fresh connection,
        # so a stream in an unknown state never leaves the agent silently deaf.
        return True

    def _log_stream_error(self, generation: int, error_type: str, error: str) -> None:
        if generation == self._generation and not self._closing:
            _log.warning(
                "notify_stream_error", source="greengrass", error_type=error_type, error=error
            )

    def _on_stream_closed(self, generation: int) -> None:
        self._call_in_loop(self._stream_closed, generation)

    def _stream_closed(self, generation: int) -> None:
        if generation == self._generation and not self._closing:
            _log.warning("notify_stream_closed", source="greengrass", topic=self.topic)
            self._start_resubscribe(generation)


def _close_quietly(closeable: Any) -> None:
    try:
        result = closeable.close()
        # The SDK returns concurrent futures; wait so no CRT work outlives the source.
        if hasattr(result, "result"):
            result.result(timeout=5)
    except Exception as exc:
        _log.debug("notify_close_failed", source="greengrass", error=str(exc))
