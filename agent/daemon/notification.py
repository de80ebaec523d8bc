"""
Tunnel notification payload (bytes) -> :class:`TunnelRequest`. Pure: no I/O, no clock.

The payload arrives on ``$aws/things/<thing>/tunnels/notify`` (docs/protocol.md §17.1)::

    {"clientAccessToken": "...", "clientMode": "destination",
     "region": "us-east-1", "services": ["SSH"]}

Invariants: :func:`parse_notification` raises nothing but
:class:`InvalidNotification`, whatever the bytes; an error message names the
field and the rule it broke and never quotes a value from the payload (a token
put in the wrong field, even slightly altered, must not reach a log), only its
type, length and a 6-digit hash to tell two rejections apart; the token only
leaves a :class:`TunnelRequest` through ``get_secret_value()``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from agent.exceptions import InvalidNotification
from agent.protocol.ids import (
    ACCESS_TOKEN,
    API_SERVICE,
    MAX_TOKEN_LENGTH,
    REGION,
    SERVICE_ID,
    token_digest,
)


if TYPE_CHECKING:
    from collections.abc import Collection


__all__ = [
    "MAX_PAYLOAD_SIZE",
    "MAX_SERVICES",
    "TunnelRequest",
    "parse_notification",
    "requested_services",
]

# A real notification is ~1 KiB (a <1 KB token plus three ids); 16 KiB leaves room and
# bounds the JSON parser's work on hostile input.
MAX_PAYLOAD_SIZE = 16 * 1024
# Services per tunnel (docs/protocol.md §18).
MAX_SERVICES = 3


@dataclass(frozen=True, slots=True)
class TunnelRequest:
    """
    A validated request to open the destination side of a tunnel.

    Attributes:
        token: The destination client access token; its repr is masked.
        region: The tunnel's AWS region (selects the data-plane host).
        services: The requested service ids, in the notification's order.
    """

    token: SecretStr
    region: str
    services: tuple[str, ...]


def _reject_constant(name: str) -> Any:
    raise InvalidNotification(f"payload contains the non-JSON constant {name}")


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Duplicate keys would let two parsers of the same bytes disagree on the token.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidNotification(f"payload repeats a key ({_describe(key)})")
        result[key] = value
    return result


def _decode(payload: bytes, max_size: int) -> dict[str, Any]:
    if len(payload) > max_size:
        raise InvalidNotification(f"payload is {len(payload)} bytes, more than {max_size}")
    try:
        text = payload.decode("utf-8")
        document = json.loads(
            text, object_pairs_hook=_unique_object, parse_constant=_reject_constant
        )
    except InvalidNotification:
        raise
    except UnicodeDecodeError:
        raise InvalidNotification("payload is not UTF-8") from None
    # RecursionError: deeply nested arrays fit in 16 KiB; the message would echo nothing.
    except (ValueError, RecursionError):
        raise InvalidNotification("payload is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidNotification(f"payload is a JSON {type(document).__name__}, not an object")
    return document


def _describe(value: object) -> str:
    """
    Describe a rejected value without quoting any of it: its type, length and short hash.
    """
    if isinstance(value, str):
        return f"{len(value)} characters, sha256 {token_digest(value)[:6]}"
    return "null" if value is None else f"a JSON {_JSON_TYPES.get(type(value), 'value')}"


_JSON_TYPES = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}


def _check_token(value: object) -> SecretStr:
    # Messages below describe the token's shape only, never its characters.
    if not isinstance(value, str):
        raise InvalidNotification("clientAccessToken is missing or not a string")
    if not value:
        raise InvalidNotification("clientAccessToken is empty")
    if len(value) > MAX_TOKEN_LENGTH:
        raise InvalidNotification(
            f"clientAccessToken is {len(value)} characters, more than {MAX_TOKEN_LENGTH}"
        )
    if not ACCESS_TOKEN.fullmatch(value):
        raise InvalidNotification("clientAccessToken contains characters outside the URL-safe set")
    return SecretStr(value)


def _check_region(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidNotification("region is missing or not a string")
    if not REGION.fullmatch(value):
        raise InvalidNotification(
            f"region does not look like an AWS region such as us-east-1 ({_describe(value)})"
        )
    return value


def _check_services(value: object, allowed: Collection[str] | None) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise InvalidNotification("services is missing or not a list")
    if not 1 <= len(value) <= MAX_SERVICES:
        raise InvalidNotification(
            f"services has {len(value)} entries, expected 1 to {MAX_SERVICES}"
        )
    services: list[str] = []
    for index, item in enumerate(value):
        where = f"services[{index}]"
        if not isinstance(item, str) or not API_SERVICE.fullmatch(item):
            raise InvalidNotification(
                f"{where} does not match [a-zA-Z0-9:_-]{{1,128}} ({_describe(item)})"
            )
        if not SERVICE_ID.fullmatch(item):
            raise InvalidNotification(f"{where} contains ':', which a local proxy cannot map")
        if item in services:
            raise InvalidNotification(f"{where} repeats services[{services.index(item)}]")
        services.append(item)
    # Deny by default: one unknown service refuses the whole notification (docs/protocol.md §17.4).
    if allowed is not None:
        for index, item in enumerate(services):
            if item not in allowed:
                offered = ", ".join(sorted(allowed)) or "none"
                raise InvalidNotification(
                    f"services[{index}] is not in the services map (this device offers: {offered})"
                )
    return tuple(services)


def parse_notification(
    payload: bytes,
    *,
    allowed_services: Collection[str] | None = None,
    max_size: int = MAX_PAYLOAD_SIZE,
) -> TunnelRequest:
    """
    Parse and validate one tunnel notification.

    Args:
        payload: The raw MQTT payload.
        allowed_services: The configured service names; ``None`` skips that check.
        max_size: Largest payload accepted, in bytes.

    Returns:
        The validated request.

    Raises:
        InvalidNotification: For any defect; the message names it and never the token.
    """
    document = _decode(payload, max_size)
    mode = document.get("clientMode")
    # The Device Client accepts only lowercase "destination" (docs/protocol.md §17.2).
    if mode != "destination":
        raise InvalidNotification(f"clientMode is not 'destination' ({_describe(mode)})")
    region = _check_region(document.get("region"))
    services = _check_services(document.get("services"), allowed_services)
    token = _check_token(document.get("clientAccessToken"))
    return TunnelRequest(token=token, region=region, services=services)


def requested_services(
    payload: bytes, *, max_size: int = MAX_PAYLOAD_SIZE
) -> tuple[tuple[str, ...] | None, int | None]:
    """
    What a (possibly rejected) notification asked for, safe to report.

    Args:
        payload: The raw MQTT payload.
        max_size: Largest payload looked at, in bytes.

    Returns:
        ``(services, None)`` when ``services`` is a list of well-formed service ids;
        ``(None, count)`` when it is a list of anything else (no value is repeated);
        ``(None, None)`` when there is no list to look at.
    """
    try:
        value = _decode(payload, max_size).get("services")
    except InvalidNotification:
        return None, None
    if not isinstance(value, list):
        return None, None
    if len(value) <= MAX_SERVICES and all(
        isinstance(item, str) and SERVICE_ID.fullmatch(item) for item in value
    ):
        return tuple(value), None
    return None, len(value)
