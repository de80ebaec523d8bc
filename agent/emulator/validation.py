"""
Input shape checks of the Secure Tunneling control plane (docs/protocol.md §14), pure functions.

botocore validates only ``required``, the JSON type and ``min``; everything else (``max``, patterns,
enums) reaches the server unchecked (docs/protocol.md §12.2), so every constraint is enforced here.
Constraint failures raise :class:`ValidationFailed` (400 ``ValidationException``, a choice,
docs/protocol.md §13.2) with the message format AWS uses for its own validation errors. A member of
the wrong JSON type raises :class:`SerializationFailed` (400 ``SerializationException``), as a body
that does not deserialize into the operation's input shape. Unknown members are ignored, like AWS
does.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import TYPE_CHECKING, Any, ClassVar

import regex

from agent.emulator.store import MAX_TAGS, StoreError, ValidationFailed
from agent.protocol.ids import THING_NAME


if TYPE_CHECKING:
    from collections.abc import Mapping


__all__ = [
    "MAX_PAGE_SIZE",
    "SerializationFailed",
    "Shape",
    "decode_next_token",
    "encode_next_token",
]

MAX_PAGE_SIZE = 100

# docs/protocol.md §14 patterns. `re` has no \p{..} classes, so the Unicode ones use the `regex`
# module.
TUNNEL_ID = re.compile(r"[a-zA-Z0-9_\-+=:]{1,128}")
NEXT_TOKEN = re.compile(r"[a-zA-Z0-9_=-]{1,4096}")
DESCRIPTION = regex.compile(r"[^\p{C}]{1,2048}")
TAG_TEXT = regex.compile(r"[\p{L}\p{Z}\p{N}_.:/=+\-@]*")
CLIENT_MODES = ("SOURCE", "DESTINATION", "ALL")

_TYPE_NAMES = {str: "string", int: "integer", bool: "boolean", list: "list", dict: "structure"}
# A message quotes the offending value, cut to this many characters or list items: an
# oversize member (up to the 1 MiB body) is not echoed back whole.
_SHOWN_CHARS = 64
_SHOWN_ITEMS = 5
# A paging token is base64url of this prefix plus the last returned tunnel id, so a token from
# elsewhere (or a garbled one) is recognised and refused (a choice, docs/protocol.md §15.4).
_PAGE_PREFIX = "lt1:"


class SerializationFailed(StoreError):
    """
    The body is not JSON, or a member has the wrong JSON type (a choice, docs/protocol.md §13.2).
    """

    code = "SerializationException"
    status = 400


def _shown(value: object) -> str:
    # AWS prints values the Java way: strings bare, lists as [a, b], structures as {k=v}.
    if isinstance(value, str):
        return value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "..."
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        items = [_shown(item) for item in value[:_SHOWN_ITEMS]]
        if len(value) > _SHOWN_ITEMS:
            items.append(f"... ({len(value)} items)")
        return "[" + ", ".join(items) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_shown(v)}" for k, v in value.items()) + "}"
    return "null" if value is None else str(value)


def _violation(value: object, where: str, constraint: str) -> ValidationFailed:
    shown = "null" if value is None else f"'{_shown(value)}'"
    return ValidationFailed(
        f"1 validation error detected: Value {shown} at '{where}' failed to satisfy "
        f"constraint: {constraint}"
    )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return "number"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _expect(value: object, kind: type, where: str) -> None:
    # bool is an int subclass in Python but a different JSON type.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SerializationFailed(
            f"Expected {_TYPE_NAMES[kind]} for '{where}', got {_json_type(value)}"
        )


class Shape:
    """
    Typed, checked access to the members of one operation's JSON input.
    """

    _absent: ClassVar[object] = object()

    def __init__(self, body: Mapping[str, Any]) -> None:
        """
        Wrap a decoded JSON object.
        """
        self._body = body

    def _get(self, name: str, *, required: bool) -> Any:
        value = self._body.get(name, self._absent)
        if value is self._absent or value is None:
            if required:
                raise _violation(None, name, "Member must not be null")
            return self._absent
        return value

    def string(  # noqa: PLR0913 - one keyword per docs/protocol.md §14 constraint
        self,
        name: str,
        *,
        required: bool = False,
        pattern: re.Pattern[str] | regex.Pattern[str] | None = None,
        min_len: int = 1,
        max_len: int | None = None,
        where: str | None = None,
    ) -> str | None:
        """
        Return a string member checked against length and pattern, or None when absent.

        Raises:
            ValidationFailed: A constraint is violated or a required member is missing.
            SerializationFailed: The member is not a string.
        """
        value = self._get(name, required=required)
        if value is self._absent:
            return None
        return check_string(value, where or name, pattern=pattern, min_len=min_len, max_len=max_len)

    def integer(self, name: str, *, low: int, high: int, where: str | None = None) -> int | None:
        """
        Return an integer member within ``low..high``, or None when absent.

        Raises:
            ValidationFailed: Out of range.
            SerializationFailed: Not an integer.
        """
        value = self._get(name, required=False)
        if value is self._absent:
            return None
        where = where or name
        _expect(value, int, where)
        if value < low:
            raise _violation(value, where, f"Member must have value greater than or equal to {low}")
        if value > high:
            raise _violation(value, where, f"Member must have value less than or equal to {high}")
        return int(value)

    def boolean(self, name: str) -> bool:
        """
        Return a boolean member, False when absent.

        Raises:
            SerializationFailed: Not a boolean.
        """
        value = self._get(name, required=False)
        if value is self._absent:
            return False
        _expect(value, bool, name)
        return bool(value)

    def structure(self, name: str, *, required: bool = False) -> Shape | None:
        """
        Return a nested structure member, or None when absent.

        Raises:
            ValidationFailed: A required member is missing.
            SerializationFailed: Not a JSON object.
        """
        value = self._get(name, required=required)
        if value is self._absent:
            return None
        _expect(value, dict, name)
        return Shape(value)

    def items(
        self, name: str, *, required: bool = False, min_items: int, max_items: int | None
    ) -> list[Any] | None:
        """
        Return a list member with ``min_items..max_items`` items, or None when absent.

        Raises:
            ValidationFailed: Too few or too many items, or a required member is missing.
            SerializationFailed: Not a JSON array.
        """
        value = self._get(name, required=required)
        if value is self._absent:
            return None
        _expect(value, list, name)
        if len(value) < min_items:
            raise _violation(
                value, name, f"Member must have length greater than or equal to {min_items}"
            )
        if max_items is not None and len(value) > max_items:
            raise _violation(
                value, name, f"Member must have length less than or equal to {max_items}"
            )
        return list(value)

    # -- composite shapes (docs/protocol.md §14) -----------------------------------------------

    def destination_config(
        self, name: str = "destinationConfig"
    ) -> tuple[str | None, list[str]] | None:
        """
        Return ``(thingName, services)`` of a DestinationConfig, or None when absent.

        ``services`` is required and may not hold duplicates.

        Raises:
            ValidationFailed: A constraint is violated.
            SerializationFailed: A member has the wrong type.
        """
        shape = self.structure(name)
        if shape is None:
            return None
        thing = shape.string(
            "thingName", pattern=THING_NAME, max_len=128, where=f"{name}.thingName"
        )
        raw = shape.items("services", required=True, min_items=1, max_items=None)
        services: list[str] = []
        # Members are numbered from 1 in the location, as in AWS's messages.
        for number, item in enumerate(raw or (), 1):
            where = f"{name}.services.{number}.member"
            service = check_string(item, where, pattern=THING_NAME, max_len=128)
            if service in services:
                # Duplicates would make the relay's service ids ambiguous.
                raise _violation(service, where, "Member must be unique in the list")
            services.append(service)
        return thing, services

    def tags(self, name: str = "tags", *, required: bool = False) -> dict[str, str] | None:
        """
        Return a TagList (1..MAX_TAGS) as a dict, or None when absent; ``aws:`` keys are refused.

        Raises:
            ValidationFailed: A constraint is violated.
            SerializationFailed: A member has the wrong type.
        """
        raw = self.items(name, required=required, min_items=1, max_items=MAX_TAGS)
        if raw is None:
            return None
        tags: dict[str, str] = {}
        for number, item in enumerate(raw, 1):
            where = f"{name}.{number}.member"
            _expect(item, dict, where)
            tag = Shape(item)
            key = check_tag_key(
                tag.string("key", required=True, where=f"{where}.key"), f"{where}.key"
            )
            value = tag.string("value", required=True, min_len=0, where=f"{where}.value")
            value = check_string(value, f"{where}.value", pattern=TAG_TEXT, min_len=0, max_len=256)
            if key.lower().startswith("aws:"):
                # Reserved for AWS, the general tagging rule (a choice, docs/protocol.md §15.6).
                raise _violation(key, f"{where}.key", "Tag keys starting with 'aws:' are reserved")
            if key in tags:
                raise _violation(key, f"{where}.key", "Member must be unique in the list")
            tags[key] = value
        return tags

    def client_mode(self, name: str = "clientMode") -> str:
        """
        Return the required ClientMode enum value.

        Raises:
            ValidationFailed: Missing or not one of SOURCE, DESTINATION, ALL.
            SerializationFailed: Not a string.
        """
        value = self.string(name, required=True, min_len=0)
        if value not in CLIENT_MODES:
            raise _violation(
                value, name, f"Member must satisfy enum value set: [{', '.join(CLIENT_MODES)}]"
            )
        return value


def check_string(
    value: object,
    where: str,
    *,
    pattern: re.Pattern[str] | regex.Pattern[str] | None = None,
    min_len: int = 1,
    max_len: int | None = None,
) -> str:
    """
    Check one string value against the length and pattern constraints of docs/protocol.md §14.

    Raises:
        ValidationFailed: A constraint is violated.
        SerializationFailed: Not a string.
    """
    _expect(value, str, where)
    text = str(value)
    if len(text) < min_len:
        raise _violation(text, where, f"Member must have length greater than or equal to {min_len}")
    if max_len is not None and len(text) > max_len:
        raise _violation(text, where, f"Member must have length less than or equal to {max_len}")
    if pattern is not None and not pattern.fullmatch(text):
        raise _violation(
            text, where, f"Member must satisfy regular expression pattern: {pattern.pattern}"
        )
    return text


def check_tag_key(value: object, where: str = "tagKeys.member") -> str:
    """
    Check a TagKey: length 1..128 and the tag pattern of docs/protocol.md §14.

    Raises:
        ValidationFailed: A constraint is violated.
    """
    return check_string(value, where, pattern=TAG_TEXT, min_len=1, max_len=128)


def encode_next_token(tunnel_id: str) -> str:
    """
    Return the opaque paging token that resumes after ``tunnel_id``.

    It matches the pattern of docs/protocol.md §14.
    """
    return base64.urlsafe_b64encode((_PAGE_PREFIX + tunnel_id).encode()).decode()


def decode_next_token(token: str) -> str:
    """
    Return the tunnel id inside a paging token from :func:`encode_next_token`.

    Raises:
        ValidationFailed: The token does not match the pattern of docs/protocol.md §14 or was
            not issued here.
    """
    check_string(token, "nextToken", pattern=NEXT_TOKEN)
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    if not text.startswith(_PAGE_PREFIX) or not TUNNEL_ID.fullmatch(text[len(_PAGE_PREFIX) :]):
        raise ValidationFailed(f"Invalid nextToken '{_shown(token)}': not issued by ListTunnels")
    return text[len(_PAGE_PREFIX) :]
