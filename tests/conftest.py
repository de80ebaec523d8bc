"""
Fixtures shared by every test directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.fakes import LogCapture, reset_logging


if TYPE_CHECKING:
    from collections.abc import Iterator


# The emulator's fixtures (tests/emulator/fixtures.py) are not plugins here: importing them loads
# the emulator, aiohttp and cryptography. The directories that use them import them themselves.


@pytest.fixture(autouse=True)
def clean_logging() -> Iterator[None]:
    """Every test starts and ends with structlog unconfigured and no bound context."""
    reset_logging()
    yield
    reset_logging()


@pytest.fixture
def capture() -> LogCapture:
    """Captured log events of the test."""
    return LogCapture()


SYSTEM_STATE_DIR = Path("/var/lib/iot-tunnel-agent")


@pytest.fixture(autouse=True, scope="session")
def no_records_in_the_system_state_dir() -> Iterator[None]:
    """No test may leave tunnel records where the installed service keeps its own."""
    before = set(SYSTEM_STATE_DIR.glob("tunnel-*.json"))
    yield
    left = sorted(str(p) for p in set(SYSTEM_STATE_DIR.glob("tunnel-*.json")) - before)
    assert left == [], f"a test wrote tunnel records into {SYSTEM_STATE_DIR}: give it a state_dir"
