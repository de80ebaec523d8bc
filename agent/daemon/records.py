"""
Tunnel records: what a live tunnel needs to be reconnected by the next agent process.

One file per tunnel, ``<state_dir>/tunnel-<key>.json``, mode 0600, written whole and
atomically (:func:`~agent.common.files.write_private`). It holds the access token and the
client token: with the same client token the relay accepts the spent access token again,
so a restarted agent (or a rebooted device) can reconnect the tunnel without a rotation.

Reading trusts nothing: a file that is not a regular file, is owned by another uid, can
be read or written by group or others, or does not parse is reported (its name and the
reason, never a byte of its content) and ignored.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import SecretStr

from agent.common.files import write_private
from agent.exceptions import AgentError
from agent.protocol.ids import ACCESS_TOKEN, CLIENT_TOKEN, MAX_TOKEN_LENGTH, REGION, SERVICE_ID


if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


__all__ = ["RecordError", "RecordStore", "TunnelRecord", "parse_record"]

log = structlog.get_logger("agent.daemon.records")

_FORMAT_VERSION = 1
_PREFIX, _SUFFIX = "tunnel-", ".json"
# Keys are secrets.token_hex(4): a file name can never hold anything else.
_KEY = re.compile(r"[0-9a-f]{8}", re.ASCII)
# The proxy's -e override, as settings accept it.
_ENDPOINT = re.compile(r"[a-z0-9.\[\]-]{1,253}(:[0-9]{1,5})?", re.ASCII)
# A record is well under 8 KiB (a 4 KiB token at most); refuse to parse a bigger file.
_MAX_SIZE = 64 * 1024
_MAX_SERVICES = 3


class RecordError(AgentError):
    """
    A tunnel record file cannot be used; the message names the reason, never the content.
    """


@dataclass(frozen=True, slots=True)
class TunnelRecord:
    """
    One live tunnel, as kept on disk.

    Attributes:
        key: The tunnel's short id in logs and in the file name.
        services: The notification's service ids.
        region: The tunnel's region (``-r``).
        endpoint: The data-plane ``-e`` override the proxy used, if any.
        token: The destination access token (masked in repr).
        client_token: The proxy's client token (excluded from repr).
        started_at: When the tunnel was first opened, seconds since the epoch.
        expires_at: When the agent stops it (``max_tunnel_lifetime``), seconds since the epoch.
        generation: 0 for a first token, +1 for each rotation that superseded a tunnel.
    """

    key: str
    services: tuple[str, ...]
    region: str
    endpoint: str | None
    token: SecretStr = field(repr=False)
    client_token: str = field(repr=False)
    started_at: float
    expires_at: float
    generation: int = 0

    def to_dict(self) -> dict[str, Any]:
        """
        The record as a JSON-ready mapping, tokens included.
        """
        return {
            "version": _FORMAT_VERSION,
            "key": self.key,
            "services": list(self.services),
            "region": self.region,
            "endpoint": self.endpoint,
            "token": self.token.get_secret_value(),
            "client_token": self.client_token,
            "started_at": self.started_at,
            "expires_at": self.expires_at,
            "generation": self.generation,
        }

    @classmethod
    def from_dict(cls, data: object) -> TunnelRecord:
        """
        Validate a parsed record.

        Args:
            data: What ``json.loads`` returned.

        Returns:
            The record.

        Raises:
            RecordError: The first defect, by field name only.
        """
        if not isinstance(data, dict):
            raise RecordError("not a JSON object")
        if data.get("version") != _FORMAT_VERSION:
            raise RecordError("unknown format version")
        for name, valid in _CHECKS.items():
            if not valid(data.get(name)):
                raise RecordError(f"bad {name}")
        return cls(
            key=data["key"],
            services=tuple(data["services"]),
            region=data["region"],
            endpoint=data["endpoint"],
            token=SecretStr(data["token"]),
            client_token=data["client_token"],
            started_at=float(data["started_at"]),
            expires_at=float(data["expires_at"]),
            generation=data["generation"],
        )


def _matches(pattern: re.Pattern[str]) -> Callable[[object], bool]:
    return lambda value: isinstance(value, str) and pattern.fullmatch(value) is not None


def _services(value: object) -> bool:
    return (
        isinstance(value, list)
        and 1 <= len(value) <= _MAX_SERVICES
        and all(isinstance(s, str) and SERVICE_ID.fullmatch(s) for s in value)
        and len(set(value)) == len(value)
    )


def _token(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_TOKEN_LENGTH
        and ACCESS_TOKEN.fullmatch(value) is not None
    )


def _time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _generation(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# Field -> validity; a record with any invalid field is refused whole.
_CHECKS: dict[str, Callable[[object], bool]] = {
    "key": _matches(_KEY),
    "services": _services,
    "region": _matches(REGION),
    "endpoint": lambda value: value is None or _matches(_ENDPOINT)(value),
    "token": _token,
    "client_token": _matches(CLIENT_TOKEN),
    "started_at": _time,
    "expires_at": _time,
    "generation": _generation,
}


def _read_checked(path: Path) -> bytes:
    """
    Read a record file if it is ours and private; raise :class:`RecordError` otherwise.
    """
    try:
        # O_NOFOLLOW: a symlink planted in the directory is refused, not followed.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise RecordError(f"cannot open ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RecordError("not a regular file")
        if info.st_uid != os.getuid():
            raise RecordError(f"owned by uid {info.st_uid}, not by the agent (uid {os.getuid()})")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise RecordError(f"mode {mode:04o} lets group or others access it (expected 0600)")
        if info.st_size > _MAX_SIZE:
            raise RecordError(f"{info.st_size} bytes, more than {_MAX_SIZE}")
        return os.read(fd, _MAX_SIZE + 1)
    finally:
        os.close(fd)


def parse_record(data: bytes) -> TunnelRecord:
    """
    Parse one record file's bytes.

    Raises:
        RecordError: Not UTF-8 JSON, or a field is wrong (the message never quotes the data).
    """
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RecordError("not valid UTF-8 JSON") from None
    return TunnelRecord.from_dict(document)


class RecordStore:
    """
    The tunnel records of one agent, in its state directory.
    """

    def __init__(self, directory: Path) -> None:
        """
        Remember the directory; nothing is touched before :meth:`prepare`.

        Args:
            directory: The state directory (``StateDirectory=`` under systemd).
        """
        self.directory = directory

    def path(self, key: str) -> Path:
        """
        The file of the tunnel ``key``.
        """
        return self.directory / f"{_PREFIX}{key}{_SUFFIX}"

    def prepare(self) -> bool:
        """
        Create the directory (0700) if needed.

        Returns:
            Whether records can be kept; if not, a warning says why.
        """
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            writable = os.access(self.directory, os.W_OK | os.X_OK)
        except OSError as exc:
            log.warning("tunnel_state_unavailable", path=str(self.directory), error=exc.strerror)
            return False
        if not writable:
            log.warning("tunnel_state_unavailable", path=str(self.directory), error="not writable")
        return writable

    def save(self, record: TunnelRecord) -> bool:
        """
        Write (or replace) a tunnel's record; a failure is logged, not raised.

        Returns:
            Whether the record is on disk.
        """
        path = self.path(record.key)
        try:
            write_private(path, json.dumps(record.to_dict()).encode())
        except OSError as exc:
            log.warning("tunnel_record_write_failed", path=str(path), error=exc.strerror)
            return False
        return True

    def remove(self, key: str) -> None:
        """
        Delete a tunnel's record, if there is one.
        """
        path = self.path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("tunnel_record_remove_failed", path=str(path), error=exc.strerror)

    def _files(self) -> list[Path]:
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            log.warning("tunnel_state_unreadable", path=str(self.directory), error=exc.strerror)
            return []
        return sorted(p for p in entries if p.name.startswith(_PREFIX) and p.name.endswith(_SUFFIX))

    def load(self) -> list[TunnelRecord]:
        """
        Read every usable record; report and skip the others.

        Returns:
            The records, in file-name order.
        """
        records = []
        for path in self._files():
            try:
                record = parse_record(_read_checked(path))
                if path.name != self.path(record.key).name:
                    raise RecordError("file name does not match the record's key")  # noqa: TRY301
            except RecordError as exc:
                log.warning("tunnel_record_ignored", path=str(path), reason=str(exc))
                continue
            records.append(record)
        return records

    def purge(self) -> int:
        """
        Delete every record file this uid owns (persistence was turned off).

        Returns:
            How many were deleted.
        """
        removed = 0
        for path in self._files():
            with contextlib.suppress(OSError):
                if path.lstat().st_uid == os.getuid():
                    path.unlink()
                    removed += 1
        return removed
