"""
Retry delays: a pure, infinite generator of jittered exponential backoff.

Pure so tests can drive it with a fixed random source; callers bound the number
of attempts and create a fresh generator after a success
(docs/architecture.md §2.2, like websockets' ``backoff``).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


__all__ = ["backoff"]


def backoff(
    *,
    initial: float = 1.0,
    maximum: float = 30.0,
    factor: float = 2.0,
    jitter: float = 0.2,
    rng: Callable[[], float] = random.random,
) -> Iterator[float]:
    """
    Yield delays ``initial, initial*factor, ...`` capped at ``maximum``, each jittered.

    Jitter spreads simultaneous restarts (many tunnels failing together after a
    network drop) so they do not reconnect in lockstep.

    Args:
        initial: First delay, in seconds (> 0).
        maximum: Largest delay before jitter, in seconds (>= initial).
        factor: Growth per attempt (>= 1).
        jitter: Fraction in [0, 1] of each delay that is randomised downwards.
        rng: Source of floats in [0, 1); ``random.random`` by default.

    Returns:
        An endless iterator of delays in seconds, each within ``[d * (1 - jitter), d]``
        for the nominal delay ``d``.

    Raises:
        ValueError: An argument is out of range.
    """
    if initial <= 0 or maximum < initial or factor < 1 or not 0 <= jitter <= 1:
        raise ValueError("need 0 < initial <= maximum, factor >= 1, 0 <= jitter <= 1")
    # Validated eagerly above; the generator below starts only on the first next().
    return _delays(initial, maximum, factor, jitter, rng)


def _delays(
    delay: float, maximum: float, factor: float, jitter: float, rng: Callable[[], float]
) -> Iterator[float]:
    while True:
        yield delay * (1.0 - jitter * rng())
        delay = min(delay * factor, maximum)
