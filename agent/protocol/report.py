"""
The bundled proxy's report channel: JSON lines about its local connections. Pure: no I/O.

``tunnel-localproxy --report-fd N`` writes one JSON object per line to descriptor N (a
pipe the daemon made for it), so the daemon learns per-connection figures without
reading log text. Bytes are counted at the proxy's local sockets: ``bytes_in`` came
from the tunnel (written to the local application), ``bytes_out`` went into the tunnel.

Lines::

    {"event": "opened", "service": "SSH", "connection": 1}
    {"event": "closed", "service": "SSH", "connection": 1, "bytes_in": 10, "bytes_out": 20,
     "refused": false}
    {"event": "totals", "connections": 1, "bytes_in": 10, "bytes_out": 20}

``refused`` is true when the far side (or the local service) ended the connection before
any byte came back: on the destination, its service refused the connect; on the source,
the destination's service did. ``totals`` are cumulative, written at most once a second
while bytes flow and with every opened/closed line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal


__all__ = ["ReportLine", "encode_report", "parse_report"]

_EVENTS = frozenset({"opened", "closed", "totals"})


@dataclass(frozen=True, slots=True)
class ReportLine:
    """
    One line of the report channel, validated.

    Attributes:
        event: ``opened``, ``closed`` or ``totals``.
        service: The connection's service id (``opened``/``closed``).
        connection: The connection id within the service.
        connections: Open local connections (``totals``).
        bytes_in: Bytes from the tunnel: this connection's, or all so far (``totals``).
        bytes_out: Bytes into the tunnel, likewise.
        refused: The connection ended before any byte came from the tunnel.
    """

    event: Literal["opened", "closed", "totals"]
    service: str = ""
    connection: int = 0
    connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    refused: bool = False


def encode_report(line: ReportLine) -> bytes:
    """
    Encode one line (with its newline), leaving out fields that do not apply.
    """
    document: dict[str, Any] = {"event": line.event}
    if line.event == "totals":
        document.update(
            connections=line.connections, bytes_in=line.bytes_in, bytes_out=line.bytes_out
        )
    else:
        document.update(service=line.service, connection=line.connection)
        if line.event == "closed":
            document.update(bytes_in=line.bytes_in, bytes_out=line.bytes_out, refused=line.refused)
    return json.dumps(document, separators=(",", ":")).encode() + b"\n"


def _count(document: dict[str, Any], key: str) -> int:
    value = document.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} is not a count")
    return value


def parse_report(data: bytes) -> ReportLine | None:
    """
    Decode one line; ``None`` for anything malformed (the channel is advisory).
    """
    try:
        document = json.loads(data)
        if not isinstance(document, dict) or document.get("event") not in _EVENTS:
            return None
        service = document.get("service", "")
        if not isinstance(service, str) or len(service) > 128:
            return None
        return ReportLine(
            event=document["event"],
            service=service,
            connection=_count(document, "connection"),
            connections=_count(document, "connections"),
            bytes_in=_count(document, "bytes_in"),
            bytes_out=_count(document, "bytes_out"),
            refused=document.get("refused") is True,
        )
    except ValueError:
        return None
