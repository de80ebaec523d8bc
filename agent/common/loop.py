"""
The event loop, and the one way other threads hand work to it.

uvloop when installed (about 1.5x the tunnel throughput), else asyncio's;
:func:`call_in_loop` for callbacks on awscrt's and the SDKs' threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING, TypeVar


if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from typing import Any


__all__ = ["call_in_loop", "run"]

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


def call_in_loop(loop: asyncio.AbstractEventLoop, func: Callable[..., object], *args: Any) -> None:
    """
    Schedule ``func(*args)`` on ``loop`` from any thread; a no-op once the loop is closed.

    SDK threads may still deliver a callback while the loop shuts down; dropping it
    then is right, since nobody is left to consume it.

    Args:
        loop: The event loop that owns the consumer.
        func: Called in the loop's thread.
        *args: Passed to ``func``.
    """
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(func, *args)
