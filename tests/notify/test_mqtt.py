"""Tests for the device-side MQTT notification source (agent/notify/mqtt.py), against mosquitto."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket

import pytest
from structlog.testing import capture_logs

from agent.emulator.broker import notify_topic
from agent.exceptions import ConfigError, NotificationError
from agent.notify import load_source_class
from agent.notify.base import NotificationSource, RawNotification
from agent.notify.mqtt import MqttNotificationSource
from tests.emulator import fixtures
from tests.emulator.fixtures import SCALE, mqtt_client


broker = fixtures.broker
mqtt_pki = fixtures.mqtt_pki

PAYLOAD = (
    b'{"clientAccessToken":"secret-token-value-0123456789","clientMode":"destination",'
    b'"region":"us-east-1","services":["SSH"]}'
)


def _source(pki, port, name="thing1", **options):
    pair = pki.thing(name)
    options.setdefault("min_reconnect_delay", 0.05)
    options.setdefault("max_reconnect_delay", 0.5)
    options.setdefault("connect_timeout", 5 * SCALE)
    return MqttNotificationSource(
        thing_name=name,
        endpoint="127.0.0.1",
        port=port,
        cert=pair.cert,
        key=pair.key,
        ca=pki.ca_file,
        **options,
    )


@contextlib.asynccontextmanager
async def _service(pki, port):
    async with mqtt_client(pki, port, pki.admin, "emulator") as client:
        yield client


async def _first(source):
    async with asyncio.timeout(5 * SCALE):
        async for notification in source:
            return notification
    return None


async def _take(source, count):
    taken = []
    async with asyncio.timeout(5 * SCALE):
        async for notification in source:
            taken.append(notification)
            if len(taken) == count:
                break
    return taken


async def _until(predicate):
    # Polling: the counters change in CRT callbacks; there is no event to wait on.
    async with asyncio.timeout(10 * SCALE):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def _events(logs, name):
    return [entry for entry in logs if entry["event"] == name]


class TestReceive:
    async def test_receives_raw_payload(self, broker, mqtt_pki):
        """A notification published to the thing's topic arrives as the exact raw bytes."""
        async with _source(mqtt_pki, broker.port) as source, _service(mqtt_pki, broker.port) as svc:
            await svc.publish(notify_topic("thing1"), PAYLOAD)
            notification = await _first(source)

        assert notification == RawNotification(topic=notify_topic("thing1"), payload=PAYLOAD)

    async def test_malformed_payload_is_passed_through(self, broker, mqtt_pki):
        """The source does not parse: even non-JSON bytes are handed over unchanged."""
        async with _source(mqtt_pki, broker.port) as source, _service(mqtt_pki, broker.port) as svc:
            await svc.publish(notify_topic("thing1"), b"\xff\x00not json")
            notification = await _first(source)

        assert notification is not None
        assert notification.payload == b"\xff\x00not json"

    async def test_connection_logs(self, broker, mqtt_pki):
        """Connecting logs mqtt_connected and mqtt_subscribed with reason codes, no token."""
        with capture_logs() as logs:
            async with (
                _source(mqtt_pki, broker.port) as source,
                _service(mqtt_pki, broker.port) as svc,
            ):
                await svc.publish(notify_topic("thing1"), PAYLOAD)
                await _first(source)

        connected = _events(logs, "mqtt_connected")
        assert [(e["session_present"], e["reason_code"]) for e in connected] == [(False, "SUCCESS")]
        assert connected[0]["client_id"] == "thing1"
        assert _events(logs, "mqtt_subscribed") == [
            {
                "event": "mqtt_subscribed",
                "log_level": "info",
                "topic": notify_topic("thing1"),
                "reason_codes": ["GRANTED_QOS_1"],
            }
        ]
        assert [e["reason"] for e in _events(logs, "mqtt_disconnected")] == ["stopped"]
        assert b"secret-token-value" not in repr(logs).encode()

    async def test_iteration_ends_on_exit(self, broker, mqtt_pki):
        """An `async for` waiting on the source ends once the source is exited."""
        received: list[RawNotification] = []

        async def consume(source):
            received.extend([notification async for notification in source])

        async with _source(mqtt_pki, broker.port) as source:
            task = asyncio.create_task(consume(source))
            await asyncio.sleep(0.05)
        async with asyncio.timeout(2 * SCALE):
            await task

        assert received == []
        assert task.done()

    async def test_receive_maximum_holds_back_the_rest(self, broker, mqtt_pki):
        """Unacknowledged, only receive_maximum notifications come; acknowledged, all of them."""
        async with (
            _source(mqtt_pki, broker.port, receive_maximum=3) as source,
            _service(mqtt_pki, broker.port) as svc,
        ):
            for n in range(8):
                await svc.publish(notify_topic("thing1"), b"n%d" % n)
            await _until(lambda: source.waiting == 3)
            await asyncio.sleep(0.5 * SCALE)  # time for a 4th to arrive, if it were sent
            held = source.waiting
            received = []
            # Mosquitto 2.0.11 releases more than one message per PUBACK after the first
            # window: count what comes rather than expecting one per acknowledgement.
            async with asyncio.timeout(5 * SCALE):
                async for notification in source:
                    received.append(notification)
                    notification.ack()
                    if len(received) == 8:
                        break
            unacknowledged = source.unacknowledged

        assert held == 3
        assert [n.payload for n in received] == [b"n%d" % n for n in range(8)]
        assert unacknowledged == 0

    async def test_acknowledgement_is_idempotent(self, broker, mqtt_pki):
        """Acknowledging twice sends one PUBACK: the in-flight count goes down once."""
        async with _source(mqtt_pki, broker.port) as source, _service(mqtt_pki, broker.port) as svc:
            await svc.publish(notify_topic("thing1"), b"a")
            await svc.publish(notify_topic("thing1"), b"b")
            a, b = await _take(source, 2)
            a.ack()
            a.ack()
            counted = source.unacknowledged
            b.ack()

        assert counted == 1
        assert a.ack.done
        assert b.ack.done

    async def test_wait_subscribed_after_early_return(self, broker, mqtt_pki):
        """If __aenter__ stops waiting early, wait_subscribed() still reports the SUBACK."""
        async with _source(mqtt_pki, broker.port, connect_timeout=0) as source:
            early = source.subscribed
            async with asyncio.timeout(5 * SCALE):
                await source.wait_subscribed()
            later = source.subscribed

        assert early is False
        assert later is True

    def test_satisfies_protocol_and_registry(self, mqtt_pki):
        """The class is what the registry loads for "mqtt" and fits NotificationSource."""
        source = _source(mqtt_pki, 8883)

        assert isinstance(source, NotificationSource)
        assert load_source_class("mqtt") is MqttNotificationSource
        assert (source.client_id, source.topic) == ("thing1", notify_topic("thing1"))


class TestPersistentSession:
    async def test_receives_what_was_published_while_away(self, broker, mqtt_pki):
        """A notification published while the device was disconnected arrives on reconnection."""
        async with _source(mqtt_pki, broker.port):
            pass
        async with _service(mqtt_pki, broker.port) as svc:
            queued = await svc.publish(notify_topic("thing1"), PAYLOAD)

        with capture_logs() as logs:
            async with _source(mqtt_pki, broker.port) as source:
                notification = await _first(source)

        assert queued == 0  # the broker counted the stored session as a subscriber
        assert notification is not None
        assert notification.payload == PAYLOAD
        assert [e["session_present"] for e in _events(logs, "mqtt_connected")] == [True]

    async def test_reconnects_after_broker_restart(self, broker, mqtt_pki):
        """After a broker restart the source reconnects into its session and still receives."""
        with capture_logs() as logs:
            async with _source(mqtt_pki, broker.port) as source:
                await broker.restart()
                await _until(lambda: source.connections == 2 and source.connected)
                async with _service(mqtt_pki, broker.port) as svc:
                    await svc.publish(notify_topic("thing1"), PAYLOAD)
                notification = await _first(source)
                subscriptions = source.subscriptions

        assert notification is not None
        assert notification.payload == PAYLOAD
        assert [e["session_present"] for e in _events(logs, "mqtt_connected")] == [False, True]
        assert subscriptions == 1  # the resumed session kept the subscription
        assert len(_events(logs, "mqtt_disconnected")) == 2  # the outage, then the stop

    async def test_resubscribes_when_session_is_lost(self, broker, mqtt_pki):
        """When the CONNACK says no session is present the source subscribes again."""
        async with _source(mqtt_pki, broker.port) as source:
            await broker.stop()
            for path in broker.data_dir.iterdir():
                path.unlink()  # the broker forgets every session
            await broker.start()
            await _until(lambda: source.subscriptions == 2)
            async with _service(mqtt_pki, broker.port) as svc:
                await svc.publish(notify_topic("thing1"), PAYLOAD)
            notification = await _first(source)

        assert notification is not None
        assert notification.payload == PAYLOAD

    async def test_unacknowledged_is_redelivered_on_the_next_start(self, broker, mqtt_pki):
        """Received but never acknowledged: it comes again; an acknowledged one does not."""
        async with _source(mqtt_pki, broker.port) as source, _service(mqtt_pki, broker.port) as svc:
            await svc.publish(notify_topic("thing1"), b"handled")
            await svc.publish(notify_topic("thing1"), b"interrupted")
            handled, _interrupted = await _take(source, 2)
            handled.ack()
            await asyncio.sleep(0.2 * SCALE)  # let the PUBACK reach the broker

        async with _source(mqtt_pki, broker.port) as again:
            (redelivered,) = await _take(again, 1)
            redelivered.ack()
            await asyncio.sleep(0.5 * SCALE)  # anything else would arrive now
            extra = again.waiting

        assert redelivered.payload == b"interrupted"
        assert extra == 0

    async def test_unacknowledged_is_redelivered_after_a_broker_restart(self, broker, mqtt_pki):
        """Unacknowledged when the connection drops: sent again on the resumed session."""
        with capture_logs() as logs:
            async with (
                _source(mqtt_pki, broker.port) as source,
                _service(mqtt_pki, broker.port) as svc,
            ):
                await svc.publish(notify_topic("thing1"), PAYLOAD)
                (first,) = await _take(source, 1)
                await broker.restart()
                (second,) = await _take(source, 1)
                first.ack()  # its PUBACK died with the connection: a no-op
                counted = source.unacknowledged
                second.ack()
                after = source.unacknowledged

        assert first.payload == second.payload == PAYLOAD
        assert (counted, after) == (1, 0)
        assert [e["session_present"] for e in _events(logs, "mqtt_connected")] == [False, True]

    async def test_session_expiry_requested(self, broker, mqtt_pki):
        """The CONNECT asks for a session of at least an hour (the broker logs it as c0)."""
        async with _source(mqtt_pki, broker.port, session_expiry=7200) as source:
            pass
        log = broker.log_file.read_text()

        assert source.session_expiry == 7200
        assert "as thing1 (p5, c0, k1200, u'thing1')" in log


class TestFailures:
    async def test_subscription_refused(self, broker, mqtt_pki):
        """A thing the broker does not authorize gets NotificationError from __aenter__."""
        source = _source(mqtt_pki, broker.port, name="thing3")

        with pytest.raises(NotificationError, match="NOT_AUTHORIZED"):
            await source.__aenter__()

        assert source.subscribed is False

    async def test_unreachable_broker_does_not_block_startup(self, mqtt_pki):
        """With no broker, __aenter__ returns after connect_timeout and keeps retrying."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with capture_logs() as logs:
            async with _source(mqtt_pki, port, connect_timeout=0.3 * SCALE) as source:
                await _until(lambda: len(_events(logs, "mqtt_connect_failed")) >= 2)
                connected = source.connected

        assert connected is False
        assert _events(logs, "mqtt_connect_pending")[0]["port"] == port
        assert _events(logs, "mqtt_connect_failed")[0]["error"] == (
            "AWS_IO_SOCKET_CONNECTION_REFUSED"
        )

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"thing_name": "a/#"}, "does not match"),
            ({"session_expiry": 60}, "session_expiry"),
            ({"receive_maximum": 0}, "receive_maximum"),
            ({"receive_maximum": 101}, "receive_maximum"),
            ({"min_reconnect_delay": 5, "max_reconnect_delay": 2}, "reconnect delays"),
            ({"reconnect_reset_after": 0}, "reconnect_reset_after"),
            ({"http_proxy": "socks5://127.0.0.1:1080"}, "only http"),
            ({"http_proxy": "http://127.0.0.1:99999"}, "bad port"),
            ({"http_proxy": "http://:8080"}, "no host"),
        ],
    )
    def test_config_errors(self, mqtt_pki, options, message):
        """Invalid settings fail at construction with ConfigError, never echoing a proxy URL."""
        pair = mqtt_pki.thing("thing1")
        settings = {
            "thing_name": "thing1",
            "endpoint": "127.0.0.1",
            "cert": pair.cert,
            "key": pair.key,
            **options,
        }

        with pytest.raises(ConfigError, match=message) as caught:
            MqttNotificationSource(**settings)

        assert "1080" not in str(caught.value)


class _ConnectProxy:
    """A minimal HTTP CONNECT proxy on 127.0.0.1 that records each request head."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info):
        assert self.server is not None
        self.server.close()
        for writer in self._writers:
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _handle(self, reader, writer):
        self._writers.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        host, _, port = head.split(b" ")[1].decode().rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        self._writers.append(up_writer)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        for task in (
            asyncio.create_task(pipe(reader, up_writer)),
            asyncio.create_task(pipe(up_reader, writer)),
        ):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


class TestHttpProxy:
    async def test_connects_through_proxy(self, broker, mqtt_pki):
        """With http_proxy the TLS connection is tunnelled through CONNECT, with basic auth."""
        async with _ConnectProxy() as proxy:
            url = f"http://agent:p%40ss@127.0.0.1:{proxy.port}"
            async with (
                _source(mqtt_pki, broker.port, http_proxy=url) as source,
                _service(mqtt_pki, broker.port) as svc,
            ):
                await svc.publish(notify_topic("thing1"), PAYLOAD)
                notification = await _first(source)

        head = proxy.requests[0].decode()
        assert notification is not None
        assert notification.payload == PAYLOAD
        assert head.startswith(f"CONNECT 127.0.0.1:{broker.port} HTTP/1.1\r\n")
        credentials = base64.b64encode(b"agent:p@ss").decode()
        assert f"Proxy-Authorization: Basic {credentials}\r\n" in head
