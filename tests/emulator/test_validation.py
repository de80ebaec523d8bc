"""Tests for agent.emulator.validation: docs/protocol.md §14 shapes, paging tokens (Hypothesis)."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import assume, given, strategies as st

from agent.emulator.store import ValidationFailed
from agent.emulator.validation import (
    DESCRIPTION,
    NEXT_TOKEN,
    TAG_TEXT,
    TUNNEL_ID,
    SerializationFailed,
    Shape,
    check_string,
    decode_next_token,
    encode_next_token,
)


tunnel_ids = st.from_regex(r"[a-zA-Z0-9_\-+=:]{1,128}", fullmatch=True)


class TestNextToken:
    @given(tunnel_ids)
    def test_round_trip(self, tunnel_id):
        """Valid tunnel ids survive encoding; the token matches the docs/protocol.md §14 pattern."""
        token = encode_next_token(tunnel_id)

        assert NEXT_TOKEN.fullmatch(token)
        assert decode_next_token(token) == tunnel_id

    @given(st.text(max_size=200))
    def test_garbage_is_validation_error(self, text):
        """Arbitrary text either decodes to a valid id or raises ValidationFailed, nothing else."""
        try:
            result: str | None = decode_next_token(text)
        except ValidationFailed:
            result = None

        assert result is None or TUNNEL_ID.fullmatch(result)

    @pytest.mark.parametrize("token", ["", "a b", "Zm9vOmJhcg==", "bHQxOg==", "bHQxOmEvYg=="])
    def test_refused(self, token):
        """Empty, off-pattern, foreign, empty-id and bad-id tokens are refused."""
        with pytest.raises(ValidationFailed):
            decode_next_token(token)


class TestDescription:
    @given(st.text(min_size=1, max_size=300))
    def test_matches_unicode_category_rule(self, text):
        """The pattern accepts a string exactly when no character is in category C."""
        # `regex` ships a newer Unicode database than this Python's unicodedata: only compare
        # characters assigned in both (unassigned ones are covered by the API tests).
        assume(all(unicodedata.category(c) != "Cn" for c in text))
        expected = all(not unicodedata.category(c).startswith("C") for c in text)

        assert bool(DESCRIPTION.fullmatch(text)) == expected

    @given(st.text(alphabet=st.characters(categories=["L", "Z", "N"]), max_size=50))
    def test_tag_text_accepts_letters_separators_numbers(self, text):
        """Letters, separators and numbers of any script are valid tag text."""
        assert TAG_TEXT.fullmatch(text)


class TestShape:
    def test_required_member_missing_or_null(self):
        """A missing or null required member is a ValidationException naming it."""
        for body in ({}, {"tunnelId": None}):
            with pytest.raises(ValidationFailed, match=r"'tunnelId'.*must not be null"):
                Shape(body).string("tunnelId", required=True)

    @pytest.mark.parametrize(
        ("call", "body"),
        [
            (lambda s: s.string("x"), {"x": 1}),
            (lambda s: s.integer("x", low=1, high=2), {"x": "1"}),
            (lambda s: s.integer("x", low=1, high=2), {"x": False}),
            (lambda s: s.integer("x", low=1, high=2), {"x": 1.0}),
            (lambda s: s.boolean("x"), {"x": 0}),
            (lambda s: s.structure("x"), {"x": []}),
            (lambda s: s.items("x", min_items=0, max_items=1), {"x": {}}),
            (lambda s: s.tags("x"), {"x": ["k"]}),
        ],
    )
    def test_type_mismatch(self, call, body):
        """A member of the wrong JSON type is a SerializationException."""
        with pytest.raises(SerializationFailed):
            call(Shape(body))

    def test_absent_optional_members(self):
        """Absent optional members read as None / False."""
        shape = Shape({})

        assert shape.string("a") is None
        assert shape.integer("b", low=1, high=2) is None
        assert shape.boolean("c") is False
        assert shape.structure("d") is None
        assert shape.tags() is None

    def test_message_format(self):
        """Messages follow AWS's "1 validation error detected" format."""
        with pytest.raises(ValidationFailed) as info:
            check_string("x" * 3, "thingName", max_len=2)

        assert info.value.message == (
            "1 validation error detected: Value 'xxx' at 'thingName' failed to satisfy "
            "constraint: Member must have length less than or equal to 2"
        )
