"""
Service maps of the local proxy: ``-s`` listen ports and ``-d`` destination apps.

Formats follow the AWS localproxy (docs/protocol.md §9.4): ``5555`` or ``SSH1=5555,SSH2=6666`` for a
source; ``22``, ``host:22``, ``SSH1=22,SSH2=10.0.0.1:80`` or a Unix socket path for a destination.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from agent.exceptions import AgentError
from agent.protocol.ids import SERVICE_ID


__all__ = [
    "MappingError",
    "Target",
    "match_services",
    "parse_destination_map",
    "parse_source_map",
]

# Map ids are stricter than the API's service names: no ':' (docs/protocol.md §9.4).
_T = TypeVar("_T")


class MappingError(AgentError, ValueError):
    """
    A ``-s``/``-d`` map is malformed, or does not fit the tunnel's services.
    """


@dataclass(frozen=True, slots=True)
class Target:
    """
    Where a destination sends a service's connections: TCP ``host:port`` or a Unix socket ``path``.
    """

    host: str = "127.0.0.1"
    port: int = 0
    path: str | None = None

    def __str__(self) -> str:
        """
        Render as the localproxy flag would spell it.
        """
        return self.path if self.path is not None else f"{self.host}:{self.port}"


def _split(spec: str) -> list[tuple[str, str]]:
    """
    Split ``A=x,B=y`` (or a lone ``x``) into (service id, value) pairs; "" is the unnamed id.
    """
    pairs: list[tuple[str, str]] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep:
            name, value = "", item
        elif not SERVICE_ID.fullmatch(name):
            raise MappingError(f"invalid service id {name!r}: expected [a-zA-Z0-9_-]{{1,128}}")
        if any(existing == name for existing, _ in pairs):
            # The AWS localproxy keeps the first mapping of a duplicated id.
            continue
        pairs.append((name, value.strip()))
    if not pairs:
        raise MappingError("empty service map")
    if len(pairs) > 1 and any(name == "" for name, _ in pairs):
        raise MappingError("with several mappings, each needs a service id (SSH=22,HTTP=80)")
    return pairs


def _port(value: str, *, allow_zero: bool) -> int:
    if (
        not (value.isascii() and value.isdigit())
        or not (0 if allow_zero else 1) <= int(value) <= 65535
    ):
        raise MappingError(f"invalid port {value!r}")
    return int(value)


def parse_source_map(spec: str) -> dict[str, int]:
    """
    Parse a ``-s`` value into service id -> listen port (0: pick a free port).

    Raises:
        MappingError: If the value is malformed.
    """
    return {name: _port(value, allow_zero=True) for name, value in _split(spec)}


def parse_destination_map(spec: str) -> dict[str, Target]:
    """
    Parse a ``-d`` value into service id -> target.

    Raises:
        MappingError: If the value is malformed.
    """
    targets: dict[str, Target] = {}
    for name, value in _split(spec):
        if "/" in value:
            targets[name] = Target(path=value)
            continue
        host, sep, port = value.rpartition(":")
        if not sep:
            host, port = "127.0.0.1", value
        host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
        targets[name] = Target(host=host, port=_port(port, allow_zero=False))
    return targets


def match_services(mapping: dict[str, _T], available: tuple[str, ...]) -> dict[str, _T]:
    """
    Fit a map to the tunnel's services announced in SERVICE_IDS (docs/protocol.md §10.1).

    A single unnamed mapping takes the name of the tunnel's only service. Every announced service
    needs a mapping; mappings the tunnel does not announce are dropped.

    Returns:
        The map keyed by the tunnel's service ids.

    Raises:
        MappingError: If a service of the tunnel has no mapping.
    """
    if list(mapping) == [""]:
        if len(available) > 1:
            raise MappingError(
                f"the tunnel has {len(available)} services ({', '.join(available)}) "
                "but one unnamed mapping was given"
            )
        return {(available[0] if available else ""): mapping[""]}
    missing = [service for service in available if service not in mapping]
    if missing:
        raise MappingError(f"no mapping for service(s) {', '.join(missing)}")
    return {service: mapping[service] for service in available} if available else dict(mapping)
