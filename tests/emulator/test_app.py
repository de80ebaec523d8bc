"""Tests for the emulator application (agent/emulator/app.py): everything wired together."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import stat
import time
from typing import TYPE_CHECKING

import boto3
import pytest

from agent.daemon.settings import check_files, load_settings
from agent.emulator.app import Emulator
from agent.emulator.broker import notify_topic
from agent.emulator.mqtt_client import MqttConnectError
from tests.emulator import fixtures
from tests.emulator.fixtures import SCALE, alive, device_client, refused


if TYPE_CHECKING:
    from pathlib import Path

emulator = fixtures.emulator
emulator_thread = fixtures.emulator_thread


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _env_file(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


class TestLifecycle:
    async def test_start_and_stop_cleanly(self, tmp_path):
        """Every service listens while running; afterwards no port, process or endpoints file."""
        emu = Emulator(tmp_path / "emu")
        async with emu:
            broker_pid = emu.broker.pid
            host, mqtt_port = emu.mqtt_endpoint
            api_port = int(emu.api_url.rsplit(":", 1)[1])
            relay_port = int(emu.relay_endpoint.rsplit(":", 1)[1])
            running = json.loads(emu.endpoints_file.read_text())
            listening = [not await refused(host, p) for p in (api_port, relay_port, mqtt_port)]

        closed = [await refused(host, p) for p in (api_port, relay_port, mqtt_port)]
        assert listening == [True, True, True]
        assert closed == [True, True, True]
        assert broker_pid is not None
        assert not alive(broker_pid)
        assert running["mqtt"] == [host, mqtt_port]
        assert running["api"] == emu.api_url
        assert not emu.endpoints_file.exists()

    async def test_relay_serves_tls_with_emulator_ca(self, emulator):
        """The relay's certificate verifies against the emulator CA for 127.0.0.1."""
        host, port = emulator.relay_endpoint.rsplit(":", 1)
        context = ssl.create_default_context(cafile=str(emulator.ca_file))
        _reader, writer = await asyncio.open_connection(host, int(port), ssl=context)
        subject = writer.get_extra_info("peercert")["subject"]
        writer.close()
        await writer.wait_closed()

        assert subject == ((("commonName", "127.0.0.1"),),)

    async def test_listen_address_in_certificates(self, tmp_path):
        """With host="localhost" the broker and relay certificates name it first."""
        async with Emulator(tmp_path / "emu", host="localhost") as emu:
            _reader, writer = await asyncio.open_connection(
                "localhost",
                int(emu.relay_endpoint.rsplit(":", 1)[1]),
                ssl=ssl.create_default_context(cafile=str(emu.ca_file)),
            )
            subject = writer.get_extra_info("peercert")["subject"]
            writer.close()
            await writer.wait_closed()
            mqtt_host = emu.mqtt_endpoint[0]

        assert subject == ((("commonName", "localhost"),),)
        assert mqtt_host == "localhost"

    async def test_without_relay(self, tmp_path):
        """relay=False runs the control plane and MQTT only."""
        async with Emulator(tmp_path / "emu", relay=False) as emu:
            relay = emu.relay
            operator = _env_file(emu.operator_env)

        assert relay is None
        assert "TUNNEL_EMULATOR_RELAY_ENDPOINT" not in operator

    async def test_failed_start_cleans_up(self, tmp_path):
        """If a service cannot start, the broker already started is stopped again."""
        blocker = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
        port = blocker.sockets[0].getsockname()[1]
        emu = Emulator(tmp_path / "emu", api_port=port)
        try:
            with pytest.raises(OSError, match="address already in use"):
                await emu.__aenter__()
        finally:
            blocker.close()
            await blocker.wait_closed()

        assert not emu.broker.running
        assert not emu.endpoints_file.exists()


class TestThings:
    async def test_bundle_files_and_modes(self, emulator):
        """add_thing writes cert, 0600 key, CA copy and a config the agent's settings accept."""
        bundle = emulator.bundle("thing1")
        settings = load_settings(bundle.config)
        host, port = emulator.mqtt_endpoint

        assert _mode(bundle.key) == 0o600
        assert bundle.ca.read_bytes() == emulator.ca_file.read_bytes()
        assert settings.thing_name == "thing1"
        assert settings.notify == "mqtt"
        assert (settings.mqtt.endpoint, settings.mqtt.port) == (host, port)
        assert (settings.mqtt.cert, settings.mqtt.key) == (bundle.cert, bundle.key)
        assert settings.mqtt.ca == bundle.ca
        assert settings.proxy.endpoint == emulator.relay_endpoint
        assert settings.proxy.ca == bundle.ca
        assert dict(settings.services) == {"SSH": "22"}
        assert check_files(settings) == []

    async def test_added_while_running_can_subscribe_at_once(self, emulator):
        """A thing added to a running emulator is authorized before add_thing returns."""
        emulator.add_thing("late", services={"HTTP": "127.0.0.1:8080"})
        async with device_client(emulator, "late") as device:
            codes = await device.subscribe(notify_topic("late"))
        settings = load_settings(emulator.bundle("late").config)

        assert codes == [1]
        assert dict(settings.services) == {"HTTP": "127.0.0.1:8080"}

    async def test_added_async(self, emulator):
        """add_thing_async registers the thing without blocking the loop."""
        await emulator.add_thing_async("thing3")
        async with device_client(emulator, "thing3") as device:
            codes = await device.subscribe(notify_topic("thing3"))

        assert codes == [1]

    async def test_added_by_another_process_view(self, emulator):
        """An Emulator object that is not running registers with the running one's broker."""
        other = Emulator(emulator.directory)  # what `emulator add-thing` does
        other.add_thing("thing4")
        async with device_client(emulator, "thing4") as device:
            codes = await device.subscribe(notify_topic("thing4"))

        assert codes == [1]
        assert load_settings(other.bundle("thing4").config).mqtt.port == emulator.broker.port

    def test_stale_endpoints_file_ignored(self, tmp_path):
        """A leftover emulator.json of a dead emulator neither blocks nor feeds add-thing."""
        emu = Emulator(tmp_path / "emu")
        emu.endpoints_file.write_text(
            json.dumps({"mqtt": ["127.0.0.1", 1], "relay": "127.0.0.1:2", "pid": 2**22 + 1})
        )

        bundle = emu.add_thing("thing1")

        assert bundle.cert.exists()
        assert not bundle.config.exists()  # written at the next start, with real endpoints

    async def test_invalid_name(self, emulator):
        """A thing name outside [a-zA-Z0-9:_-] is refused."""
        with pytest.raises(ValueError, match="invalid thing name"):
            emulator.add_thing("a/b")


class TestNotification:
    async def test_open_tunnel_over_api_reaches_device(self, emulator):
        """boto3 OpenTunnel with thingName -> the thing receives the destination token."""
        async with device_client(emulator, "thing1") as device:
            codes = await device.subscribe(notify_topic("thing1"))
            response = await asyncio.to_thread(
                emulator.api_client().open_tunnel,
                destinationConfig={"thingName": "thing1", "services": ["SSH"]},
            )
            async with asyncio.timeout(5 * SCALE):
                message = await device.receive()

        assert codes == [1]
        assert json.loads(message.payload) == {
            "clientAccessToken": response["destinationAccessToken"],
            "clientMode": "destination",
            "region": "us-east-1",
            "services": ["SSH"],
        }

    async def test_only_dev1_connects_as_dev1(self, emulator):
        """dev2's certificate with client id dev1 is refused; dev1 keeps getting its tokens."""
        await emulator.add_thing_async("dev1")
        await emulator.add_thing_async("dev2")
        impostor = device_client(emulator, "dev2", client_id="dev1")
        api = emulator.api_client()
        async with device_client(emulator, "dev1") as dev1:
            await dev1.subscribe(notify_topic("dev1"))
            with pytest.raises(MqttConnectError, match="CONNACK NOT_AUTHORIZED"):
                await impostor.connect()
            opened = await asyncio.to_thread(
                api.open_tunnel, destinationConfig={"thingName": "dev1", "services": ["SSH"]}
            )
            async with asyncio.timeout(5 * SCALE):
                message = await dev1.receive()
            still = (dev1.connected, dev1.connections)

        assert still == (True, 1)
        assert json.loads(message.payload)["clientAccessToken"] == opened["destinationAccessToken"]

    async def test_operator_env_works_with_boto3(self, emulator, monkeypatch):
        """The variables in operator.env are enough for a plain boto3 client."""
        env = _env_file(emulator.operator_env)
        for name in list(os.environ):
            if name.startswith("AWS_"):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)

        client = boto3.client("iotsecuretunneling")
        opened = await asyncio.to_thread(client.open_tunnel, description="from env")
        listed = await asyncio.to_thread(client.list_tunnels)

        assert _mode(emulator.operator_env) == 0o600
        assert set(env) >= {
            "AWS_ENDPOINT_URL_IOTSECURETUNNELING",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
        }
        assert [t["tunnelId"] for t in listed["tunnelSummaries"]] == [opened["tunnelId"]]

    async def test_wrong_secret_refused(self, emulator):
        """With signature checks on, a client with another secret key is refused."""
        client = emulator.api_client(secret_key="not-the-secret")

        with pytest.raises(client.exceptions.ClientError) as caught:
            await asyncio.to_thread(client.list_tunnels)

        assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


class TestState:
    async def test_survives_restart(self, tmp_path):
        """Tunnels, credentials, CA and things survive stopping and starting on one directory."""
        async with Emulator(tmp_path / "emu") as first:
            first.add_thing("thing1")
            tunnel = first.store.open_tunnel(thing_name="thing1", services=["SSH"])
            before = (first.access_key, first.secret_key, first.ca_file.read_bytes())
        async with Emulator(tmp_path / "emu") as second:
            described = await asyncio.to_thread(
                second.api_client().describe_tunnel, tunnelId=tunnel.tunnel_id
            )
            after = (second.access_key, second.secret_key, second.ca_file.read_bytes())
            async with device_client(second, "thing1") as device:
                codes = await device.subscribe(notify_topic("thing1"))

        assert described["tunnel"]["status"] == "OPEN"
        assert after == before
        assert codes == [1]
        assert _mode(tmp_path / "emu" / "state.json") == 0o600

    async def test_expiry_timer_closes_tunnels(self, emulator):
        """The expiry timer closes a tunnel when its lifetime ends, without any API call."""
        store = emulator.store
        tunnel = store.open_tunnel(thing_name="thing1", services=["SSH"])
        tunnel.expires_at = time.time() + 0.2 * SCALE
        store.open_tunnel()  # wakes the timer, which re-reads the earliest expiry

        async with asyncio.timeout(5 * SCALE):
            while store.get(tunnel.tunnel_id).status == "OPEN":  # noqa: ASYNC110
                await asyncio.sleep(0.02)

        assert store.get(tunnel.tunnel_id).closed_at is not None


class TestThread:
    def test_blocking_callers(self, emulator_thread):
        """The threaded fixture serves blocking boto3 calls from the test thread."""
        client = emulator_thread.emulator.api_client()

        opened = client.open_tunnel()
        described = client.describe_tunnel(tunnelId=opened["tunnelId"])

        assert described["tunnel"]["tunnelId"] == opened["tunnelId"]
