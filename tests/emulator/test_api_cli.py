"""Tests for agent.emulator.api through the real `aws` CLI (each call costs ~0.5 s: keep few)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ACCESS_KEY, SCALE, SECRET_KEY


AWS = Path(sys.executable).with_name("aws")

pytestmark = pytest.mark.skipif(not AWS.exists(), reason="aws CLI not installed in the venv")


@pytest.fixture
def aws(api_server, tmp_path):
    """Return a runner of `aws iotsecuretunneling ...` against the server, isolated from ~/.aws."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials"),
        "AWS_PAGER": "",
        "AWS_MAX_ATTEMPTS": "1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }

    def run(*args: str, secret: str = SECRET_KEY) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(AWS),
                "iotsecuretunneling",
                *args,
                "--endpoint-url",
                api_server.url,
                "--output",
                "json",
            ],
            env={**env, "AWS_SECRET_ACCESS_KEY": secret},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60 * SCALE,
            check=False,
        )

    return run


def ok(result: subprocess.CompletedProcess[str]) -> dict:
    """Return the JSON output of a successful call (empty outputs print nothing)."""
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if result.stdout.strip() else {}


@pytest.mark.slow
class TestCliFlow:
    def test_open_describe_list_rotate_tag_close(self, aws, api_store):
        """The whole operator flow works through the AWS CLI (shapes: docs/protocol.md §14)."""
        opened = ok(
            aws(
                "open-tunnel",
                "--description",
                "cli tunnel",
                "--destination-config",
                "thingName=dev1,services=SSH",
                "--tags",
                "key=team,value=ops",
                "--timeout-config",
                "maxLifetimeTimeoutMinutes=30",
            )
        )
        tunnel_id = opened["tunnelId"]
        described = ok(aws("describe-tunnel", "--tunnel-id", tunnel_id))["tunnel"]
        listed = ok(aws("list-tunnels", "--thing-name", "dev1", "--max-results", "5"))
        rotated = ok(
            aws(
                "rotate-tunnel-access-token",
                "--tunnel-id",
                tunnel_id,
                "--client-mode",
                "DESTINATION",
            )
        )
        ok(aws("tag-resource", "--resource-arn", opened["tunnelArn"], "--tags", "key=k2,value=v2"))
        tags = ok(aws("list-tags-for-resource", "--resource-arn", opened["tunnelArn"]))["tags"]
        ok(aws("close-tunnel", "--tunnel-id", tunnel_id))
        tunnel = api_store.get(tunnel_id)

        assert opened["sourceAccessToken"] == tunnel.source.token
        assert described["description"] == "cli tunnel"
        assert described["destinationConfig"] == {"thingName": "dev1", "services": ["SSH"]}
        assert described["timeoutConfig"] == {"maxLifetimeTimeoutMinutes": 30}
        assert described["status"] == "OPEN"
        assert described["createdAt"] == tunnel.created_at == round(tunnel.created_at, 3)
        assert described["sourceConnectionState"]["status"] == "DISCONNECTED"
        assert [s["tunnelId"] for s in listed["tunnelSummaries"]] == [tunnel_id]
        assert set(rotated) == {"tunnelArn", "destinationAccessToken"}
        assert rotated["destinationAccessToken"] != opened["destinationAccessToken"]
        assert tags == [{"key": "team", "value": "ops"}, {"key": "k2", "value": "v2"}]
        assert tunnel.status == "CLOSED"
        assert tunnel.destination.token == rotated["destinationAccessToken"]


class TestCliErrors:
    def test_error_exit_codes(self, aws):
        """Service errors exit non-zero (255 on CLI v1) and name the AWS error code."""
        missing = aws("describe-tunnel", "--tunnel-id", "0e5f2a6c-0000-4000-8000-000000000000")
        forged = aws("list-tunnels", secret="wrong-secret")

        assert missing.returncode in (254, 255)
        assert "ResourceNotFoundException" in missing.stderr
        assert missing.stdout == ""
        assert forged.returncode in (254, 255)
        assert "InvalidSignatureException" in forged.stderr

    def test_tag_limit_per_tunnel(self, aws, api_store):
        """One tag over the 200 a tunnel already holds is a ValidationException in the CLI too."""
        tunnel = api_store.open_tunnel(tags={f"k{i}": "v" for i in range(200)})

        result = aws("tag-resource", "--resource-arn", tunnel.arn, "--tags", "key=extra,value=v")

        assert result.returncode in (254, 255)
        assert "ValidationException" in result.stderr
        assert "would have 201 tags, the limit is 200" in result.stderr
        assert "extra" not in api_store.get(tunnel.tunnel_id).tags
