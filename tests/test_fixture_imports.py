"""
Collecting the device's tests does not import the emulator: its fixtures load only where used.

The emulator's fixtures come from tests/emulator/fixtures.py, imported by the directories and
modules that use them (tests/emulator/conftest.py, tests/notify/test_mqtt.py ...), not by the
root conftest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).parent.parent
EMULATOR = ("agent.emulator", "agent.connect", "aiohttp", "boto3", "botocore", "cryptography")
# The MQTT client library: the notification sources' dependency, not the protocol's.
MQTT = ("awscrt", "awsiot")


def collect(*paths: str) -> set[str]:
    """Collect ``paths`` in a fresh interpreter; return the agent.x and top-level modules loaded."""
    options = ["-q", "--collect-only", "-p", "no:randomly", "-p", "no:cacheprovider"]
    code = (
        "import json, sys, pytest\n"
        f"code = pytest.main({[*options, *paths]!r})\n"
        "print(json.dumps([int(code), sorted(sys.modules)]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    status, modules = json.loads(result.stdout.rstrip().rsplit("\n", 1)[-1])
    assert status == 0, result.stdout + result.stderr
    return {
        ".".join(name.split(".")[:2]) if name.startswith("agent.") else name.split(".")[0]
        for name in modules
    }


@pytest.mark.parametrize(
    ("paths", "absent"),
    [
        (("tests/protocol", "tests/ws", "tests/common"), EMULATOR + MQTT),
        # tests/daemon is not here: its real-broker and CA tests use the emulator's pieces.
        (("tests/proxy", "tests/test_cli.py", "tests/test_logging.py"), EMULATOR),
    ],
)
def test_device_tests_do_not_load_the_emulator(paths, absent):
    """The protocol's and the proxy's tests collect without the emulator's modules."""
    loaded = collect(*paths)

    assert "agent.protocol" in loaded
    assert sorted(loaded & set(absent)) == []


def test_emulator_tests_do_load_it():
    """The check can fail: collecting a test that uses the emulator's fixtures loads them."""
    loaded = collect("tests/connect")

    assert {"agent.emulator", "agent.connect", "cryptography"} <= loaded
