"""
The emulator's tunnel store: every tunnel, token and binding, plus a clock.

Invariants (the control plane, the relay and the notifier all rely on them):

- Pure state. No asyncio, no sockets, no timers: the app drives :meth:`TunnelStore.expire_due`
  from a timer using :meth:`TunnelStore.next_expiry` (docs/protocol.md §16.4).
- Status moves OPEN -> CLOSED only (docs/protocol.md §16.1). A CLOSED tunnel holds no valid token.
- Each mode of an OPEN tunnel has exactly one valid client access token (CAT); the token index
  holds only those, keyed by a SHA-256 digest so lookups do not compare secrets byte by byte.
- Every change is persisted (when a state file is configured) *before* listeners hear of it, so a
  listener that crashes the process cannot lose state the API already acknowledged.
- Input shapes (patterns, lengths) are checked by the API; the store enforces limits (services,
  open-tunnel cap) and state rules (a closed tunnel cannot rotate).
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import structlog

from agent.common.files import write_private
from agent.exceptions import AgentError, ConfigError
from agent.protocol.ids import CLIENT_TOKEN, token_digest


if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping, Sequence
    from pathlib import Path


__all__ = [
    "MAX_TAGS",
    "MODES",
    "REJECT_CAT_INVALID",
    "REJECT_CAT_USED",
    "REJECT_CLIENT_ID_FORMAT",
    "REJECT_CLIENT_ID_IN_USE",
    "REJECT_CLIENT_ID_MISMATCH",
    "REJECT_EXPIRED",
    "REJECT_MODE_MISMATCH",
    "Endpoint",
    "HandshakeRejected",
    "LimitExceeded",
    "ResourceNotFound",
    "StoreError",
    "StoreEvent",
    "Tunnel",
    "TunnelStore",
    "ValidationFailed",
    "write_state",
]

log = structlog.get_logger(__name__)

MODES: tuple[str, str] = ("source", "destination")
DEFAULT_LIFETIME_MINUTES = 720
#: Tags per tunnel, counting the ones it already has: OpenTunnel and TagResource alike.
MAX_TAGS = 200

# Handshake rejection reasons. The first two are quoted from docs/protocol.md §3.6; the rest are
# chosen texts in the same "<what>: <why>" style. A revoked token reads the same as an unknown one,
# so a probe learns nothing about which tokens once existed.
REJECT_CLIENT_ID_MISMATCH = (
    "Invalid client token: The provided client token does not match the client token that "
    "was previously set."
)
REJECT_CAT_USED = (
    "Invalid access token: The access token was previously used and can not be used again."
)
REJECT_CAT_INVALID = "Invalid access token: The access token is invalid or has been revoked."
REJECT_EXPIRED = "Invalid access token: The tunnel has expired."
REJECT_MODE_MISMATCH = (
    "Invalid local proxy mode: The access token does not match the requested local-proxy-mode."
)
REJECT_CLIENT_ID_IN_USE = (
    "Invalid client token: The provided client token is already in use by another tunnel."
)
REJECT_CLIENT_ID_FORMAT = (
    "Invalid client token: The client token must match ^[a-zA-Z0-9-]{32,128}$."
)

_STATE_VERSION = 1


class StoreError(AgentError):
    """
    A request the store refuses; maps one to one onto an AWS error response.

    Attributes:
        code: The AWS error code (the ``__type`` of the response).
        status: The HTTP status of the response.
        message: Human-readable text, safe to send to the caller.
    """

    code: ClassVar[str] = "InternalFailure"
    status: int = 500

    def __init__(self, message: str) -> None:
        """
        Record the message.
        """
        super().__init__(message)
        self.message = message


class ResourceNotFound(StoreError):
    """
    No tunnel with that id or ARN (docs/protocol.md §13.2).
    """

    code = "ResourceNotFoundException"
    status = 400


class LimitExceeded(StoreError):
    """
    Too many open tunnels or services (docs/protocol.md §15.1, docs/protocol.md §18).
    """

    code = "LimitExceededException"
    status = 400


class ValidationFailed(StoreError):
    """
    The request breaks a state rule, e.g. rotating a CLOSED tunnel (docs/protocol.md §15.5).
    """

    code = "ValidationException"
    status = 400


class HandshakeRejected(StoreError):
    """
    A data-plane handshake is refused; the relay answers ``status`` with ``message`` as plain text.
    """

    code = "HandshakeRejected"

    def __init__(self, status: int, message: str) -> None:
        """
        Record the HTTP status (400: client must not retry; 5xx: it retries, docs/protocol.md §3.6).
        """
        super().__init__(message)
        self.status = status


def _ms(seconds: float) -> float:
    # AWS answers with epoch seconds to the millisecond; a float clock has microseconds and more.
    return round(seconds, 3)


def _mint_token() -> str:
    # URL-safe base64, no control characters, well under 1 KB (docs/protocol.md §16.3).
    return secrets.token_urlsafe(48)


@dataclass
class Endpoint:
    """
    One side (mode) of a tunnel.

    Attributes:
        token: The current client access token; secret, never logged.
        client_token: The client token bound on first use (docs/protocol.md §3.4), if any.
        used: Whether a handshake has consumed the token.
        connected: Whether a WebSocket of this mode is live (ConnectionState.status).
        last_updated_at: Epoch seconds, to the millisecond, of the last change of ``connected``.
    """

    token: str
    client_token: str | None = None
    used: bool = False
    connected: bool = False
    last_updated_at: float = 0.0

    def __repr__(self) -> str:
        """
        Hide the token and the client token, which are credentials.
        """
        return (
            f"Endpoint(used={self.used}, connected={self.connected}, "
            f"bound={self.client_token is not None}, last_updated_at={self.last_updated_at})"
        )


@dataclass
class Tunnel:
    """
    One tunnel record, OPEN or retained CLOSED.
    """

    tunnel_id: str
    arn: str
    region: str
    status: Literal["OPEN", "CLOSED"]
    description: str | None
    thing_name: str | None
    services: tuple[str, ...]
    has_destination_config: bool
    max_lifetime_minutes: int
    tags: dict[str, str]
    created_at: float
    last_updated_at: float
    expires_at: float
    closed_at: float | None
    source: Endpoint
    destination: Endpoint

    def endpoint(self, mode: str) -> Endpoint:
        """
        Return the endpoint of ``mode``.

        Raises:
            ValueError: ``mode`` is not "source" or "destination".
        """
        if mode == "source":
            return self.source
        if mode == "destination":
            return self.destination
        raise ValueError(f"unknown mode {mode!r}")


@dataclass(frozen=True)
class StoreEvent:
    """
    A change, delivered synchronously to every listener after it is persisted.

    Attributes:
        kind: "opened", "closed", "rotated" or "connection".
        tunnel: The tunnel after the change.
        modes: "rotated": the rotated modes; "connection": the mode that changed.
        destination_config: "opened"/"rotated": the request carried a destinationConfig, so a
            notification is due when ``tunnel.thing_name`` is set (docs/protocol.md §17.1).
    """

    kind: Literal["opened", "closed", "rotated", "connection"]
    tunnel: Tunnel
    modes: tuple[str, ...] = ()
    destination_config: bool = field(default=False)


class TunnelStore:
    """
    Every tunnel of the emulated account.
    """

    def __init__(  # noqa: PLR0913 - each knob is a documented, keyword-only emulator setting
        self,
        *,
        region: str = "us-east-1",
        account_id: str = "123456789012",
        clock: Callable[[], float] = time.time,
        max_open_tunnels: int = 100,
        max_services: int = 3,
        retention_seconds: float = 3 * 3600,
        state_file: Path | None = None,
        replace_on_rotate: bool = True,
    ) -> None:
        """
        Create the store, loading ``state_file`` when it exists.

        Args:
            region: Default region of new tunnels.
            account_id: Account id in tunnel ARNs.
            clock: Epoch-seconds clock; tests inject a fake one.
            max_open_tunnels: Cap on OPEN tunnels (docs/protocol.md §18).
            max_services: Cap on destinationConfig.services (docs/protocol.md §18: 3).
            retention_seconds: How long CLOSED tunnels stay listed (AWS: at least three hours).
            state_file: JSON file rewritten (mode 0600) on every change.
            replace_on_rotate: Read by the relay: a client with the rotated token replaces the
                old connection (True) or rotation disconnects at once (False),
                docs/protocol.md §7.7.

        Raises:
            ConfigError: ``state_file`` exists but cannot be parsed.
        """
        self.region = region
        self.account_id = account_id
        self.clock = clock
        self.max_open_tunnels = max_open_tunnels
        self.max_services = max_services
        self.retention_seconds = retention_seconds
        self.state_file = state_file
        self.replace_on_rotate = replace_on_rotate
        self.listeners: list[Callable[[StoreEvent], None]] = []
        # Insertion order is creation order, so listing newest-first is a reversal
        # (docs/protocol.md §15.4).
        self._tunnels: dict[str, Tunnel] = {}
        self._by_arn: dict[str, str] = {}
        self._tokens: dict[str, tuple[str, str]] = {}  # sha256(token) -> (tunnel_id, mode)
        if state_file is not None and state_file.exists():
            self._load(state_file)

    # -- queries -------------------------------------------------------------------------------

    def get(self, tunnel_id: str) -> Tunnel:
        """
        Return the tunnel with ``tunnel_id``.

        Raises:
            ResourceNotFound: No such tunnel (or it was deleted / purged).
        """
        try:
            return self._tunnels[tunnel_id]
        except KeyError:
            raise ResourceNotFound(f"Tunnel {tunnel_id} not found") from None

    def get_by_arn(self, arn: str) -> Tunnel:
        """
        Return the tunnel with ARN ``arn``.

        Raises:
            ResourceNotFound: No such tunnel.
        """
        tunnel_id = self._by_arn.get(arn)
        if tunnel_id is None:
            raise ResourceNotFound(f"Resource {arn} not found")
        return self._tunnels[tunnel_id]

    def list_tunnels(self, *, thing_name: str | None = None) -> list[Tunnel]:
        """
        Return tunnels newest first, OPEN and retained CLOSED (docs/protocol.md §15.4).

        Args:
            thing_name: Keep only tunnels whose destinationConfig.thingName equals it.
        """
        return [
            t
            for t in reversed(self._tunnels.values())
            if thing_name is None or t.thing_name == thing_name
        ]

    def open_count(self) -> int:
        """
        Return the number of OPEN tunnels.
        """
        return sum(1 for t in self._tunnels.values() if t.status == "OPEN")

    def next_expiry(self) -> float | None:
        """
        Return the earliest ``expires_at`` among OPEN tunnels, or None when none is open.
        """
        return min(
            (t.expires_at for t in self._tunnels.values() if t.status == "OPEN"), default=None
        )

    # -- control plane -------------------------------------------------------------------------

    def open_tunnel(  # noqa: PLR0913 - mirrors the OpenTunnel input members
        self,
        *,
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
        thing_name: str | None = None,
        services: Sequence[str] | None = None,
        max_lifetime_minutes: int | None = None,
        region: str | None = None,
    ) -> Tunnel:
        """
        Create an OPEN tunnel with a fresh CAT per mode (docs/protocol.md §15.1).

        Args:
            description: Free text.
            tags: Initial tags.
            thing_name: destinationConfig.thingName.
            services: destinationConfig.services; None means no destinationConfig.
            max_lifetime_minutes: Lifetime; default 720.
            region: Tunnel region (the caller's credential scope); default the store's.

        Returns:
            The new tunnel.

        Raises:
            LimitExceeded: Too many services, or the open-tunnel cap is reached.
        """
        self._check_services(services)
        if self.open_count() >= self.max_open_tunnels:
            raise LimitExceeded("Tunnel limit exceeded")
        now = self._now()
        lifetime = (
            DEFAULT_LIFETIME_MINUTES if max_lifetime_minutes is None else max_lifetime_minutes
        )
        tunnel_id = str(uuid.uuid4())
        region = region or self.region
        partition = "aws-cn" if region.startswith("cn-") else "aws"
        tunnel = Tunnel(
            tunnel_id=tunnel_id,
            arn=f"arn:{partition}:iot:{region}:{self.account_id}:tunnel/{tunnel_id}",
            region=region,
            status="OPEN",
            description=description,
            thing_name=thing_name if services is not None else None,
            services=tuple(services or ()),
            has_destination_config=services is not None,
            max_lifetime_minutes=lifetime,
            tags=dict(tags or {}),
            created_at=now,
            last_updated_at=now,
            expires_at=now + 60 * lifetime,
            closed_at=None,
            source=Endpoint(token=_mint_token(), last_updated_at=now),
            destination=Endpoint(token=_mint_token(), last_updated_at=now),
        )
        self._tunnels[tunnel_id] = tunnel
        self._by_arn[tunnel.arn] = tunnel_id
        for mode in MODES:
            self._tokens[token_digest(tunnel.endpoint(mode).token)] = (tunnel_id, mode)
        log.info("tunnel_opened", tunnel_id=tunnel_id, thing_name=tunnel.thing_name)
        self._changed(
            StoreEvent("opened", tunnel, destination_config=tunnel.has_destination_config)
        )
        return tunnel

    def close_tunnel(self, tunnel_id: str, *, delete: bool = False) -> None:
        """
        Close a tunnel: CLOSED, tokens revoked, both states DISCONNECTED (docs/protocol.md §15.2).

        Closing a CLOSED tunnel does nothing, or purges it when ``delete``
        (a choice, docs/protocol.md §15.2).

        Raises:
            ResourceNotFound: No such tunnel.
        """
        tunnel = self.get(tunnel_id)
        was_open = tunnel.status == "OPEN"
        if was_open:
            self._close(tunnel)
        if delete:
            self._remove(tunnel)
        if was_open:
            log.info("tunnel_closed", tunnel_id=tunnel_id, deleted=delete)
            self._changed(StoreEvent("closed", tunnel))
        elif delete:
            self._save()

    def rotate(
        self,
        tunnel_id: str,
        modes: Sequence[str],
        *,
        thing_name: str | None = None,
        services: Sequence[str] | None = None,
    ) -> Tunnel:
        """
        Revoke and re-mint the CAT of each mode in ``modes``; the expiry does not change.

        See docs/protocol.md §15.5.

        Args:
            tunnel_id: The tunnel.
            modes: "source" and/or "destination".
            thing_name: destinationConfig.thingName of the request.
            services: destinationConfig.services; not None means a destinationConfig was given,
                which replaces the stored one (a choice, docs/protocol.md §15.5).

        Returns:
            The tunnel, holding the new tokens.

        Raises:
            ResourceNotFound: No such tunnel.
            ValidationFailed: The tunnel is CLOSED, a mode is unknown, or a destinationConfig
                comes without the destination mode.
            LimitExceeded: Too many services.
        """
        tunnel = self.get(tunnel_id)
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise ValidationFailed(f"Invalid client mode '{', '.join(bad)}'")
        if services is not None and "destination" not in modes:
            raise ValidationFailed("You can not use DestinationConfig with source clientMode")
        if tunnel.status != "OPEN":
            raise ValidationFailed(f"Tunnel {tunnel_id} is closed")
        self._check_services(services)
        now = self._now()
        rotated = tuple(m for m in MODES if m in modes)
        for mode in rotated:
            old = tunnel.endpoint(mode)
            # Revocation drops the token and its client-token binding together
            # (docs/protocol.md §15.5).
            self._tokens.pop(token_digest(old.token), None)
            old.token = _mint_token()
            old.client_token = None
            old.used = False
            self._tokens[token_digest(old.token)] = (tunnel_id, mode)
        if services is not None:
            tunnel.thing_name = thing_name
            tunnel.services = tuple(services)
            tunnel.has_destination_config = True
        tunnel.last_updated_at = now
        log.info("tunnel_rotated", tunnel_id=tunnel_id, modes=rotated)
        self._changed(
            StoreEvent("rotated", tunnel, rotated, destination_config=services is not None)
        )
        return tunnel

    def tag(self, arn: str, tags: Mapping[str, str]) -> None:
        """
        Insert or overwrite tags by key (docs/protocol.md §15.6).

        Raises:
            ResourceNotFound: No such tunnel.
            ValidationFailed: The tunnel would hold more than :data:`MAX_TAGS` tags; none
                of ``tags`` is applied then.
        """
        current = self.get_by_arn(arn).tags
        total = len(current.keys() | tags.keys())
        if total > MAX_TAGS:
            # ValidationException, not LimitExceededException: botocore's standard retry mode
            # treats the latter as throttling and would send the same request three times.
            raise ValidationFailed(
                f"Tag limit exceeded: resource {arn} would have {total} tags, "
                f"the limit is {MAX_TAGS}"
            )
        current.update(tags)
        self._save()

    def untag(self, arn: str, keys: Iterable[str]) -> None:
        """
        Remove tags by key; absent keys are ignored (docs/protocol.md §15.7).

        Raises:
            ResourceNotFound: No such tunnel.
        """
        tags = self.get_by_arn(arn).tags
        for key in keys:
            tags.pop(key, None)
        self._save()

    # -- data plane ----------------------------------------------------------------------------

    def authenticate(self, *, mode: str, token: str, client_token: str | None) -> Tunnel:
        """
        Check a handshake's token and client token and consume the token (docs/protocol.md §3.4).

        The relay has already checked path, mode parameter and "exactly one token".

        Args:
            mode: The ``local-proxy-mode`` of the request.
            token: The CAT presented.
            client_token: The ``client-token`` header, if any.

        Returns:
            The tunnel the token belongs to.

        Raises:
            HandshakeRejected: 400 with the reason text of docs/protocol.md §3.6.
        """
        entry = self._tokens.get(token_digest(token))
        if entry is None:
            raise HandshakeRejected(400, REJECT_CAT_INVALID)
        # Only OPEN tunnels have indexed tokens: closing drops them (invariants above).
        tunnel = self._tunnels[entry[0]]
        if self._now() >= tunnel.expires_at:
            raise HandshakeRejected(400, REJECT_EXPIRED)
        if entry[1] != mode:
            raise HandshakeRejected(400, REJECT_MODE_MISMATCH)
        if client_token is not None and not CLIENT_TOKEN.fullmatch(client_token):
            raise HandshakeRejected(400, REJECT_CLIENT_ID_FORMAT)
        ep = tunnel.endpoint(mode)
        if ep.used:
            if ep.client_token is None:
                raise HandshakeRejected(400, REJECT_CAT_USED)
            if client_token is None or not secrets.compare_digest(client_token, ep.client_token):
                raise HandshakeRejected(400, REJECT_CLIENT_ID_MISMATCH)
            return tunnel
        if client_token is not None:
            if self._client_token_in_use(client_token):
                raise HandshakeRejected(400, REJECT_CLIENT_ID_IN_USE)
            ep.client_token = client_token
        ep.used = True
        self._save()
        return tunnel

    def set_connected(self, tunnel_id: str, mode: str, connected: bool) -> None:
        """
        Record a WebSocket of ``mode`` going up or down (docs/protocol.md §16.2).

        A no-op when the state does not change, when the tunnel is gone, or when a CLOSED
        tunnel would become connected: the relay may report a socket that outlived its tunnel.

        Raises:
            ValueError: ``mode`` is unknown.
        """
        tunnel = self._tunnels.get(tunnel_id)
        if tunnel is None:
            return
        ep = tunnel.endpoint(mode)
        if ep.connected == connected or (connected and tunnel.status != "OPEN"):
            return
        ep.connected = connected
        ep.last_updated_at = self._now()
        self._changed(StoreEvent("connection", tunnel, (mode,)))

    # -- lifecycle -----------------------------------------------------------------------------

    def expire_due(self) -> list[Tunnel]:
        """
        Close OPEN tunnels past their lifetime; purge CLOSED ones past retention.

        See docs/protocol.md §16.4.

        Returns:
            The tunnels this call closed (each also emitted a "closed" event).
        """
        now = self._now()
        expired = [t for t in self._tunnels.values() if t.status == "OPEN" and now >= t.expires_at]
        stale = [
            t
            for t in self._tunnels.values()
            if t.closed_at is not None and now >= t.closed_at + self.retention_seconds
        ]
        for tunnel in stale:
            self._remove(tunnel)
        for tunnel in expired:
            self._close(tunnel)
        if stale and not expired:
            self._save()
        for tunnel in expired:
            log.info("tunnel_expired", tunnel_id=tunnel.tunnel_id)
            self._changed(StoreEvent("closed", tunnel))
        return expired

    # -- internals -----------------------------------------------------------------------------

    def _now(self) -> float:
        # Every stored timestamp comes from here, so API answers and the state file agree.
        return _ms(self.clock())

    def _check_services(self, services: Sequence[str] | None) -> None:
        if services is not None and len(services) > self.max_services:
            raise LimitExceeded(
                f"Number of services {len(services)} exceeds the limit of {self.max_services}"
            )

    def _client_token_in_use(self, client_token: str) -> bool:
        # Unique across the account's open tunnels (docs/protocol.md §3.4).
        return any(
            t.endpoint(m).client_token == client_token
            for t in self._tunnels.values()
            if t.status == "OPEN"
            for m in MODES
        )

    def _close(self, tunnel: Tunnel) -> None:
        now = self._now()
        tunnel.status = "CLOSED"
        tunnel.last_updated_at = now
        tunnel.closed_at = now
        for mode in MODES:
            ep = tunnel.endpoint(mode)
            self._tokens.pop(token_digest(ep.token), None)
            ep.client_token = None
            if ep.connected:
                ep.connected = False
                ep.last_updated_at = now

    def _remove(self, tunnel: Tunnel) -> None:
        for mode in MODES:
            self._tokens.pop(token_digest(tunnel.endpoint(mode).token), None)
        self._tunnels.pop(tunnel.tunnel_id, None)
        self._by_arn.pop(tunnel.arn, None)

    def _changed(self, event: StoreEvent) -> None:
        self._save()
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                # A broken listener must not fail the API call that already changed state.
                log.exception("store_listener_failed", kind=event.kind)

    # -- persistence ---------------------------------------------------------------------------

    def _save(self) -> None:
        if self.state_file is None:
            return
        data = {
            "version": _STATE_VERSION,
            "tunnels": [_tunnel_to_json(t) for t in self._tunnels.values()],
        }
        write_state(self.state_file, data)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            version = data.get("version")
            tunnels = [_tunnel_from_json(t) for t in data["tunnels"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"cannot load emulator state {path}: {exc}") from exc
        if version != _STATE_VERSION:
            raise ConfigError(f"cannot load emulator state {path}: version {version!r}")
        now = self._now()
        for tunnel in tunnels:
            for mode in MODES:
                ep = tunnel.endpoint(mode)
                # No WebSocket survives a restart of the emulator.
                if ep.connected:
                    ep.connected = False
                    ep.last_updated_at = now
                if tunnel.status == "OPEN":
                    self._tokens[token_digest(ep.token)] = (tunnel.tunnel_id, mode)
            self._tunnels[tunnel.tunnel_id] = tunnel
            self._by_arn[tunnel.arn] = tunnel.tunnel_id


def write_state(path: Path, data: object) -> None:
    """
    Replace ``path`` with ``data`` as compact JSON, atomically and with mode 0600.

    Args:
        path: The state file; its directory is created when missing.
        data: Anything :func:`json.dumps` accepts.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, json.dumps(data, separators=(",", ":")).encode())


def _tunnel_to_json(t: Tunnel) -> dict[str, Any]:
    return {
        "tunnel_id": t.tunnel_id,
        "arn": t.arn,
        "region": t.region,
        "status": t.status,
        "description": t.description,
        "thing_name": t.thing_name,
        "services": list(t.services),
        "has_destination_config": t.has_destination_config,
        "max_lifetime_minutes": t.max_lifetime_minutes,
        "tags": t.tags,
        "created_at": t.created_at,
        "last_updated_at": t.last_updated_at,
        "expires_at": t.expires_at,
        "closed_at": t.closed_at,
        "source": _endpoint_to_json(t.source),
        "destination": _endpoint_to_json(t.destination),
    }


def _endpoint_to_json(ep: Endpoint) -> dict[str, Any]:
    return {
        "token": ep.token,
        "client_token": ep.client_token,
        "used": ep.used,
        "connected": ep.connected,
        "last_updated_at": ep.last_updated_at,
    }


def _tunnel_from_json(d: dict[str, Any]) -> Tunnel:
    status = d["status"]
    if status not in ("OPEN", "CLOSED"):
        raise ValueError(f"bad status {status!r}")
    return Tunnel(
        tunnel_id=str(d["tunnel_id"]),
        arn=str(d["arn"]),
        region=str(d["region"]),
        status=cast("Literal['OPEN', 'CLOSED']", status),
        description=d["description"],
        thing_name=d["thing_name"],
        services=tuple(str(s) for s in d["services"]),
        has_destination_config=bool(d["has_destination_config"]),
        max_lifetime_minutes=int(d["max_lifetime_minutes"]),
        tags={str(k): str(v) for k, v in d["tags"].items()},
        created_at=_ms(float(d["created_at"])),
        last_updated_at=_ms(float(d["last_updated_at"])),
        expires_at=_ms(float(d["expires_at"])),
        closed_at=None if d["closed_at"] is None else _ms(float(d["closed_at"])),
        source=_endpoint_from_json(d["source"]),
        destination=_endpoint_from_json(d["destination"]),
    )


def _endpoint_from_json(d: dict[str, Any]) -> Endpoint:
    # Files written before timestamps were cut to milliseconds carry more digits.
    return Endpoint(**{**d, "last_updated_at": _ms(float(d["last_updated_at"]))})
