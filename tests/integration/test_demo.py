"""
The README's demo, run as a test: the whole system end to end on the emulator.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.emulator.demo import run


pytestmark = pytest.mark.integration


class TestDemo:
    def test_every_step_passes_and_nothing_is_left_running(self, tmp_path: Path):
        """OpenTunnel to ssh, scp with equal hashes, http, rotation and close all succeed."""
        out = io.StringIO()

        run(tmp_path, out)
        text = out.getvalue()
        steps = re.findall(r"^\[\s*[\d.]+s\] (.+?)\s+\d+ ms  (\w+)", text, re.MULTILINE)

        assert [status for _, status in steps] == ["ok"] * 11, text
        assert "sha256" in text
        assert "equal" in text
        assert "new proxy took over" in text
        assert "status CLOSED, device proxies gone" in text
        assert re.search(r"all 11 steps passed", text)


def like_nohup_in_background() -> None:
    """Leave a child what a script's `setsid nohup make test </dev/null &` leaves it."""
    # A non-interactive shell ignores SIGINT for its background jobs; nohup ignores SIGHUP.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


class TestDemoInheritedSignals:
    def test_passes_with_sigint_ignored(self, tmp_path: Path):
        """The demo (Ctrl-C on connect included) passes with SIGINT and SIGHUP ignored."""
        result = subprocess.run(
            [sys.executable, "-m", "agent.emulator.demo"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            start_new_session=True,
            preexec_fn=like_nohup_in_background,
            env={**os.environ, "TMPDIR": str(tmp_path)},
            cwd=Path(__file__).parents[2],
            timeout=300,
            check=False,
        )

        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(r"close the tunnel \(Ctrl-C on connect\)\s+\d+ ms  ok", result.stdout)
        assert re.search(r"all 11 steps passed", result.stdout)
