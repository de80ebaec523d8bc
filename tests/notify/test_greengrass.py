"""
GreengrassNotificationSource driven through a fake IPC client at the SDK boundary.

The nucleus cannot run here, so ``client_factory`` hands the source a fake
``GreengrassCoreIPCClientV2`` whose stream callbacks fire on a thread of its own,
as the CRT's do, with the SDK's real ``IoTCoreMessage``/``MQTTMessage`` shapes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading

import pytest
from awsiot.greengrasscoreipc import model
from structlog.testing import capture_logs

from agent.exceptions import ConfigError, NotificationError
from agent.notify import load_source_class, resolve_kind
from agent.notify.base import NotificationSource, RawNotification
from agent.notify.greengrass import QOS_AT_LEAST_ONCE, GreengrassNotificationSource


SCALE = float(os.environ.get("TEST_TIME_SCALE", "1.0"))
TIMEOUT = 5.0 * SCALE
THING = "dev-1"
TOPIC = f"$aws/things/{THING}/tunnels/notify"
NUCLEUS_ENV = {
    "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT": "/greengrass/v2/ipc.socket",
    "SVCUID": "svcuid-test",
}


def _done_future() -> concurrent.futures.Future[None]:
    future: concurrent.futures.Future[None] = concurrent.futures.Future()
    future.set_result(None)
    return future


def _on_sdk_thread(function, *args):
    # The CRT calls stream handlers on its event-loop thread, never the asyncio one.
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(function(*args)))
    thread.start()
    thread.join()
    return result[0]


class FakeOperation:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> concurrent.futures.Future[None]:
        self.closed = True
        return _done_future()


class FakeIpcClient:
    """
    Records the subscription and fires its callbacks from a foreign thread.
    """

    def __init__(self, nucleus: FakeNucleus, refuse: Exception | None = None) -> None:
        self.nucleus = nucleus
        self.refuse = refuse
        self.subscriptions: list[tuple[str, str]] = []
        self.operation = FakeOperation()
        self.closed = False
        self._handlers: dict[str, object] = {}

    def subscribe_to_iot_core(
        self, *, topic_name, qos, on_stream_event, on_stream_error, on_stream_closed
    ):
        if self.refuse is not None:
            raise self.refuse
        self.subscriptions.append((topic_name, qos))
        self._handlers = {
            "event": on_stream_event,
            "error": on_stream_error,
            "closed": on_stream_closed,
        }
        self.nucleus.note_subscribed()
        return model.SubscribeToIoTCoreResponse(), self.operation

    def close(self) -> concurrent.futures.Future[None]:
        self.closed = True
        return _done_future()

    def publish(self, payload: bytes | None, topic: str = TOPIC) -> None:
        message = model.MQTTMessage(topic_name=topic, payload=payload)
        _on_sdk_thread(self._handlers["event"], model.IoTCoreMessage(message=message))

    def fail(self, error: Exception) -> bool:
        close = _on_sdk_thread(self._handlers["error"], error)
        if close:
            _on_sdk_thread(self._handlers["closed"])
        return bool(close)


class FakeNucleus:
    """
    The client factory: a new FakeIpcClient per connection, or a scripted failure.
    """

    def __init__(self, *, failures: list[Exception] | None = None) -> None:
        self.clients: list[FakeIpcClient] = []
        self.failures = list(failures or [])
        self.refusals: list[Exception] = []
        self.connects = 0
        self.subscribed = 0
        self._events: asyncio.Queue[None] = asyncio.Queue()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None

    def __call__(self) -> FakeIpcClient:
        self.connects += 1
        if self.failures:
            raise self.failures.pop(0)
        client = FakeIpcClient(self, self.refusals.pop(0) if self.refusals else None)
        self.clients.append(client)
        return client

    @property
    def current(self) -> FakeIpcClient:
        return self.clients[-1]

    def note_subscribed(self) -> None:
        # Called on the source's worker thread, like the SDK's blocking subscribe.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._events.put_nowait, None)

    async def wait_subscribed(self, total: int) -> None:
        async with asyncio.timeout(TIMEOUT):
            while self.subscribed < total:
                await self._events.get()
                self.subscribed += 1


def make_source(nucleus: FakeNucleus, **kwargs) -> GreengrassNotificationSource:
    kwargs.setdefault("thing_name", THING)
    kwargs.setdefault("retry_initial", 0.01 * SCALE)
    kwargs.setdefault("retry_max", 0.05 * SCALE)
    return GreengrassNotificationSource(client_factory=nucleus, **kwargs)


async def receive(source: GreengrassNotificationSource, count: int) -> list[RawNotification]:
    received: list[RawNotification] = []
    async with asyncio.timeout(TIMEOUT):
        async for notification in source:
            received.append(notification)
            if len(received) == count:
                break
    return received


class TestSubscription:
    async def test_subscribes_to_the_thing_notify_topic_at_least_once(self):
        """The source subscribes to $aws/things/<thing>/tunnels/notify with QoS 1."""
        nucleus = FakeNucleus()
        async with make_source(nucleus):
            subscriptions = nucleus.current.subscriptions

        assert subscriptions == [(TOPIC, "1")]
        assert model.QOS.AT_LEAST_ONCE == QOS_AT_LEAST_ONCE

    async def test_thing_name_comes_from_the_nucleus_environment(self):
        """Without an explicit name the source uses $AWS_IOT_THING_NAME."""
        source = GreengrassNotificationSource(
            client_factory=FakeNucleus(), environ={"AWS_IOT_THING_NAME": "gg-core-7"}
        )

        assert source.topic == "$aws/things/gg-core-7/tunnels/notify"

    def test_missing_thing_name_is_a_config_error(self):
        """No name and no $AWS_IOT_THING_NAME is a configuration error (exit 78)."""
        with pytest.raises(ConfigError, match="AWS_IOT_THING_NAME"):
            GreengrassNotificationSource(client_factory=FakeNucleus(), environ={})

    @pytest.mark.parametrize("name", ["dev/#", "+", "a b", "x" * 129])
    def test_thing_name_cannot_widen_the_subscription(self, name):
        """A name with MQTT wildcards, '/' or spaces is refused before subscribing."""
        with pytest.raises(ConfigError, match="does not match"):
            GreengrassNotificationSource(client_factory=FakeNucleus(), thing_name=name)

    def test_implements_the_notification_source_protocol(self):
        """The source satisfies the runtime-checkable protocol of docs/architecture.md §5.1."""
        source = make_source(FakeNucleus())

        assert isinstance(source, NotificationSource)


class TestDelivery:
    async def test_payloads_arrive_raw_and_in_order(self):
        """Payload bytes from the SDK thread arrive unchanged, in order, with their topic."""
        nucleus = FakeNucleus()
        payloads = [b'{"clientAccessToken":"tok-1","clientMode":"destination"}', b"{}", b""]
        async with make_source(nucleus) as source:
            for payload in payloads:
                nucleus.current.publish(payload)
            received = await receive(source, 3)

        assert received == [RawNotification(TOPIC, p) for p in payloads]

    async def test_malformed_payload_is_handed_over_raw(self):
        """Bytes that are not JSON are still delivered: validation happens downstream."""
        nucleus = FakeNucleus()
        async with make_source(nucleus) as source:
            nucleus.current.publish(b"\xff\xfe{not json")
            nucleus.current.publish(None)
            received = await receive(source, 2)

        assert [n.payload for n in received] == [b"\xff\xfe{not json", b""]

    async def test_payload_never_reaches_the_logs(self):
        """A delivered notification's token appears in no log event."""
        nucleus = FakeNucleus()
        with capture_logs() as logs:
            async with make_source(nucleus) as source:
                nucleus.current.publish(b'{"clientAccessToken":"SECRET-TOKEN-123"}')
                await receive(source, 1)

        assert "SECRET-TOKEN-123" not in repr(logs)
        assert [e["event"] for e in logs] == ["notify_subscribed"]

    async def test_a_backlog_is_kept_whole_and_logged(self):
        """Far more notifications than the backlog warning: all kept, in order, one warning."""
        nucleus = FakeNucleus()
        payloads = [b"n%d" % index for index in range(250)]
        with capture_logs() as logs:
            async with make_source(nucleus) as source:
                for payload in payloads:
                    nucleus.current.publish(payload)
                # publish() returned after call_soon_threadsafe: one loop pass delivers all.
                await asyncio.sleep(0)
                waiting = source.waiting
                received = await receive(source, len(payloads))

        assert waiting == 250
        assert [n.payload for n in received] == payloads
        assert [e for e in logs if e["event"] == "notification_backlog"] == [
            {
                "event": "notification_backlog",
                "log_level": "warning",
                "source": "greengrass",
                "waiting": 101,
            }
        ]

    async def test_acknowledgement_is_a_no_op(self):
        """IPC cannot acknowledge: ack() only records that the daemon handled the notification."""
        nucleus = FakeNucleus()
        async with make_source(nucleus) as source:
            nucleus.current.publish(b"one")
            (notification,) = await receive(source, 1)
            before = notification.ack.done
            notification.ack()
            notification.ack()

        assert (before, notification.ack.done) == (False, True)


class TestStreamErrors:
    async def test_stream_error_is_logged_and_resubscribed_on_a_fresh_connection(self):
        """An error closes the stream; the source reconnects, resubscribes and delivers again."""
        nucleus = FakeNucleus()
        with capture_logs() as logs:
            async with make_source(nucleus) as source:
                first = nucleus.current
                closed = first.fail(model.ServiceError(message="nucleus hiccup"))
                await nucleus.wait_subscribed(2)
                nucleus.current.publish(b"after")
                received = await receive(source, 1)
                resubscriptions = source.resubscriptions

        assert closed is True
        assert resubscriptions == 1
        assert first.closed
        assert first.operation.closed
        assert len(nucleus.clients) == 2
        assert nucleus.current.subscriptions == [(TOPIC, "1")]
        assert received == [RawNotification(TOPIC, b"after")]
        errors = [e for e in logs if e["event"] == "notify_stream_error"]
        assert [(e["error_type"], e["log_level"]) for e in errors] == [("ServiceError", "warning")]

    async def test_resubscription_retries_until_the_nucleus_is_back(self):
        """Failed reconnects are retried with backoff until one succeeds."""
        nucleus = FakeNucleus()
        with capture_logs() as logs:
            async with make_source(nucleus) as source:
                nucleus.failures = [ConnectionError("nucleus restarting")] * 3
                nucleus.current.fail(model.ServiceError(message="gone"))
                await nucleus.wait_subscribed(2)
                nucleus.current.publish(b"back")
                received = await receive(source, 1)

        assert received == [RawNotification(TOPIC, b"back")]
        assert source.resubscriptions == 1
        assert nucleus.connects == 5
        assert [e["event"] for e in logs].count("notify_resubscribe_failed") == 3
        assert [e["event"] for e in logs].count("reconnect_scheduled") == 4

    async def test_late_callbacks_of_a_replaced_stream_are_ignored(self):
        """Events from the stream that was replaced are not delivered."""
        nucleus = FakeNucleus()
        async with make_source(nucleus) as source:
            old = nucleus.current
            old.fail(model.ServiceError(message="x"))
            await nucleus.wait_subscribed(2)
            old.publish(b"stale")
            nucleus.current.publish(b"fresh")
            received = await receive(source, 1)

        assert received == [RawNotification(TOPIC, b"fresh")]


class TestLifecycle:
    async def test_exit_closes_stream_and_connection_and_ends_iteration(self):
        """Leaving the context closes the operation and client; iteration then ends."""
        nucleus = FakeNucleus()
        source = make_source(nucleus)
        async with source:
            client = nucleus.current
        async with asyncio.timeout(TIMEOUT):
            remaining = [n async for n in source]

        assert remaining == []
        assert client.operation.closed
        assert client.closed

    async def test_exit_stops_a_pending_resubscription(self):
        """Closing while a reconnect is being retried stops retrying."""
        nucleus = FakeNucleus()
        async with make_source(nucleus, retry_initial=10.0, retry_max=10.0):
            nucleus.current.fail(model.ServiceError(message="x"))
            await asyncio.sleep(0.05 * SCALE)
        connects = nucleus.connects

        assert connects == 1

    async def test_stream_closed_after_exit_does_not_resubscribe(self):
        """The closed callback fired by our own shutdown does not start a reconnect."""
        nucleus = FakeNucleus()
        async with make_source(nucleus):
            client = nucleus.current
        _on_sdk_thread(client._handlers["closed"])
        await asyncio.sleep(0.05 * SCALE)

        assert nucleus.connects == 1

    async def test_connect_failure_is_a_notification_error(self):
        """A nucleus that refuses the connection surfaces as NotificationError."""
        nucleus = FakeNucleus(failures=[ConnectionRefusedError("no socket")])
        with pytest.raises(NotificationError, match="cannot connect") as info:
            async with make_source(nucleus):
                pass

        assert isinstance(info.value.__cause__, ConnectionRefusedError)

    async def test_unauthorized_subscription_is_a_notification_error(self):
        """Missing accessControl (UnauthorizedError) fails clearly and closes the client."""
        nucleus = FakeNucleus()
        nucleus.refusals = [model.UnauthorizedError(message="not authorized")]
        with pytest.raises(NotificationError, match=r"SubscribeToIoTCore .* UnauthorizedError"):
            async with make_source(nucleus):
                pass

        assert nucleus.current.closed

    async def test_real_sdk_without_a_nucleus_fails_cleanly(self, tmp_path, monkeypatch):
        """The real SDK client, pointed at a socket nobody listens on, raises NotificationError."""
        monkeypatch.setenv(
            "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", str(tmp_path / "ipc.socket")
        )
        monkeypatch.setenv("SVCUID", "not-a-real-token")
        source = GreengrassNotificationSource(thing_name=THING)
        with pytest.raises(NotificationError, match="cannot connect"):
            async with asyncio.timeout(TIMEOUT * 3), source:
                pass


class TestSelection:
    def test_auto_picks_greengrass_under_the_nucleus(self):
        """With both nucleus IPC variables set, auto resolves to greengrass and loads this class."""
        cls = load_source_class("auto", NUCLEUS_ENV)

        assert resolve_kind("auto", NUCLEUS_ENV) == "greengrass"
        assert cls is GreengrassNotificationSource

    @pytest.mark.parametrize("missing", sorted(NUCLEUS_ENV))
    def test_auto_falls_back_to_mqtt_without_the_nucleus(self, missing):
        """Without either IPC variable, auto resolves to mqtt."""
        env = {k: v for k, v in NUCLEUS_ENV.items() if k != missing}

        assert resolve_kind("auto", env) == "mqtt"

    def test_explicit_greengrass_ignores_the_environment(self):
        """Setting notify = "greengrass" loads this class even outside the nucleus."""
        cls = load_source_class("greengrass", {})

        assert cls is GreengrassNotificationSource
