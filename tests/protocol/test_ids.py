"""Tests for agent.protocol.ids: one ASCII-only definition of each identifier."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from agent.protocol.ids import (
    ACCESS_TOKEN,
    API_SERVICE,
    CLIENT_TOKEN,
    REGION,
    SERVICE_ID,
    THING_NAME,
    token_digest,
)


PATTERNS = [ACCESS_TOKEN, API_SERVICE, CLIENT_TOKEN, REGION, SERVICE_ID, THING_NAME]


class TestRegion:
    @pytest.mark.parametrize(
        "region",
        [
            "us-east-1",
            "eu-west-3",
            "us-gov-west-1",
            "cn-north-1",
            "us-isob-east-1",
            "eusc-de-east-1",
        ],
    )
    def test_every_partition_shape(self, region):
        """Regions of every AWS partition are accepted."""
        assert REGION.fullmatch(region)

    @pytest.mark.parametrize(
        "region",
        ["us-east-\u0661", "us-east-1.evil.example", "127.0.0.1:443", "US-EAST-1", "x", "us-east-"],
    )
    def test_nothing_that_could_change_the_host(self, region):
        """Unicode digits, dots, colons and upper case never pass as a region."""
        assert REGION.fullmatch(region) is None


class TestAsciiOnly:
    @given(st.text(min_size=1, max_size=200))
    def test_a_match_is_always_ascii(self, value):
        """Whatever the input, every pattern matches ASCII text only."""
        for pattern in PATTERNS:
            if pattern.fullmatch(value):
                assert value.isascii()

    def test_service_id_is_the_api_shape_without_colon(self):
        """A map id cannot hold ':', which the API's service shape allows."""
        assert API_SERVICE.fullmatch("a:b")
        assert SERVICE_ID.fullmatch("a:b") is None
        assert SERVICE_ID.fullmatch("SSH_2-b")

    def test_lengths(self):
        """Thing names stop at 128 characters; client tokens need 32 to 128."""
        assert THING_NAME.fullmatch("t" * 128)
        assert THING_NAME.fullmatch("t" * 129) is None
        assert CLIENT_TOKEN.fullmatch("a" * 31) is None
        assert CLIENT_TOKEN.fullmatch("a" * 32)


class TestTokenDigest:
    def test_digest_is_stable_and_hides_the_token(self):
        """The digest is the token's SHA-256, equal for equal tokens, different otherwise."""
        assert token_digest("abc") == token_digest("abc")
        assert token_digest("abc") != token_digest("abd")
        assert "abc" not in token_digest("abc")
        assert len(token_digest("abc")) == 64
