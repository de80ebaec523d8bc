"""
``python -m agent.emulator``: the same as ``tunnel-agent emulator``.
"""

from __future__ import annotations

from agent.emulator.cli import main


__all__: list[str] = []

if __name__ == "__main__":
    raise SystemExit(main())
