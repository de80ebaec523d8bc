"""
The hand-off: what one program image of the agent passes to the next on a reload.

A reload re-executes the agent in place (:mod:`agent.daemon.reexec`). The running proxies
stay its children; the new image needs, for each tunnel, its record (tokens included), the
proxy's pid and the read ends of its stdout/stderr pipes, plus the recent token digests
that recognise a redelivered notification. Tokens must not travel on argv or in the
environment, so the description goes into an anonymous file: created with ``O_TMPFILE``
in the runtime directory (0600, no name, gone when its last descriptor closes), inherited
across ``execv``. Only its descriptor number is in the environment
(:data:`HANDOFF_ENV`), and the new image removes the variable at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from agent.daemon.children import Child
from agent.daemon.records import RecordError, TunnelRecord


if TYPE_CHECKING:
    from collections.abc import MutableMapping, Sequence
    from pathlib import Path


__all__ = [
    "HANDOFF_ENV",
    "Handoff",
    "HandoffTunnel",
    "close_descriptors",
    "read_handoff",
    "write_handoff",
]

log = structlog.get_logger("agent.daemon.handoff")

#: The environment variable naming the hand-off file's descriptor.
HANDOFF_ENV = "IOT_TUNNEL_AGENT_HANDOFF_FD"
_MAGIC = "iot-tunnel-agent-handoff"
_FORMAT_VERSION = 1
_MAX_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class HandoffTunnel:
    """
    One tunnel handed to the next program image.

    Attributes:
        record: The tunnel (tokens included).
        child: Its running proxy, or ``None`` when none runs (between restarts).
        restarts: Proxy restarts so far.
    """

    record: TunnelRecord
    child: Child | None
    restarts: int = 0


@dataclass(frozen=True, slots=True)
class Handoff:
    """
    Everything handed over.

    Attributes:
        tunnels: The live tunnels.
        recent: Token digests seen recently (duplicate notifications).
        intact: False when a hand-off was passed but could not be read: every child of
            the process is then an unsupervised stray.
    """

    tunnels: tuple[HandoffTunnel, ...] = ()
    recent: tuple[str, ...] = field(default=(), repr=False)
    intact: bool = True

    def descriptors(self) -> list[int]:
        """
        Every pipe descriptor the hand-off names.
        """
        return [fd for t in self.tunnels if t.child for fd in (t.child.stdout, t.child.stderr)]


def _encode(handoff: Handoff) -> bytes:
    tunnels: list[dict[str, Any]] = []
    for entry in handoff.tunnels:
        child = entry.child
        tunnels.append(
            {
                "record": entry.record.to_dict(),
                "restarts": entry.restarts,
                "child": None
                if child is None
                else {"pid": child.pid, "stdout": child.stdout, "stderr": child.stderr},
            }
        )
    document = {
        "magic": _MAGIC,
        "version": _FORMAT_VERSION,
        "tunnels": tunnels,
        "recent": list(handoff.recent),
    }
    return json.dumps(document).encode()


def write_handoff(handoff: Handoff, directory: Path) -> int:
    """
    Write the hand-off to an anonymous 0600 file and return its inheritable descriptor.

    Args:
        handoff: What to pass on.
        directory: Where the nameless file lives (the runtime directory, a tmpfs).

    Returns:
        The descriptor, positioned at the start, inheritable across exec.

    Raises:
        OSError: The file cannot be created or written.
    """
    file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - the descriptor outlives it
    try:
        os.fchmod(file.fileno(), 0o600)
        file.write(_encode(handoff))
        file.flush()
        fd = os.dup(file.fileno())
    finally:
        file.close()
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(fd, True)  # noqa: FBT003 - os API
    return fd


def _child(data: object) -> Child | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise RecordError("bad child")
    values = [data.get("pid"), data.get("stdout"), data.get("stderr")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 2 for v in values):
        raise RecordError("bad child")
    pid, out, err = values
    return Child(pid, out, err)  # type: ignore[arg-type]


def _decode(data: bytes) -> Handoff:
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RecordError("not valid UTF-8 JSON") from None
    if not isinstance(document, dict) or document.get("magic") != _MAGIC:
        raise RecordError("not a hand-off")
    if document.get("version") != _FORMAT_VERSION:
        raise RecordError("unknown hand-off version")
    entries = document.get("tunnels")
    recent = document.get("recent")
    if not isinstance(entries, list) or not isinstance(recent, list):
        raise RecordError("bad tunnels or recent")
    tunnels = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise RecordError("bad tunnel")
        restarts = entry.get("restarts")
        if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 0:
            raise RecordError("bad restarts")
        tunnels.append(
            HandoffTunnel(
                TunnelRecord.from_dict(entry.get("record")), _child(entry.get("child")), restarts
            )
        )
    return Handoff(tuple(tunnels), tuple(d for d in recent if isinstance(d, str)))


def _read_fd(fd: int) -> bytes:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        raise RecordError("not a regular file of ours")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise RecordError("readable by group or others")
    if info.st_size > _MAX_SIZE:
        raise RecordError("too large")
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def read_handoff(environ: MutableMapping[str, str] | None = None) -> Handoff | None:
    """
    Take the hand-off a previous program image left, if any; the variable is removed.

    A hand-off that cannot be read is reported and returned empty with ``intact`` false:
    its proxies (still our children) are then stopped by the daemon as strays, and the
    tunnels come back from their records.

    Args:
        environ: The environment; :data:`os.environ` by default.

    Returns:
        The hand-off, or ``None`` after a plain start (no hand-off).
    """
    env = os.environ if environ is None else environ
    value = env.pop(HANDOFF_ENV, None)
    if value is None:
        return None
    if not value.isdigit():
        log.error("handoff_unreadable", reason=f"{HANDOFF_ENV} is not a descriptor number")
        return Handoff(intact=False)
    fd = int(value)
    try:
        handoff = _decode(_read_fd(fd))
    except RecordError as exc:
        log.error("handoff_unreadable", reason=str(exc))  # noqa: TRY400 - no traceback
        return Handoff(intact=False)
    except OSError as exc:
        log.error("handoff_unreadable", reason=exc.strerror)  # noqa: TRY400
        return Handoff(intact=False)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return handoff


def close_descriptors(fds: Sequence[int]) -> None:
    """
    Close descriptors, ignoring those already closed.
    """
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
