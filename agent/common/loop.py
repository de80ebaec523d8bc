"""
Event loop selection: uvloop when installed (about 1.5x the tunnel throughput), else asyncio's.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, TypeVar


if TYPE_CHECKING:
    from collections.abc import Coroutine
    from typing import Any


__all__ = ["run"]

_T = TypeVar("_T")


def run(main: Coroutine[Any, Any, _T]) -> _T:
    """
    Run ``main`` to completion on a fresh event loop.

    ``TUNNEL_AGENT_EVENT_LOOP=asyncio`` forces the standard loop (to compare, or to rule
    uvloop out).
    """
    if os.environ.get("TUNNEL_AGENT_EVENT_LOOP", "auto") != "asyncio":
        try:
            import uvloop  # noqa: PLC0415 - optional, platform-dependent
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
