"""
``python -m agent``: the ``tunnel-agent`` command line.
"""

from __future__ import annotations

from agent.cli import main


__all__: list[str] = []

if __name__ == "__main__":
    raise SystemExit(main())
