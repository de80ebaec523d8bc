"""
Tests for ``tunnel-agent connect``, the operator's command, against a real emulator.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest

from agent.connect.command import ServiceRequest, parse_service
from tests.emulator import fixtures
from tests.emulator.fixtures import SCALE


if TYPE_CHECKING:
    from tests.emulator.fixtures import EmulatorThread


emulator_thread = fixtures.emulator_thread


def connect_env(emulator, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS", "TUNNEL"))}
    env.update(
        AWS_ENDPOINT_URL_IOTSECURETUNNELING=emulator.api_url,
        AWS_ACCESS_KEY_ID=emulator.access_key,
        AWS_SECRET_ACCESS_KEY=emulator.secret_key,
        AWS_DEFAULT_REGION="us-east-1",
        TUNNEL_EMULATOR_CA_FILE=str(emulator.ca_file),
        TUNNEL_EMULATOR_RELAY_ENDPOINT=emulator.relay_endpoint,
    )
    env.update(overrides)
    return env


def run_connect(args, env, timeout=30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", "connect", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout * SCALE,
        check=False,
    )


class TestParseService:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [("SSH", ServiceRequest("SSH")), ("SSH=2222", ServiceRequest("SSH", 2222))],
    )
    def test_forms(self, value, expected):
        """NAME and NAME=LOCALPORT parse."""
        assert parse_service(value) == expected

    @pytest.mark.parametrize("value", ["", "S:S", "SSH=99999", "SSH=x", "a b"])
    def test_malformed(self, value):
        """Bad names and ports are argparse errors."""
        with pytest.raises(argparse.ArgumentTypeError):
            parse_service(value)


def ignore_sigint() -> None:
    """What a non-interactive shell does for a background job (and nohup-like runners)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TestConnect:
    @pytest.mark.parametrize("sigint", ["default", "inherited_ignored"])
    def test_opens_listens_reports_and_closes_on_ctrl_c(
        self, emulator_thread: EmulatorThread, sigint: str
    ):
        """Connect opens a tunnel, prints the ssh line, closes it on SIGINT (even if ignored)."""
        emulator = emulator_thread.emulator
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "connect", "thing1", "-s", "SSH", "-s", "HTTP=0",
             "--user", "pi"],
            env=connect_env(emulator),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=ignore_sigint if sigint == "inherited_ignored" else None,  # noqa: PLW1509
        )  # fmt: skip
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30 * SCALE
        while time.monotonic() < deadline and not any("waiting up to" in x for x in lines):
            lines.append(proc.stdout.readline().rstrip())
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=20 * SCALE)
        output = "\n".join(lines) + "\n" + rest
        tunnel_id = re.search(r"tunnel (\S+) open to thing1", output)
        assert tunnel_id, output
        tunnel = emulator.store.get(tunnel_id.group(1))

        assert proc.returncode == 0
        assert re.search(r"^SSH: ssh -p \d+ pi@localhost$", output, re.MULTILINE)
        assert re.search(r"^HTTP: http://localhost:\d+/$", output, re.MULTILINE)
        assert "waiting up to 30 s for thing1's agent" in output
        assert "no tunnel agent answered" not in output  # interrupted before --wait ran out
        assert f"tunnel {tunnel.tunnel_id} closed" in output
        assert tunnel.status == "CLOSED"
        assert tunnel.thing_name == "thing1"
        assert tunnel.services == ("SSH", "HTTP")
        assert tunnel.source.token not in output

    def test_bad_credentials_are_one_clear_line(self, emulator_thread: EmulatorThread):
        """A request signed with an unknown key is reported in one line, exit 1."""
        env = connect_env(emulator_thread.emulator, AWS_ACCESS_KEY_ID="AKIAUNKNOWN0000000")

        result = run_connect(["thing1", "-s", "SSH"], env)

        assert result.returncode == 1
        assert result.stdout.strip().splitlines() == [
            line for line in result.stdout.strip().splitlines() if line.startswith("error: ")
        ]
        assert result.stdout.startswith("error: UnrecognizedClientException")

    def test_too_many_services_are_refused_before_any_call(self, emulator_thread):
        """More than three services are refused locally with exit status 2."""
        result = run_connect(
            ["thing1", "-s", "A", "-s", "B", "-s", "C", "-s", "D"],
            connect_env(emulator_thread.emulator),
        )

        assert result.returncode == 2
        assert emulator_thread.emulator.store.list_tunnels() == []

    def test_unreachable_endpoint_is_one_line(self, emulator_thread):
        """A dead API endpoint gives one error line and exit 1, not a traceback."""
        env = connect_env(
            emulator_thread.emulator, AWS_ENDPOINT_URL_IOTSECURETUNNELING="http://127.0.0.1:9"
        )

        result = run_connect(["thing1", "-s", "SSH"], env, timeout=120)

        assert result.returncode == 1
        assert len(result.stdout.strip().splitlines()) == 1
        assert result.stdout.startswith("error: EndpointConnectionError")
        assert "Traceback" not in result.stdout + result.stderr


class TestInterruption:
    def test_a_stop_signal_is_never_swallowed_while_reading_the_shadow(self):
        """SIGINT/SIGTERM arriving inside the shadow read still stops connect (not 'no shadow')."""
        from agent.connect import command

        class Shadows:
            def get_thing_shadow(self, **_kwargs):
                command._on_signal(signal.SIGINT, None)

        with pytest.raises(KeyboardInterrupt):
            command._reported(Shadows(), "thing1")
