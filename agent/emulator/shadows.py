"""
Device shadows as AWS IoT keeps them: the document store behind the shadow topics and iot-data.

Invariants (the MQTT service and the HTTP API rely on them):

- Pure state. No asyncio, sockets or MQTT: callers hand in request bytes and get documents back;
  listeners hear of every accepted change (:class:`ShadowEvent`) after it is persisted.
- One shadow per (thing, name); the name ``None`` is the classic (unnamed) shadow.
- ``desired`` and ``reported`` are JSON objects without nulls: a null in an update deletes that
  key (``"desired": null`` deletes the whole section), objects merge key by key, every other
  value (arrays included) replaces. A section left empty is dropped from the document.
- ``metadata`` mirrors the state: the same keys at every object level, ``{"timestamp": t}`` for a
  scalar, one metadata entry per element for an array.
- ``version`` grows by one per accepted update. Deleting keeps the version (a tombstone), so a
  shadow created again under the same name continues from it.
- Every failure is a :class:`ShadowRejected` carrying the HTTP status and message AWS IoT uses,
  and the request's client token when it had a valid one, so the rejected document can echo it.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import structlog

from agent.emulator.store import StoreError, write_state
from agent.exceptions import ConfigError
from agent.protocol.ids import THING_NAME


if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


__all__ = [
    "MAX_CLIENT_TOKEN_BYTES",
    "MAX_DEPTH",
    "MAX_REQUEST_BYTES",
    "MAX_STATE_BYTES",
    "SHADOW_NAME_PATTERN",
    "JsonObject",
    "Shadow",
    "ShadowEvent",
    "ShadowRejected",
    "ShadowStore",
    "compute_delta",
    "json_equal",
    "merge_state",
    "request_client_token",
    "stamp",
]

log = structlog.get_logger(__name__)

JsonObject = dict[str, Any]

#: Largest ``desired`` plus ``reported`` (compact JSON, metadata excluded), AWS IoT's quota.
MAX_STATE_BYTES = 8 * 1024
#: Most levels of objects and arrays below ``desired`` or ``reported``.
MAX_DEPTH = 6
#: Longest accepted ``clientToken``, in UTF-8 bytes.
MAX_CLIENT_TOKEN_BYTES = 64
#: Largest request document; AWS IoT's MQTT payload limit.
MAX_REQUEST_BYTES = 128 * 1024
#: Named-shadow names, as the iot-data service model spells them.
SHADOW_NAME_PATTERN = re.compile(r"[$a-zA-Z0-9:_-]{1,64}")

_SECTIONS = ("desired", "reported")
_STATE_VERSION = 1
_ERROR_CODES = {
    400: "InvalidRequestException",
    404: "ResourceNotFoundException",
    409: "ConflictException",
    413: "RequestEntityTooLargeException",
    415: "UnsupportedDocumentEncodingException",
}
# The texts AWS IoT answers with (its 415 text has "documented" in it, not "document").
_INVALID_JSON = "Invalid JSON"
_TOO_LARGE = "The payload exceeds the maximum size allowed"
_NOT_UTF8 = "Unsupported documented encoding; supported encoding is UTF-8"
_TOO_DEEP = f"JSON contains too many levels of nesting; maximum is {MAX_DEPTH}"


class ShadowRejected(StoreError):
    """
    A shadow request AWS IoT refuses: a ``.../rejected`` document or an iot-data error.

    Attributes:
        status: The HTTP status, also the ``code`` of the rejected document.
        code: The iot-data error code (``x-amzn-ErrorType``).
        message: The AWS text.
        client_token: The request's client token, echoed in the rejected document.
    """

    def __init__(self, status: int, message: str, *, client_token: str | None = None) -> None:
        """
        Record the status, its iot-data error code and the client token.
        """
        super().__init__(message)
        self.status = status
        self.code = _ERROR_CODES.get(status, "InternalFailureException")  # type: ignore[misc]
        self.client_token = client_token

    def document(self, timestamp: int) -> JsonObject:
        """
        Return the error response document published on ``.../rejected``.
        """
        out: JsonObject = {"code": self.status, "message": self.message, "timestamp": timestamp}
        if self.client_token is not None:
            out["clientToken"] = self.client_token
        return out


# -- pure document operations -----------------------------------------------------------------


def json_equal(a: Any, b: Any) -> bool:
    """
    Compare two JSON values as JSON does: ``true`` is not ``1``; ``1`` equals ``1.0``.
    """
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(v, b[k]) for k, v in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def merge_state(
    section: JsonObject | None, metadata: JsonObject | None, patch: JsonObject, timestamp: int
) -> tuple[JsonObject, JsonObject]:
    """
    Apply an update section to a stored section and its metadata, AWS-style.

    Neither argument is changed. A null deletes the key, an object merges into a stored
    object key by key, any other value (arrays included) replaces.

    Args:
        section: The stored section (no nulls), or None when absent.
        metadata: The section's metadata (mirrors ``section``), or None.
        patch: The request's section.
        timestamp: Epoch seconds stamped on every field the patch sets.

    Returns:
        ``(section, metadata)`` after the update; the section holds no nulls.
    """
    out = dict(section or {})
    meta = dict(metadata or {})
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
            meta.pop(key, None)
        elif isinstance(value, dict):
            # The stored value decides whether to merge: metadata leaves are objects too.
            current = out.get(key)
            nested = isinstance(current, dict)
            out[key], meta[key] = merge_state(
                current if nested else None,
                meta.get(key) if nested else None,
                value,
                timestamp,
            )
        else:
            out[key] = value
            meta[key] = stamp(value, timestamp)
    return out, meta


def stamp(value: Any, timestamp: int) -> Any:
    """
    Return the metadata of ``value``: its structure with ``{"timestamp": t}`` at the leaves.
    """
    if isinstance(value, dict):
        return {k: stamp(v, timestamp) for k, v in value.items()}
    if isinstance(value, list):
        return [stamp(v, timestamp) for v in value]
    return {"timestamp": timestamp}


def compute_delta(
    desired: JsonObject | None, reported: JsonObject | None, metadata: JsonObject | None = None
) -> tuple[JsonObject, JsonObject]:
    """
    Return the delta state and its metadata: what ``desired`` holds that ``reported`` does not.

    A desired key missing from ``reported`` is in the delta; nested objects are compared key by
    key and keep their path to the root; any other differing value (arrays included) is copied
    whole. Keys only in ``reported`` are not in the delta.

    Args:
        desired: The desired section.
        reported: The reported section.
        metadata: The desired section's metadata; the delta carries the matching entries.

    Returns:
        ``(delta, delta_metadata)``, both empty when nothing differs.
    """
    delta: JsonObject = {}
    delta_meta: JsonObject = {}
    reported = reported or {}
    metadata = metadata or {}
    for key, want in (desired or {}).items():
        have = reported.get(key)
        meta = metadata.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            nested, nested_meta = compute_delta(
                want, have, meta if isinstance(meta, dict) else None
            )
            if nested:
                delta[key] = nested
                delta_meta[key] = nested_meta
        elif key not in reported or not json_equal(want, have):
            delta[key] = want
            delta_meta[key] = meta if meta is not None else {}
    return delta, delta_meta


def request_client_token(payload: bytes) -> str | None:
    """
    Return the valid ``clientToken`` of a get or delete request, whose payload is otherwise ignored.
    """
    try:
        data = json.loads(payload) if payload.strip() else None
    except (ValueError, RecursionError):
        return None
    return _valid_token(data.get("clientToken")) if isinstance(data, dict) else None


def _valid_token(token: Any) -> str | None:
    if isinstance(token, str) and len(token.encode()) <= MAX_CLIENT_TOKEN_BYTES:
        return token
    return None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text}")
    return value


def _reject_constant(name: str) -> float:
    raise ValueError(f"not JSON: {name}")


def _too_deep(value: Any, budget: int) -> bool:
    # Stops once the budget is spent, so deep input costs no deep recursion here.
    if not isinstance(value, (dict, list)):
        return False
    if budget == 0:
        return True
    children = value.values() if isinstance(value, dict) else value
    return any(_too_deep(child, budget - 1) for child in children)


def _null_in_array(value: Any, *, in_array: bool = False) -> bool:
    # Arrays are stored as given, so no null may hide anywhere inside one.
    if value is None:
        return in_array
    if isinstance(value, dict):
        return any(_null_in_array(v, in_array=in_array) for v in value.values())
    if isinstance(value, list):
        return any(_null_in_array(v, in_array=True) for v in value)
    return False


def _decode(payload: bytes) -> JsonObject:
    if len(payload) > MAX_REQUEST_BYTES:
        raise ShadowRejected(413, _TOO_LARGE)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ShadowRejected(415, _NOT_UTF8) from None
    try:
        data = json.loads(text, parse_float=_finite, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ShadowRejected(400, _INVALID_JSON) from None
    if not isinstance(data, dict):
        raise ShadowRejected(400, _INVALID_JSON)
    return data


def _check_section(key: str, section: Any, token: str | None) -> None:
    if key not in _SECTIONS:
        raise ShadowRejected(400, f"State contains an invalid node: '{key}'", client_token=token)
    if section is not None and not isinstance(section, dict):
        raise ShadowRejected(400, f"{key.capitalize()} node must be an object", client_token=token)
    # Depth first: the null scan below recurses, and only ever over shallow sections.
    if _too_deep(section, MAX_DEPTH + 1):
        raise ShadowRejected(400, _TOO_DEEP, client_token=token)
    if _null_in_array(section):
        raise ShadowRejected(400, _INVALID_JSON, client_token=token)


def _size(section: JsonObject | None) -> int:
    return len(json.dumps(section, separators=(",", ":")).encode()) if section else 0


# -- the store --------------------------------------------------------------------------------


@dataclass
class Shadow:
    """
    One shadow, live or deleted (a tombstone keeping its version).

    Attributes:
        thing: The thing name.
        name: The shadow name; None for the classic shadow.
        desired: The desired section; None when absent.
        reported: The reported section; None when absent.
        metadata: ``{"desired": ..., "reported": ...}``, each mirroring its section.
        version: The document version (0 before the first update).
        deleted: Whether the shadow is deleted (or was never created).
    """

    thing: str
    name: str | None
    desired: JsonObject | None = None
    reported: JsonObject | None = None
    metadata: JsonObject = field(default_factory=dict)
    version: int = 0
    deleted: bool = True

    @property
    def label(self) -> str:
        """
        The shadow's name in AWS error texts: ``thing`` or ``thing~name``.
        """
        return self.thing if self.name is None else f"{self.thing}~{self.name}"

    def document(self) -> JsonObject:
        """
        Return ``{"state", "metadata", "version"}`` as in ``/update/documents``.
        """
        state: JsonObject = {}
        metadata: JsonObject = {}
        for section in _SECTIONS:
            value = getattr(self, section)
            if value:
                state[section] = value
                metadata[section] = self.metadata.get(section, {})
        return {"state": state, "metadata": metadata, "version": self.version}


@dataclass(frozen=True)
class ShadowEvent:
    """
    An accepted change, delivered to every listener after it is persisted.

    Attributes:
        kind: "updated" or "deleted".
        thing: The thing name.
        name: The shadow name (None: classic).
        accepted: The ``/update/accepted`` or ``/delete/accepted`` document.
        documents: "updated": the ``/update/documents`` document.
        delta: "updated": the ``/update/delta`` document, or None when nothing differs.
    """

    kind: Literal["updated", "deleted"]
    thing: str
    name: str | None
    accepted: JsonObject
    documents: JsonObject | None = None
    delta: JsonObject | None = None


@dataclass(frozen=True)
class _Update:
    client_token: str | None
    version: int | None
    state: JsonObject | None  # None: "state": null, clearing both sections


class ShadowStore:
    """
    Every shadow of the emulated account.
    """

    def __init__(
        self,
        *,
        state_file: Path | None = None,
        clock: Callable[[], float] = time.time,
        max_state_bytes: int = MAX_STATE_BYTES,
    ) -> None:
        """
        Create the store, loading ``state_file`` when it exists.

        Args:
            state_file: JSON file rewritten (mode 0600, atomically) on every change.
            clock: Epoch-seconds clock; tests inject a fake one.
            max_state_bytes: Quota of ``desired`` plus ``reported``.

        Raises:
            ConfigError: ``state_file`` exists but cannot be parsed.
        """
        self.state_file = state_file
        self.clock = clock
        self.max_state_bytes = max_state_bytes
        self.listeners: list[Callable[[ShadowEvent], None]] = []
        self._shadows: dict[tuple[str, str | None], Shadow] = {}
        if state_file is not None and state_file.exists():
            self._load(state_file)

    # -- queries -------------------------------------------------------------------------------

    def shadow(self, thing: str, name: str | None) -> Shadow | None:
        """
        Return the live shadow, or None when it does not exist or is deleted.
        """
        found = self._shadows.get((thing, name))
        return None if found is None or found.deleted else found

    def list_named(self, thing: str) -> list[str]:
        """
        Return the names of the thing's live named shadows, sorted.
        """
        return sorted(
            s.name
            for (owner, _), s in self._shadows.items()
            if owner == thing and s.name is not None and not s.deleted
        )

    # -- operations ----------------------------------------------------------------------------

    def get(self, thing: str, name: str | None, *, client_token: str | None = None) -> JsonObject:
        """
        Return the ``/get/accepted`` document (the GetThingShadow payload).

        Args:
            thing: Thing name.
            name: Shadow name; None for the classic shadow.
            client_token: Echoed in the document (MQTT requests).

        Raises:
            ShadowRejected: 400 for an invalid name, 404 when no such shadow exists.
        """
        shadow = self._live(thing, name, client_token)
        doc = shadow.document()
        delta, _ = compute_delta(shadow.desired, shadow.reported)
        if delta:
            doc["state"]["delta"] = delta
        doc["timestamp"] = self._now()
        if client_token is not None:
            doc["clientToken"] = client_token
        return doc

    def update(self, thing: str, name: str | None, payload: bytes) -> JsonObject:
        """
        Apply a request state document and return the ``/update/accepted`` document.

        Creates the shadow when needed. Listeners then receive the documents and delta.

        Args:
            thing: Thing name.
            name: Shadow name; None for the classic shadow.
            payload: The request document as sent.

        Returns:
            The request's state with the metadata of the fields it set, the new version, the
            timestamp and the client token.

        Raises:
            ShadowRejected: 400 bad names or document, 409 version conflict, 413 too large,
                415 not UTF-8.
        """
        self._check_names(thing, name, None)
        request = self._parse_update(payload)
        token = request.client_token
        current = self._shadows.get((thing, name)) or Shadow(thing, name)
        if request.version is not None and (current.deleted or request.version != current.version):
            raise ShadowRejected(409, "Version conflict", client_token=token)
        now = self._now()
        updated = self._apply(current, request.state, now)
        if _size(updated.desired) + _size(updated.reported) > self.max_state_bytes:
            raise ShadowRejected(413, _TOO_LARGE, client_token=token)
        previous = None if current.deleted else current.document()
        self._shadows[thing, name] = updated
        accepted: JsonObject = {
            "state": request.state,
            "metadata": {} if request.state is None else stamp(request.state, now),
            "version": updated.version,
            "timestamp": now,
        }
        documents: JsonObject = {
            "previous": previous,
            "current": updated.document(),
            "timestamp": now,
        }
        delta_state, delta_meta = compute_delta(
            updated.desired, updated.reported, updated.metadata.get("desired")
        )
        delta = None
        if delta_state:
            delta = {
                "state": delta_state,
                "metadata": delta_meta,
                "version": updated.version,
                "timestamp": now,
            }
        for doc in (accepted, documents, delta):
            if doc is not None and token is not None:
                doc["clientToken"] = token
        log.info("shadow_updated", thing_name=thing, shadow=name, version=updated.version)
        self._changed(ShadowEvent("updated", thing, name, accepted, documents, delta))
        return accepted

    def delete(
        self, thing: str, name: str | None, *, client_token: str | None = None
    ) -> JsonObject:
        """
        Delete a shadow and return the ``/delete/accepted`` document; the version is kept.

        Raises:
            ShadowRejected: 400 for an invalid name, 404 when no such shadow exists.
        """
        shadow = self._live(thing, name, client_token)
        self._shadows[thing, name] = Shadow(thing, name, version=shadow.version, deleted=True)
        accepted: JsonObject = {"version": shadow.version, "timestamp": self._now()}
        if client_token is not None:
            accepted["clientToken"] = client_token
        log.info("shadow_deleted", thing_name=thing, shadow=name, version=shadow.version)
        self._changed(ShadowEvent("deleted", thing, name, accepted))
        return accepted

    # -- internals -----------------------------------------------------------------------------

    def _now(self) -> int:
        return int(self.clock())

    @staticmethod
    def _check_names(thing: str, name: str | None, token: str | None) -> None:
        if not THING_NAME.fullmatch(thing):
            raise ShadowRejected(400, "Invalid thing name", client_token=token)
        if name is not None and not SHADOW_NAME_PATTERN.fullmatch(name):
            raise ShadowRejected(400, "Invalid shadow name", client_token=token)

    def _live(self, thing: str, name: str | None, token: str | None) -> Shadow:
        self._check_names(thing, name, token)
        shadow = self.shadow(thing, name)
        if shadow is None:
            label = Shadow(thing, name).label
            raise ShadowRejected(404, f"No shadow exists with name: '{label}'", client_token=token)
        return shadow

    @staticmethod
    def _parse_update(payload: bytes) -> _Update:
        data = _decode(payload)
        token = None
        if "clientToken" in data:
            token = _valid_token(data["clientToken"])
            if token is None:
                raise ShadowRejected(400, "Invalid clientToken")
        version = data.get("version")
        if version is not None and (
            not isinstance(version, int) or isinstance(version, bool) or version < 0
        ):
            raise ShadowRejected(400, "Invalid version", client_token=token)
        if "state" not in data:
            raise ShadowRejected(400, "Missing required node: state", client_token=token)
        state = data["state"]
        if state is not None and not isinstance(state, dict):
            raise ShadowRejected(400, "State node must be an object", client_token=token)
        for key, section in (state or {}).items():
            _check_section(key, section, token)
        return _Update(client_token=token, version=version, state=state)

    @staticmethod
    def _apply(current: Shadow, state: JsonObject | None, now: int) -> Shadow:
        sections = {s: None if current.deleted else getattr(current, s) for s in _SECTIONS}
        metadata = {} if current.deleted else dict(current.metadata)
        for section in _SECTIONS:
            if state is None or (section in state and state[section] is None):
                sections[section] = None
                metadata.pop(section, None)
            elif section in state:
                merged, meta = merge_state(
                    sections[section], metadata.get(section), state[section], now
                )
                # A section left empty is dropped, like one set to null.
                sections[section] = merged or None
                if merged:
                    metadata[section] = meta
                else:
                    metadata.pop(section, None)
        return Shadow(
            current.thing,
            current.name,
            desired=sections["desired"],
            reported=sections["reported"],
            metadata=metadata,
            version=current.version + 1,
            deleted=False,
        )

    def _changed(self, event: ShadowEvent) -> None:
        self._save()
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                # A broken listener must not fail a request whose change is already stored.
                log.exception("shadow_listener_failed", kind=event.kind)

    # -- persistence ---------------------------------------------------------------------------

    def _save(self) -> None:
        if self.state_file is None:
            return
        write_state(
            self.state_file,
            {
                "version": _STATE_VERSION,
                "shadows": [_shadow_to_json(s) for s in self._shadows.values()],
            },
        )

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            version = data.get("version")
            shadows = [_shadow_from_json(s) for s in data["shadows"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"cannot load shadow state {path}: {exc}") from exc
        if version != _STATE_VERSION:
            raise ConfigError(f"cannot load shadow state {path}: version {version!r}")
        for shadow in shadows:
            self._shadows[shadow.thing, shadow.name] = shadow


def _shadow_to_json(s: Shadow) -> JsonObject:
    return {
        "thing": s.thing,
        "name": s.name,
        "desired": s.desired,
        "reported": s.reported,
        "metadata": s.metadata,
        "version": s.version,
        "deleted": s.deleted,
    }


def _shadow_from_json(d: JsonObject) -> Shadow:
    name = d["name"]
    sections = (d["desired"], d["reported"], d["metadata"])
    if not isinstance(d["thing"], str) or not (name is None or isinstance(name, str)):
        raise TypeError("bad shadow names")
    if any(v is not None and not isinstance(v, dict) for v in sections) or d["metadata"] is None:
        raise TypeError("bad shadow sections")
    return Shadow(
        thing=d["thing"],
        name=name,
        desired=d["desired"],
        reported=d["reported"],
        metadata=d["metadata"],
        version=int(d["version"]),
        deleted=bool(d["deleted"]),
    )
