"""
``python -m agent.proxy``: the bundled local proxy.
"""

from __future__ import annotations

import sys

from agent.proxy.cli import main


__all__: list[str] = []

sys.exit(main())
