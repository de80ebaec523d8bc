"""
The device's code runs without the emulator, the operator and their dependencies.

A device installs the package without the [emulator] and [operator] extras. Each check runs a
fresh interpreter whose import system refuses those modules and records every attempt, so an
import that some ``except ImportError`` swallows still shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from tests.certs import write_credentials


if TYPE_CHECKING:
    from pathlib import Path


BLOCKED = ("agent.emulator", "agent.connect", "aiohttp", "boto3", "botocore", "cryptography")

# Runs first in the child: installs the blocker, reports the refused imports at exit.
PRELUDE = f"""
import atexit, json, sys

BLOCKED = {BLOCKED!r}
refused = []

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if any(name == root or name.startswith(root + ".") for root in BLOCKED):
            refused.append(name)
            raise ImportError(f"{{name}} is not installed on a device")
        return None

sys.meta_path.insert(0, Blocker())
atexit.register(lambda: sys.stderr.write("\\nREFUSED " + json.dumps(refused) + "\\n"))
"""


def run_blocked(code: str, *args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], list]:
    """Run ``code`` after the prelude; return the result and the refused imports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNEL_AGENT_")}
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    report = result.stderr.rstrip().rsplit("\n", 1)[-1]
    assert report.startswith("REFUSED "), result.stderr
    return result, json.loads(report.removeprefix("REFUSED "))


def test_device_modules_import(tmp_path):
    """The daemon, the CLIs and the proxy import without touching a blocked module."""
    modules = ["agent.daemon.lifecycle", "agent.cli", "agent.proxy.cli", "agent.proxy.runner"]
    result, refused = run_blocked(
        "import importlib\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert refused == []
    loaded = set(json.loads(result.stdout))
    assert set(modules) <= loaded
    assert {"agent.daemon.tunnels", "agent.notify", "agent.ws.frames"} <= loaded
    assert not [m for m in loaded if any(m == b or m.startswith(b + ".") for b in BLOCKED)]


@pytest.mark.parametrize("module", ["agent.emulator.relay", "agent.connect.command", "boto3"])
def test_the_blocker_refuses(tmp_path, module):
    """The check can fail: a blocked module does not import, and the attempt is reported."""
    result, refused = run_blocked(f"import {module}\n", cwd=tmp_path)

    assert result.returncode == 1
    assert "is not installed on a device" in result.stderr
    assert refused
    assert refused[0] in module


AGENT = "from agent.cli import main\nraise SystemExit(main())\n"
LOCALPROXY = "from agent.proxy.cli import main\nraise SystemExit(main())\n"


def test_agent_help(tmp_path):
    """`tunnel-agent --help` lists every sub-command, the lazy ones included."""
    result, refused = run_blocked(AGENT, "--help", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert refused == []
    for command in ("run", "check-config", "status", "version", "emulator", "connect"):
        assert command in result.stdout


def test_agent_check_config(tmp_path):
    """`tunnel-agent check-config` validates a minimal MQTT configuration."""
    write_credentials(tmp_path)  # real PEM files: check-config parses them with the stdlib
    config = tmp_path / "config.toml"
    config.write_text(
        'thing_name = "dev-1"\nnotify = "mqtt"\n[services]\nSSH = 22\n'
        f'[mqtt]\nendpoint = "127.0.0.1"\ncert = "{tmp_path}/cert.pem"\n'
        f'key = "{tmp_path}/key.pem"\nca = "{tmp_path}/ca.pem"\n'
    )

    result, refused = run_blocked(AGENT, "check-config", "--config", str(config), cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert refused == []
    assert result.stdout.startswith(f"configuration ok ({config})\n")
    assert "  services: SSH=22\n" in result.stdout


@pytest.mark.parametrize(("command", "extra"), [("emulator", "emulator"), ("connect", "operator")])
def test_lazy_command_without_its_extra(tmp_path, command, extra):
    """Without its extra, a sub-command prints one line naming it and exits 1, no traceback."""
    result, refused = run_blocked(AGENT, command, "--help", cwd=tmp_path)
    lines = result.stderr.strip().split("\n")[:-1]  # the last line is the blocker's report

    assert result.returncode == 1
    assert result.stdout == ""
    assert [line for line in lines if line] == [
        (
            f"error: tunnel-agent {command} needs the [{extra}] extra: "
            f"pip install 'iot-tunnel-agent[{extra}]'"
        )
    ]
    # Found missing before anything of the sub-command was imported.
    assert refused
    assert not [name for name in refused if name.startswith("agent.")]


def test_localproxy_help(tmp_path):
    """`tunnel-localproxy --help` prints its options."""
    result, refused = run_blocked(LOCALPROXY, "--help", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert refused == []
    assert "--destination-app" in result.stdout
