"""Tests for agent.common.retry: the pure backoff generator."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, strategies as st

from agent.common.retry import backoff


class TestBackoff:
    def test_doubles_to_the_cap(self):
        """Without jitter, delays double from initial and stay at maximum."""
        delays = list(itertools.islice(backoff(initial=1, maximum=10, jitter=0), 6))

        assert delays == [1, 2, 4, 8, 10, 10]

    def test_jitter_lowers_within_fraction(self):
        """Jitter takes at most the given fraction off each nominal delay."""
        high = list(itertools.islice(backoff(initial=2, maximum=8, jitter=0.5, rng=lambda: 0.0), 3))
        low = list(itertools.islice(backoff(initial=2, maximum=8, jitter=0.5, rng=lambda: 1.0), 3))

        assert high == [2, 4, 8]
        assert low == [1, 2, 4]

    def test_fresh_generator_restarts(self):
        """A new generator starts over at the initial delay (reset after success)."""
        first = backoff(initial=1, maximum=4, jitter=0)
        consumed = [next(first) for _ in range(3)]

        assert consumed == [1, 2, 4]
        assert next(backoff(initial=1, maximum=4, jitter=0)) == 1

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"initial": 0},
            {"initial": 2, "maximum": 1},
            {"factor": 0.5},
            {"jitter": 1.5},
            {"jitter": -0.1},
        ],
    )
    def test_invalid_arguments(self, kwargs):
        """Out-of-range arguments raise ValueError at once, not at the first next()."""
        with pytest.raises(ValueError, match="need 0 < initial <= maximum"):
            backoff(**kwargs)

    @given(
        initial=st.floats(0.01, 10),
        extra=st.floats(0, 100),
        jitter=st.floats(0, 1),
        draws=st.lists(st.floats(0, 0.999), min_size=1, max_size=20),
    )
    def test_bounds(self, initial, extra, jitter, draws):
        """Every delay lies in [nominal * (1 - jitter), nominal] and never above maximum."""
        maximum = initial + extra
        rng = iter(draws).__next__
        delays = list(
            itertools.islice(
                backoff(initial=initial, maximum=maximum, jitter=jitter, rng=rng), len(draws)
            )
        )

        assert all(d <= maximum + 1e-9 for d in delays)
        assert all(d >= min(initial, maximum) * (1 - jitter) - 1e-9 for d in delays)
        assert delays[0] <= initial + 1e-9
