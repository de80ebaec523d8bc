"""
The README's demo, run as a test: the whole system end to end on the emulator.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING

import pytest

from agent.emulator.demo import run


if TYPE_CHECKING:
    from pathlib import Path

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
