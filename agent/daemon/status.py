"""
The status file: the daemon's active tunnels as JSON, for ``tunnel-agent status``.

Written atomically (temporary file + rename) with mode 0600 in the runtime
directory (``$RUNTIME_DIRECTORY`` under systemd, else ``/run/iot-tunnel-agent``),
on every change and never on a timer: an idle agent does no I/O. It holds no
secret, but who runs which tunnel is nobody else's business.

The file is named after the thing (``status.<thing_name>.json``) so that two
agents sharing a runtime directory, one per thing, do not overwrite each other;
:func:`read_status` finds the only one when no thing is named.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.common.files import write_private
from agent.exceptions import AgentError


if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from agent.daemon.tunnels import TunnelInfo


__all__ = ["StatusFile", "format_status", "read_status", "status_path"]

_PREFIX, _SUFFIX = "status.", ".json"
_FORMAT_VERSION = 1


class StatusFile:
    """
    Keeps ``<runtime_dir>/status.<thing_name>.json`` up to date for one daemon process.
    """

    def __init__(self, directory: Path, *, thing_name: str) -> None:
        """
        Remember where to write; nothing is written before :meth:`write`.

        Args:
            directory: The runtime directory; created 0700 if missing.
            thing_name: Recorded in the file.
        """
        self.path = status_path(directory, thing_name)
        self._directory = directory
        self._thing_name = thing_name
        self._started_at = time.time()

    def write(
        self,
        tunnels: Sequence[TunnelInfo],
        *,
        state: str = "running",
        health: Mapping[str, Any] | None = None,
    ) -> None:
        """
        Replace the file with the current tunnels.

        Args:
            tunnels: The manager's snapshot.
            state: The daemon's state (``starting``, ``running``, ``stopping``).
            health: ``mqtt``, ``last_notification`` and ``last_rejection``
                (:func:`agent.daemon.report.health_document`).

        Raises:
            OSError: The directory or file cannot be written.
        """
        document: dict[str, Any] = {
            "version": _FORMAT_VERSION,
            "pid": os.getpid(),
            "agent_version": __version__,
            "thing_name": self._thing_name,
            "state": state,
            "started_at": self._started_at,
            "updated_at": time.time(),
            "tunnels": [
                {
                    "key": t.key,
                    "services": list(t.services),
                    "region": t.region,
                    "state": t.state,
                    "pid": t.pid,
                    "started_at": t.started_at,
                    "restarts": t.restarts,
                    "superseded": t.superseded,
                    "connected": t.connected,
                    "last_error": t.last_error,
                    "connections": t.connections,
                    "bytes_in": t.bytes_in,
                    "bytes_out": t.bytes_out,
                }
                for t in tunnels
            ],
            **(health or {}),
        }
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(self.path, json.dumps(document, indent=1).encode())

    def remove(self) -> None:
        """
        Delete the file (clean shutdown).
        """
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def status_path(directory: Path, thing_name: str) -> Path:
    """
    Return the status file of the agent serving ``thing_name`` in ``directory``.
    """
    return directory / f"{_PREFIX}{thing_name}{_SUFFIX}"


def read_status(directory: Path, thing_name: str | None = None) -> dict[str, Any]:
    """
    Read a daemon's status file and check that the daemon is alive.

    Args:
        directory: The runtime directory.
        thing_name: The agent's thing; ``None`` picks the only live agent in ``directory``.

    Returns:
        The parsed document.

    Raises:
        AgentError: No file, unreadable, malformed, its daemon is gone, or (without a
            thing name) several live agents share the directory.
    """
    if thing_name is not None:
        return _read_one(status_path(directory, thing_name))
    paths = _status_files(directory)
    if not paths:
        raise AgentError(f"no status file in {directory}: is the agent running?")
    live: list[dict[str, Any]] = []
    errors: list[AgentError] = []
    for path in paths:
        try:
            live.append(_read_one(path))
        except AgentError as exc:
            errors.append(exc)
    if len(live) == 1:
        return live[0]
    if not live:
        raise errors[0]  # e.g. a crashed agent's stale file: say which one
    things = ", ".join(str(document.get("thing_name", "?")) for document in live)
    raise AgentError(
        f"{len(live)} agents run here ({things}): choose one with --thing NAME or --config FILE"
    )


def _status_files(directory: Path) -> list[Path]:
    # scandir, not glob: glob hides a directory we may not list behind an empty result.
    try:
        with os.scandir(directory) as entries:
            names = sorted(
                e.name for e in entries if e.name.startswith(_PREFIX) and e.name.endswith(_SUFFIX)
            )
    except FileNotFoundError:
        return []
    except PermissionError:
        raise AgentError(f"{directory}: permission denied (run as the agent's user)") from None
    except OSError as exc:
        raise AgentError(f"{directory}: {exc.strerror or exc}") from None
    return [directory / name for name in names]


def _read_one(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AgentError(f"no status file at {path}: is the agent running?") from None
    except PermissionError:
        raise AgentError(f"{path}: permission denied (run as the agent's user)") from None
    except (OSError, ValueError) as exc:
        raise AgentError(f"{path}: unreadable status file ({exc})") from None
    if not isinstance(document, dict) or not isinstance(document.get("pid"), int):
        raise AgentError(f"{path}: not a status file")
    try:
        os.kill(document["pid"], 0)
    except ProcessLookupError:
        raise AgentError(f"{path}: the agent (pid {document['pid']}) is not running") from None
    except PermissionError:
        pass  # alive, owned by another user
    return document


# connected: true, false (overdue: see last_error), null (still within connect_timeout).
_CONNECTED = {True: "yes", False: "NO", None: "..."}


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _figure(tunnel: Mapping[str, Any], key: str) -> str:
    # None: the proxy does not report it (an external binary).
    value = tunnel.get(key)
    return "-" if value is None else str(value)


def format_status(document: Mapping[str, Any], *, now: float | None = None) -> str:
    """
    Render a status document as a human-readable table.

    Args:
        document: From :func:`read_status`.
        now: Current time (seconds since the epoch); :func:`time.time` by default.

    Returns:
        Lines of text, ending with a newline.
    """
    now = time.time() if now is None else now
    tunnels = document.get("tunnels", [])
    uptime = _duration(now - document.get("started_at", now))
    thing, state = document.get("thing_name", "?"), document.get("state", "?")
    lines = [f"agent pid {document['pid']} thing {thing} state {state} up {uptime}"]
    mqtt = document.get("mqtt") or {}
    if mqtt:
        since = mqtt.get("since")
        age = "" if since is None else f" for {_duration(now - since)}"
        lines.append(f"mqtt {mqtt.get('state', '?')}{age}")
    last = document.get("last_notification")
    if last:
        lines.append(
            f"last notification {_duration(now - last.get('at', now))} ago: {last.get('outcome')}"
        )
    rejection = document.get("last_rejection")
    if rejection:
        lines.append(
            f"last rejection {_duration(now - rejection.get('at', now))} ago: "
            f"{rejection.get('reason')}"
        )
    lines.append(f"{len(tunnels)} active tunnel(s)")
    if tunnels:
        lines.append(
            f"{'KEY':<10} {'SERVICES':<24} {'STATE':<11} {'PID':>7} {'UPTIME':>10} RESTARTS"
            " CONNECTED CONNS BYTES_IN BYTES_OUT"
        )
        for t in tunnels:
            services = ",".join(t.get("services", []))
            if t.get("superseded"):
                services += " (rotated)"
            pid = "-" if t.get("pid") is None else str(t["pid"])
            uptime = _duration(now - t.get("started_at", now))
            lines.append(
                f"{t.get('key', '?'):<10} {services:<24} {t.get('state', '?'):<11} "
                f"{pid:>7} {uptime:>10} {t.get('restarts', 0):<8} "
                f"{_CONNECTED.get(t.get('connected'), '-'):<9} {_figure(t, 'connections'):>5} "
                f"{_figure(t, 'bytes_in'):>8} {_figure(t, 'bytes_out'):>9}"
            )
            if t.get("last_error") and t.get("connected") is not True:
                lines.append(f"{'':<10} last error: {t['last_error']}")
    return "\n".join(lines) + "\n"
