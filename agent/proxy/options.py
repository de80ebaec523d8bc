"""
Validated settings of one local proxy process, independent of how they were given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.protocol import Mode, ProtocolVersion
from agent.protocol.ids import REGION


if TYPE_CHECKING:
    from agent.proxy.mapping import Target


__all__ = ["ProxyOptions", "endpoint_for_region", "parse_endpoint"]

_ENDPOINT = re.compile(r"[a-zA-Z0-9.:\[\]-]+")


def endpoint_for_region(region: str) -> tuple[str, int]:
    """
    Return the data-plane host and port of an AWS region (docs/protocol.md §2.1).
    """
    if not REGION.fullmatch(region):
        raise ValueError(f"invalid region {region!r}")
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"data.tunneling.iot.{region}.{suffix}", 443


def parse_endpoint(value: str) -> tuple[str, int]:
    """
    Parse ``-e host[:port]`` (no scheme; default port 443; IPv6 in brackets).
    """
    value = value.strip().lower()
    if not value or not _ENDPOINT.fullmatch(value):
        raise ValueError(f"invalid proxy endpoint {value!r}: expected host[:port]")
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":") or "443"
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, "443"
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"invalid proxy endpoint {value!r}: expected host[:port]")
    return host, int(port)


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    """
    Everything a proxy run needs; secrets stay out of ``repr``.
    """

    mode: Mode
    host: str
    port: int
    token: str = field(repr=False)
    client_token: str | None = field(default=None, repr=False)
    source_ports: dict[str, int] = field(default_factory=dict)
    targets: dict[str, Target] = field(default_factory=dict)
    bind_address: str | None = None
    version: ProtocolVersion = ProtocolVersion.V3
    tls: bool = True
    verify: bool = True
    ca_path: str | None = None
    https_proxy: str | None = None
    ping_interval: float = 20.0
    reconnect_delay: float = 2.5
    tcp_connect_retries: int = 5
    tcp_connect_delay: float = 2.5
    max_connections: int = 128
    report_fd: int | None = None
