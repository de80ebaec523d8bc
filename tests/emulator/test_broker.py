"""Tests for the mosquitto child (agent/emulator/broker.py), against a real mosquitto 2.0."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import ssl
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import structlog.testing

from agent.emulator import broker as broker_module
from agent.emulator.broker import (
    Broker,
    BrokerError,
    find_mosquitto,
    notify_topic,
    register_things,
)
from agent.emulator.mqtt_client import MqttConnectError
from tests.emulator import fixtures
from tests.emulator.fixtures import SCALE, alive, make_pki, mqtt_client


broker = fixtures.broker
mqtt_pki = fixtures.mqtt_pki


# MQTT5 reason codes (OASIS MQTT 5.0 §2.4).
GRANTED_QOS_1 = 1
NO_MATCHING_SUBSCRIBERS = 16
NOT_AUTHORIZED = 135
IS_ROOT = os.geteuid() == 0


def _uids(pid: int | None) -> list[int]:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return [int(field) for field in line.split()[1:]]


class TestAcl:
    async def test_thing_receives_its_notification(self, broker, mqtt_pki):
        """thing1 gets exactly the bytes the privileged identity publishes on its topic."""
        payload = b'{"clientAccessToken":"t","clientMode":"destination"}'
        async with (
            mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing1"), "thing1") as device,
            mqtt_client(mqtt_pki, broker.port, mqtt_pki.admin, "emulator") as service,
        ):
            granted = await device.subscribe(notify_topic("thing1"))
            puback = await service.publish(notify_topic("thing1"), payload)
            async with asyncio.timeout(5 * SCALE):
                message = await device.receive()

        assert granted == [GRANTED_QOS_1]
        assert puback == 0
        assert (message.topic, message.payload) == (notify_topic("thing1"), payload)

    @pytest.mark.parametrize(
        "topic_filter",
        [
            "$aws/things/thing2/tunnels/notify",
            "$aws/things/+/tunnels/notify",
            "$aws/things/thing1/tunnels/#",
            "#",
            "$aws/#",
        ],
    )
    async def test_thing_cannot_subscribe_elsewhere(self, broker, mqtt_pki, topic_filter):
        """Any filter but the thing's own notify topic gets SUBACK 0x87 (not authorized)."""
        async with mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing1"), "thing1") as device:
            codes = await device.subscribe(topic_filter)

        assert codes == [NOT_AUTHORIZED]

    @pytest.mark.parametrize(
        "topic",
        ["$aws/things/thing1/tunnels/notify", "$aws/things/thing2/tunnels/notify", "foo/bar"],
    )
    async def test_thing_cannot_publish(self, broker, mqtt_pki, topic):
        """Mosquitto 2.0.11 answers a thing's QoS 1 PUBLISH with PUBACK 0x87 and drops it."""
        async with (
            mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing2"), "thing2") as victim,
            mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing1"), "thing1") as attacker,
        ):
            await victim.subscribe(notify_topic("thing2"))
            puback = await attacker.publish(topic, b"forged")
            await asyncio.sleep(0.2 * SCALE)
            delivered = victim.pending()

        assert puback == NOT_AUTHORIZED
        assert delivered == []

    async def test_privileged_identity_publishes_only_notify(self, broker, mqtt_pki):
        """The emulator identity may publish to notify topics (16: no subscriber), nowhere else."""
        async with mqtt_client(mqtt_pki, broker.port, mqtt_pki.admin, "emulator") as service:
            notify = await service.publish(notify_topic("nobody"), b"x")
            other = await service.publish("foo", b"x")

        assert notify == NO_MATCHING_SUBSCRIBERS
        assert other == NOT_AUTHORIZED

    async def test_unregistered_thing_until_added(self, broker, mqtt_pki):
        """A valid certificate of an unknown thing is refused until add_thing registers it live."""
        async with mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing3"), "thing3") as dev:
            before = await dev.subscribe(notify_topic("thing3"))
            await broker.add_thing("thing3")
            after = await dev.subscribe(notify_topic("thing3"))

        assert before == [NOT_AUTHORIZED]
        assert after == [GRANTED_QOS_1]
        assert "thing3" in broker.things

    async def test_register_is_idempotent(self, broker, mqtt_pki):
        """Registering an existing thing again succeeds and leaves it subscribable."""
        await register_things(
            host=broker.host,
            port=broker.port,
            ca_file=mqtt_pki.ca_file,
            admin=mqtt_pki.admin,
            names=["thing1", "thing1"],
        )
        async with mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing1"), "thing1") as device:
            codes = await device.subscribe(notify_topic("thing1"))

        assert codes == [GRANTED_QOS_1]

    async def test_register_needs_privileged_identity(self, broker, mqtt_pki):
        """A thing certificate cannot use the dynamic-security control topic."""
        control = "$CONTROL/dynamic-security/v1"
        command = json.dumps({"commands": [{"command": "createClient", "username": "evil"}]})
        async with mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing1"), "thing1") as dev:
            subscribed = await dev.subscribe(f"{control}/response")
            published = await dev.publish(control, command.encode())
        with pytest.raises(BrokerError, match="NOT_AUTHORIZED"):
            # register_things connects under the emulator's admin client id: refused at once.
            await register_things(
                host=broker.host,
                port=broker.port,
                ca_file=mqtt_pki.ca_file,
                admin=mqtt_pki.thing("thing1"),
                names=["evil"],
            )

        assert subscribed == [NOT_AUTHORIZED]
        assert published == NOT_AUTHORIZED
        assert "evil" not in broker.dynsec_file.read_text()

    async def test_invalid_thing_name(self, broker):
        """A name with MQTT wildcards or '/' is refused before reaching the ACL."""
        with pytest.raises(ValueError, match="invalid thing name"):
            await broker.add_thing("a/+")


def _mosquitto_sub(broker: Broker, pki, pair, *options: str) -> subprocess.CompletedProcess[str]:
    """Run mosquitto_sub (another MQTT stack than awscrt) once against the broker."""
    return subprocess.run(
        [
            "mosquitto_sub",
            *("-h", "127.0.0.1", "-p", str(broker.port), "--cafile", str(pki.ca_file)),
            *("--cert", str(pair.cert), "--key", str(pair.key)),
            *("-t", notify_topic("thing2"), "-C", "1", "-W", str(int(3 * SCALE))),
            *options,
        ],
        capture_output=True,
        text=True,
        timeout=30 * SCALE,
        check=False,
    )


class TestClientId:
    async def test_other_thing_cannot_take_a_things_client_id(self, broker, mqtt_pki):
        """thing2's certificate with client id thing1 gets CONNACK 0x87; thing1 stays and hears."""
        impostor = mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing2"), "thing1")
        async with (
            mqtt_client(mqtt_pki, broker.port, mqtt_pki.thing("thing1"), "thing1") as device,
            mqtt_client(mqtt_pki, broker.port, mqtt_pki.admin, "emulator") as service,
        ):
            await device.subscribe(notify_topic("thing1"))
            with pytest.raises(MqttConnectError, match="CONNACK NOT_AUTHORIZED"):
                await impostor.connect()
            await service.publish(notify_topic("thing1"), b"after the attempt")
            async with asyncio.timeout(5 * SCALE):
                message = await device.receive()
            still = (device.connected, device.connections)

        assert still == (True, 1)
        assert message.payload == b"after the attempt"
        assert impostor.connections == 0
        # Mosquitto never saw the impostor: the gate answered it.
        assert "u'thing2'" not in broker.log_file.read_text()

    @pytest.mark.parametrize(
        ("options", "exit_code", "error"),
        [
            (("-V", "mqttv311", "-i", "thing1"), 5, "Connection Refused: not authorised."),
            (("-V", "mqttv5", "-i", "thing1"), NOT_AUTHORIZED, "Not authorized"),
            (("-V", "mqttv311"), 5, "Connection Refused: not authorised."),  # a random id
        ],
    )
    async def test_refusal_in_every_protocol_version(
        self, broker, mqtt_pki, options, exit_code, error
    ):
        """MQTT 3.1.1 and 5 clients both get their version's "not authorized" CONNACK."""
        result = await asyncio.to_thread(
            _mosquitto_sub, broker, mqtt_pki, mqtt_pki.thing("thing2"), *options
        )

        assert (result.returncode, result.stderr.strip()) == (
            exit_code,
            f"Connection error: {error}",
        )

    async def test_own_name_connects(self, broker, mqtt_pki):
        """A thing's own name is accepted by mosquitto_sub too (it waits, then times out)."""
        result = await asyncio.to_thread(
            _mosquitto_sub,
            broker,
            mqtt_pki,
            mqtt_pki.thing("thing2"),
            "-V",
            "mqttv311",
            "-i",
            "thing2",
        )

        assert (result.returncode, result.stderr.strip()) == (27, "Timed out")

    async def test_emulator_identity_uses_any_client_id(self, broker, mqtt_pki):
        """The emulator's identity connects under several client ids at once."""
        async with (
            mqtt_client(mqtt_pki, broker.port, mqtt_pki.admin, "notifier") as one,
            mqtt_client(mqtt_pki, broker.port, mqtt_pki.admin, "admin-1234") as two,
        ):
            codes = [
                await one.publish(notify_topic("thing1"), b"x"),
                await two.publish(notify_topic("thing1"), b"y"),
            ]
            both = (one.connected, two.connected)

        assert both == (True, True)
        assert codes == [NO_MATCHING_SUBSCRIBERS, NO_MATCHING_SUBSCRIBERS]


class TestTls:
    @pytest.mark.parametrize(
        ("version", "reason"),
        [
            (ssl.TLSVersion.TLSv1_2, "SSLV3_ALERT_HANDSHAKE_FAILURE"),
            (ssl.TLSVersion.TLSv1_3, "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
        ],
    )
    async def test_client_without_certificate_refused(self, broker, mqtt_pki, version, reason):
        """Without a client certificate the broker aborts the TLS handshake with an alert."""
        context = ssl.create_default_context(cafile=str(mqtt_pki.ca_file))
        context.maximum_version = version

        async def handshake_and_read() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", broker.port, ssl=context)
            try:
                # TLS 1.3 checks the client certificate after the client's Finished: the
                # alert arrives on the first read. Writing first could race into a RST.
                return await reader.read(10)
            finally:
                writer.transport.abort()

        with pytest.raises(ssl.SSLError) as caught:
            await handshake_and_read()

        assert caught.value.reason == reason

    async def test_certificate_from_other_ca_refused(self, broker, mqtt_pki):
        """A certificate with a valid thing CN but from a foreign CA never connects."""
        client = mqtt_client(
            mqtt_pki, broker.port, mqtt_pki.foreign("thing1"), "thing1", connect_timeout=2 * SCALE
        )

        with (
            structlog.testing.capture_logs() as logs,
            pytest.raises(MqttConnectError, match=r"refused \(AWS_IO_TLS"),
        ):
            await client.connect()

        refusals = [e for e in logs if e["event"] == "mqtt_tls_refused"]
        assert refusals
        assert {e["reason"] for e in refusals} == {"CERTIFICATE_VERIFY_FAILED"}
        assert "New client connected" not in broker.log_file.read_text()

    async def test_server_certificate_checked_by_client(self, broker, mqtt_pki, tmp_path):
        """A client trusting another CA refuses the broker (the broker is authenticated too)."""
        other = make_pki(tmp_path / "other")
        client = mqtt_client(
            other,
            broker.port,
            mqtt_pki.thing("thing1"),
            "thing1",
            connect_timeout=1 * SCALE,
            stop_timeout=0.2 * SCALE,
        )

        # s2n delays reporting its own verification failure by 10-30 s ("blinding"), so
        # only the absence of any connection is observable quickly.
        with pytest.raises(MqttConnectError, match="no connection"):
            await client.connect()

        assert client.connections == 0


class TestLifecycle:
    async def test_restart_keeps_port_and_session(self, broker, mqtt_pki):
        """After a restart on the same port a persistent session still holds its subscription."""
        pair = mqtt_pki.thing("thing1")
        port = broker.port
        async with mqtt_client(mqtt_pki, port, pair, "thing1", session_expiry=3600) as device:
            await device.subscribe(notify_topic("thing1"))
        await broker.restart()
        async with mqtt_client(mqtt_pki, port, mqtt_pki.admin, "emulator") as service:
            queued = await service.publish(notify_topic("thing1"), b"while offline")
        async with mqtt_client(mqtt_pki, port, pair, "thing1", session_expiry=3600) as device:
            async with asyncio.timeout(5 * SCALE):
                message = await device.receive()
            resumed = device.connections

        assert broker.port == port
        assert queued == 0  # the stored session counts as a subscriber
        assert message.payload == b"while offline"
        assert resumed == 1

    async def test_stop_leaves_no_process(self, mqtt_pki, tmp_path):
        """stop() terminates and reaps mosquitto; a second stop() is harmless."""
        instance = Broker(tmp_path / "b", ca_file=mqtt_pki.ca_file, server=mqtt_pki.server)
        await instance.start()
        pid = instance.pid
        await instance.stop()
        await instance.stop()

        assert pid is not None
        assert not alive(pid)
        assert instance.pid is None
        assert "mosquitto version" in instance.log_file.read_text()

    async def test_files_and_modes(self, broker):
        """Config, plugin JSON and key copy are 0600; the config drops no privileges as root."""
        config = broker.config_file.read_text()
        dynsec = json.loads(broker.dynsec_file.read_text())

        assert stat.S_IMODE(broker.config_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((broker.directory / "server.key").stat().st_mode) == 0o600
        assert f"listener {broker.backend_port} 127.0.0.1" in config
        assert "require_certificate true" in config
        assert "use_identity_as_username true" in config
        assert ("user root" in config) is IS_ROOT
        assert sorted(c["username"] for c in dynsec["clients"]) == [
            "iot-tunnel-emulator.service",
            "thing1",
            "thing2",
        ]

    async def test_port_in_use(self, mqtt_pki, tmp_path):
        """An explicit port that is taken fails with a clear error and no process left."""
        blocker = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
        port = blocker.sockets[0].getsockname()[1]
        instance = Broker(
            tmp_path / "b",
            ca_file=mqtt_pki.ca_file,
            server=mqtt_pki.server,
            port=port,
        )
        try:
            with pytest.raises(BrokerError, match="already in use"):
                await instance.start()
        finally:
            blocker.close()
            await blocker.wait_closed()

        assert not instance.running

    async def test_missing_binary(self, mqtt_pki, tmp_path, monkeypatch):
        """Without mosquitto on PATH or in sbin the error says which package to install."""
        monkeypatch.setenv("PATH", str(tmp_path))
        monkeypatch.setattr(broker_module, "_SBIN", ())
        instance = Broker(tmp_path / "b", ca_file=mqtt_pki.ca_file, server=mqtt_pki.server)

        with pytest.raises(BrokerError, match="apt-get install mosquitto"):
            await instance.start()

    async def test_unusable_binary(self, mqtt_pki, tmp_path):
        """An explicit binary that cannot be executed is a BrokerError, not a bare OSError."""
        instance = Broker(
            tmp_path / "b",
            ca_file=mqtt_pki.ca_file,
            server=mqtt_pki.server,
            binary=str(tmp_path / "missing-mosquitto"),
        )

        with pytest.raises(BrokerError, match=r"cannot run .*missing-mosquitto: No such file"):
            await instance.start()

        assert not instance.running

    def test_find_mosquitto(self):
        """The Debian binary is found even when /usr/sbin is not on PATH."""
        assert Path(find_mosquitto()).name == "mosquitto"

    async def test_startup_failure_quotes_log(self, mqtt_pki, tmp_path):
        """A broker that exits during startup raises with its own error line."""
        (tmp_path / "bad.key").write_text("not a key")
        instance = Broker(
            tmp_path / "b",
            ca_file=mqtt_pki.ca_file,
            server=mqtt_pki.server.__class__(mqtt_pki.server.cert, tmp_path / "bad.key"),
        )

        with pytest.raises(BrokerError, match="Unable to load server key"):
            await instance.start()

        assert not instance.running


@pytest.mark.skipif(not IS_ROOT, reason="dropping privileges needs root")
class TestRunAs:
    @pytest.fixture
    def open_dir(self):
        # pytest's tmp_path sits below 0700 directories the mosquitto user cannot traverse.
        directory = Path(tempfile.mkdtemp(prefix="broker-run-as-", dir="/tmp"))
        directory.chmod(0o755)
        try:
            yield directory
        finally:
            for path in sorted(directory.rglob("*"), reverse=True):
                path.unlink() if not path.is_dir() or path.is_symlink() else path.rmdir()
            directory.rmdir()

    async def test_drops_to_mosquitto_user(self, open_dir):
        """run_as="mosquitto": the broker runs as that user, owns its files, and still works."""
        pki = make_pki(open_dir / "pki")
        user = pwd.getpwnam("mosquitto")
        instance = Broker(
            open_dir / "broker",
            ca_file=pki.ca_file,
            server=pki.server,
            things=["thing1"],
            run_as="mosquitto",
        )
        await instance.start()
        try:
            uids = _uids(instance.pid)
            async with (
                mqtt_client(pki, instance.port, pki.thing("thing1"), "thing1") as device,
                mqtt_client(pki, instance.port, pki.admin, "emulator") as service,
            ):
                await device.subscribe(notify_topic("thing1"))
                await instance.add_thing("thing9")  # the plugin rewrites its file as mosquitto
                await service.publish(notify_topic("thing1"), b"dropped")
                async with asyncio.timeout(5 * SCALE):
                    message = await device.receive()
        finally:
            await instance.stop()

        assert uids == [user.pw_uid] * 4
        assert instance.directory.stat().st_uid == user.pw_uid
        assert (instance.directory / "server.key").stat().st_uid == user.pw_uid
        assert stat.S_IMODE(pki.ca.key_file.stat().st_mode) == 0o600
        assert pki.ca.key_file.stat().st_uid == 0
        assert message.payload == b"dropped"

    async def test_untraversable_directory(self, tmp_path):
        """run_as with a directory the user cannot reach fails before starting mosquitto."""
        pki = make_pki(tmp_path / "pki")
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o700)
        instance = Broker(
            locked / "broker",
            ca_file=pki.ca_file,
            server=pki.server,
            run_as="mosquitto",
        )

        with pytest.raises(BrokerError, match="not traversable"):
            await instance.start()

        assert not instance.running
