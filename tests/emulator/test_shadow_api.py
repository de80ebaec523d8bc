"""Tests for the iot-data shadow API (agent/emulator/shadow_api.py): real boto3, CLI and MQTT."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from agent.emulator.app import Emulator
from tests.emulator import fixtures
from tests.emulator.fixtures import SCALE, device_client


if TYPE_CHECKING:
    from agent.emulator.mqtt_client import AsyncMqttClient


emulator = fixtures.emulator
emulator_thread = fixtures.emulator_thread

AWS = Path(sys.executable).with_name("aws")
SHADOW = "tunnel-agent"
PREFIX = f"$aws/things/thing1/shadow/name/{SHADOW}"


async def _call(client: Any, operation: str, **kwargs: Any) -> dict[str, Any]:
    """Call a boto3 operation off the loop; decode a JSON ``payload`` stream if present."""
    result: dict[str, Any] = await asyncio.to_thread(getattr(client, operation), **kwargs)
    if "payload" in result:
        result["payload"] = json.loads(result["payload"].read())
    return result


async def _error(client: Any, operation: str, **kwargs: Any) -> tuple[str, int, str]:
    """Return (code, HTTP status, message) of the ClientError an operation raises."""
    with pytest.raises(client.exceptions.ClientError) as caught:
        await _call(client, operation, **kwargs)
    response = caught.value.response
    return (
        response["Error"]["Code"],
        response["ResponseMetadata"]["HTTPStatusCode"],
        response["Error"]["Message"],
    )


async def _next(device: AsyncMqttClient) -> tuple[str, dict[str, Any]]:
    async with asyncio.timeout(5 * SCALE):
        message = await device.receive()
    return message.topic.removeprefix(PREFIX + "/"), json.loads(message.payload)


def _signed(
    emu: Emulator, method: str, path: str, body: bytes = b"", *, service: str = "iotdata"
) -> tuple[int, dict[str, str], bytes]:
    """Send a SigV4-signed request with urllib; return status, headers and body."""
    request = AWSRequest(method=method, url=emu.api_url + path, data=body)
    SigV4Auth(Credentials(emu.access_key, emu.secret_key), service, emu.region).add_auth(request)
    prepared = request.prepare()
    raw = urllib.request.Request(  # noqa: S310 - loopback URL built above
        prepared.url, data=body or None, headers=dict(prepared.headers), method=method
    )
    try:
        with urllib.request.urlopen(raw, timeout=10 * SCALE) as response:  # noqa: S310
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


class TestOperations:
    async def test_update_get_delete(self, emulator):
        """UpdateThingShadow, GetThingShadow and DeleteThingShadow work through boto3's iot-data."""
        client = emulator.data_client()
        request = {"state": {"desired": {"a": 2}, "reported": {"a": 1}}, "clientToken": "h1"}

        updated = await _call(
            client,
            "update_thing_shadow",
            thingName="thing1",
            shadowName=SHADOW,
            payload=json.dumps(request).encode(),
        )
        got = await _call(client, "get_thing_shadow", thingName="thing1", shadowName=SHADOW)
        deleted = await _call(client, "delete_thing_shadow", thingName="thing1", shadowName=SHADOW)
        missing = await _error(client, "get_thing_shadow", thingName="thing1", shadowName=SHADOW)

        assert updated["payload"]["state"] == request["state"]
        assert (updated["payload"]["version"], updated["payload"]["clientToken"]) == (1, "h1")
        assert got["payload"]["state"] == {**request["state"], "delta": {"a": 2}}
        assert set(got["payload"]["metadata"]) == {"desired", "reported"}
        assert deleted["payload"]["version"] == 1
        assert missing == (
            "ResourceNotFoundException",
            404,
            f"No shadow exists with name: 'thing1~{SHADOW}'",
        )

    async def test_classic_shadow(self, emulator):
        """Without shadowName the classic shadow is addressed, apart from the named ones."""
        client = emulator.data_client()
        await _call(client, "update_thing_shadow", thingName="thing1", payload=b'{"state": {}}')

        classic = await _call(client, "get_thing_shadow", thingName="thing1")
        named = await _error(client, "get_thing_shadow", thingName="thing1", shadowName=SHADOW)

        assert classic["payload"]["version"] == 1
        assert named[1] == 404

    async def test_version_conflict(self, emulator):
        """An update naming a stale version is a ConflictException (409) and changes nothing."""
        client = emulator.data_client()
        for n in range(2):
            payload = json.dumps({"state": {"reported": {"n": n}}}).encode()
            await _call(
                client,
                "update_thing_shadow",
                thingName="thing1",
                shadowName=SHADOW,
                payload=payload,
            )

        conflict = await _error(
            client,
            "update_thing_shadow",
            thingName="thing1",
            shadowName=SHADOW,
            payload=b'{"state": {"reported": {"n": 9}}, "version": 1}',
        )
        accepted = await _call(
            client,
            "update_thing_shadow",
            thingName="thing1",
            shadowName=SHADOW,
            payload=b'{"state": {"reported": {"n": 3}}, "version": 2}',
        )

        assert conflict == ("ConflictException", 409, "Version conflict")
        assert accepted["payload"]["version"] == 3

    @pytest.mark.parametrize(
        ("payload", "expected"),
        [
            (b"{nope", ("InvalidRequestException", 400, "Invalid JSON")),
            (
                b'{"state": {"desired": 1}}',
                ("InvalidRequestException", 400, "Desired node must be an object"),
            ),
            (
                b"\xff",
                (
                    "UnsupportedDocumentEncodingException",
                    415,
                    "Unsupported documented encoding; supported encoding is UTF-8",
                ),
            ),
            (
                b'{"state": {"reported": {"big": "' + b"x" * 9000 + b'"}}}',
                (
                    "RequestEntityTooLargeException",
                    413,
                    "The payload exceeds the maximum size allowed",
                ),
            ),
        ],
    )
    async def test_update_errors(self, emulator, payload, expected):
        """Refused updates map to the iot-data model's error shapes and statuses."""
        client = emulator.data_client()

        error = await _error(
            client, "update_thing_shadow", thingName="thing1", shadowName=SHADOW, payload=payload
        )

        assert error == expected
        assert emulator.shadows.shadow("thing1", SHADOW) is None


class TestList:
    async def test_pages(self, emulator):
        """ListNamedShadowsForThing pages through the names in order; classic is not listed."""
        client = emulator.data_client()
        names = ["e", "a", "d", "b", "c"]
        for name in [*names, None]:
            kwargs = {} if name is None else {"shadowName": name}
            await _call(
                client,
                "update_thing_shadow",
                thingName="thing1",
                payload=b'{"state": {}}',
                **kwargs,
            )
        await _call(
            client,
            "update_thing_shadow",
            thingName="thing2",
            shadowName="z",
            payload=b'{"state": {}}',
        )

        pages = []
        token: dict[str, str] = {}
        while True:
            page = await _call(
                client, "list_named_shadows_for_thing", thingName="thing1", pageSize=2, **token
            )
            pages.append(page["results"])
            if "nextToken" not in page:
                break
            token = {"nextToken": page["nextToken"]}
        default = await _call(client, "list_named_shadows_for_thing", thingName="thing1")
        empty = await _call(client, "list_named_shadows_for_thing", thingName="thing9")

        assert pages == [["a", "b"], ["c", "d"], ["e"]]
        assert default["results"] == ["a", "b", "c", "d", "e"]
        assert "nextToken" not in default
        assert isinstance(default["timestamp"], int)
        assert empty["results"] == []

    async def test_bad_paging(self, emulator):
        """A foreign nextToken or an out-of-range pageSize is an InvalidRequestException."""
        client = boto3.client(
            "iot-data",
            endpoint_url=emulator.api_url,
            region_name=emulator.region,
            aws_access_key_id=emulator.access_key,
            aws_secret_access_key=emulator.secret_key,
            config=Config(retries={"total_max_attempts": 1}, parameter_validation=False),
        )

        token = await _error(
            client, "list_named_shadows_for_thing", thingName="thing1", nextToken="bm90LW91cnM="
        )
        size = await _error(
            client, "list_named_shadows_for_thing", thingName="thing1", pageSize=101
        )

        assert token[:2] == ("InvalidRequestException", 400)
        assert size[:2] == ("InvalidRequestException", 400)


class TestMqttInterplay:
    async def test_mqtt_update_visible_over_http(self, emulator):
        """A device's report over MQTT is what GetThingShadow returns, version included."""
        async with device_client(emulator, "thing1") as device:
            await device.subscribe(f"{PREFIX}/update/accepted")
            for value in (1, 2):
                await device.publish(
                    f"{PREFIX}/update", json.dumps({"state": {"reported": {"v": value}}}).encode()
                )
                await _next(device)
        got = await _call(
            emulator.data_client(), "get_thing_shadow", thingName="thing1", shadowName=SHADOW
        )

        assert got["payload"]["state"] == {"reported": {"v": 2}}
        assert got["payload"]["version"] == 2

    async def test_http_update_published_on_mqtt(self, emulator):
        """UpdateThingShadow publishes accepted, documents and delta to the device."""
        client = emulator.data_client()
        async with device_client(emulator, "thing1") as device:
            for suffix in ("update/accepted", "update/documents", "update/delta"):
                await device.subscribe(f"{PREFIX}/{suffix}")
            response = await _call(
                client,
                "update_thing_shadow",
                thingName="thing1",
                shadowName=SHADOW,
                payload=b'{"state": {"desired": {"ssh": "on"}}, "clientToken": "op"}',
            )
            messages = [await _next(device) for _ in range(3)]

        assert [topic for topic, _ in messages] == [
            "update/accepted",
            "update/documents",
            "update/delta",
        ]
        assert messages[0][1] == response["payload"]
        assert messages[1][1]["current"]["state"] == {"desired": {"ssh": "on"}}
        assert (messages[2][1]["state"], messages[2][1]["clientToken"]) == ({"ssh": "on"}, "op")

    async def test_http_delete_published_on_mqtt(self, emulator):
        """DeleteThingShadow publishes delete/accepted with the deleted version."""
        client = emulator.data_client()
        await _call(
            client,
            "update_thing_shadow",
            thingName="thing1",
            shadowName=SHADOW,
            payload=b'{"state": {}}',
        )
        async with device_client(emulator, "thing1") as device:
            await device.subscribe(f"{PREFIX}/delete/accepted")
            await _call(client, "delete_thing_shadow", thingName="thing1", shadowName=SHADOW)
            topic, document = await _next(device)

        assert (topic, document["version"]) == ("delete/accepted", 1)


class TestHttp:
    async def test_signatures(self, emulator):
        """A wrong secret or a credential scoped to another service is refused with 403."""
        bad_secret = await _error(
            emulator.data_client(secret_key="wrong"), "get_thing_shadow", thingName="thing1"
        )
        status, headers, body = await asyncio.to_thread(
            _signed, emulator, "GET", "/things/thing1/shadow", service="IoTSecuredTunneling"
        )

        assert bad_secret[:2] == ("InvalidSignatureException", 403)
        assert status == 403
        assert headers["x-amzn-ErrorType"] == "InvalidSignatureException:"
        assert json.loads(body)["message"] == (
            "Credential should be scoped to correct service: 'iotdata'."
        )

    async def test_method_not_allowed(self, emulator):
        """A verb the model does not define on a shadow path is a 405 MethodNotAllowedException."""
        status, headers, _ = await asyncio.to_thread(
            _signed, emulator, "PUT", "/things/thing1/shadow", b"{}"
        )

        assert status == 405
        assert headers["x-amzn-ErrorType"] == "MethodNotAllowedException:"

    @pytest.mark.parametrize(
        ("method", "path", "body", "status", "code"),
        [
            ("GET", "/things/thing1/shadow?name=a.b", b"", 400, "InvalidRequestException"),
            ("GET", "/things/thing1/shadow?name=", b"", 400, "InvalidRequestException"),
            (
                "GET",
                "/api/things/shadow/ListNamedShadowsForThing/thing1?pageSize=x",
                b"",
                400,
                "InvalidRequestException",
            ),
            (
                "POST",
                "/api/things/shadow/ListNamedShadowsForThing/thing1",
                b"",
                405,
                "MethodNotAllowedException",
            ),
            (
                "POST",
                "/things/thing1/shadow",
                b" " * (2 * 1024 * 1024),
                413,
                "RequestEntityTooLargeException",
            ),
        ],
    )
    async def test_raw_refusals(self, emulator, method, path, body, status, code):
        """Requests botocore would not send still get the model's error shapes."""
        answer, headers, raw = await asyncio.to_thread(_signed, emulator, method, path, body)

        assert (answer, headers["x-amzn-ErrorType"]) == (status, f"{code}:")
        assert json.loads(raw)["code"] == status
        assert emulator.shadows.list_named("thing1") == []

    async def test_control_plane_on_same_port(self, emulator):
        """The tunnel API keeps answering on the port that now also serves shadows."""
        await _call(
            emulator.data_client(),
            "update_thing_shadow",
            thingName="thing1",
            payload=b'{"state": {}}',
        )

        opened = await _call(emulator.api_client(), "open_tunnel", description="same port")

        assert emulator.store.get(opened["tunnelId"]).description == "same port"

    async def test_operator_env(self, emulator, monkeypatch):
        """operator.env names the shadow endpoint; a plain boto3 iot-data client works from it."""
        env = dict(
            line.split("=", 1)
            for line in emulator.operator_env.read_text().splitlines()
            if line and not line.startswith("#")
        )
        for name in [n for n in os.environ if n.startswith("AWS_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)

        # A fresh session: boto3's default one caches the first credentials it resolves.
        client = boto3.session.Session().client("iot-data")
        updated = await _call(
            client,
            "update_thing_shadow",
            thingName="thing1",
            shadowName=SHADOW,
            payload=b'{"state": {"reported": {"e": 1}}}',
        )

        assert env["AWS_ENDPOINT_URL_IOT_DATA_PLANE"] == emulator.api_url
        assert updated["payload"]["version"] == 1


class TestPersistence:
    async def test_survives_restart(self, tmp_path):
        """Shadows, versions and tombstones survive stopping and starting on one directory."""
        directory = tmp_path / "emu"
        async with Emulator(directory) as first:
            first.add_thing("thing1")
            client = first.data_client()
            await _call(
                client,
                "update_thing_shadow",
                thingName="thing1",
                shadowName=SHADOW,
                payload=b'{"state": {"desired": {"a": 1}}}',
            )
            await _call(
                client,
                "update_thing_shadow",
                thingName="thing1",
                shadowName="old",
                payload=b'{"state": {}}',
            )
            await _call(client, "delete_thing_shadow", thingName="thing1", shadowName="old")
            before = await _call(client, "get_thing_shadow", thingName="thing1", shadowName=SHADOW)
        async with Emulator(directory) as second:
            client = second.data_client()
            after = await _call(client, "get_thing_shadow", thingName="thing1", shadowName=SHADOW)
            listed = await _call(client, "list_named_shadows_for_thing", thingName="thing1")
            recreated = await _call(
                client,
                "update_thing_shadow",
                thingName="thing1",
                shadowName="old",
                payload=b'{"state": {}}',
            )
            async with device_client(second, "thing1") as device:
                await device.subscribe(f"{PREFIX}/get/accepted")
                await device.publish(f"{PREFIX}/get", b"")
                _, over_mqtt = await _next(device)

        mode = stat.S_IMODE((directory / "shadows.json").stat().st_mode)

        assert {k: v for k, v in after["payload"].items() if k != "timestamp"} == {
            k: v for k, v in before["payload"].items() if k != "timestamp"
        }
        assert listed["results"] == [SHADOW]
        assert recreated["payload"]["version"] == 2
        assert over_mqtt["state"] == {"desired": {"a": 1}, "delta": {"a": 1}}
        assert mode == 0o600


@pytest.mark.slow
@pytest.mark.skipif(not AWS.exists(), reason="aws CLI not installed in the venv")
class TestCli:
    def test_cli_flow(self, emulator_thread, tmp_path):
        """The aws CLI updates, reads, lists and deletes a named shadow with operator.env only."""
        emu = emulator_thread.emulator
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "AWS_PAGER": ""}
        for line in emu.operator_env.read_text().splitlines():
            if line and not line.startswith("#"):
                name, value = line.split("=", 1)
                env[name] = value
        env["AWS_CONFIG_FILE"] = str(tmp_path / "no-config")
        env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "no-credentials")
        env["AWS_MAX_ATTEMPTS"] = "1"

        def aws(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(AWS), "iot-data", *args, "--output", "json"],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60 * SCALE,
                check=False,
            )

        request = tmp_path / "request.json"
        request.write_text('{"state": {"reported": {"cli": true}}}')
        named = ["--thing-name", "thing1", "--shadow-name", SHADOW]
        updated = aws(
            "update-thing-shadow",
            *named,
            "--payload",
            f"fileb://{request}",
            str(tmp_path / "updated.json"),
        )
        got = aws("get-thing-shadow", *named, str(tmp_path / "got.json"))
        listed = aws("list-named-shadows-for-thing", "--thing-name", "thing1")
        deleted = aws("delete-thing-shadow", *named, str(tmp_path / "deleted.json"))
        missing = aws("get-thing-shadow", *named, str(tmp_path / "missing.json"))

        assert updated.returncode == 0, updated.stderr
        assert json.loads((tmp_path / "updated.json").read_text())["version"] == 1
        assert got.returncode == 0, got.stderr
        assert json.loads((tmp_path / "got.json").read_text())["state"] == {
            "reported": {"cli": True}
        }
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["results"] == [SHADOW]
        assert deleted.returncode == 0, deleted.stderr
        assert json.loads((tmp_path / "deleted.json").read_text())["version"] == 1
        assert missing.returncode in (254, 255)
        assert "ResourceNotFoundException" in missing.stderr
