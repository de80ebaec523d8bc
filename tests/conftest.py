"""
Fixtures shared by every test directory.
"""

from __future__ import annotations


# The emulator fixtures (emulator, emulator_thread, broker, mqtt_pki ...) are available everywhere.
pytest_plugins = ["tests.emulator.fixtures"]
