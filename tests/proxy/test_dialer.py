"""The WebSocket URI and handshake request a proxy builds (agent/proxy/runner.py)."""

from __future__ import annotations

import pytest
from websockets.uri import parse_uri

from agent.protocol import DESTINATION, SOURCE
from agent.proxy.destination import DestinationBridge
from agent.proxy.mapping import Target
from agent.proxy.options import ProxyOptions
from agent.proxy.runner import _Dialer
from agent.proxy.source import SourceBridge


AWS = "data.tunneling.iot.us-east-1.amazonaws.com"


@pytest.mark.parametrize(
    ("host", "port", "tls", "uri", "host_header"),
    [
        (AWS, 443, True, f"wss://{AWS}/tunnel", AWS),
        ("127.0.0.1", 8443, True, "wss://127.0.0.1:8443/tunnel", "127.0.0.1:8443"),
        ("::1", 8443, True, "wss://[::1]:8443/tunnel", "[::1]:8443"),
        ("localhost", 80, False, "ws://localhost/tunnel", "localhost"),
        ("localhost", 8080, False, "ws://localhost:8080/tunnel", "localhost:8080"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("mode", [DESTINATION, SOURCE])
async def test_uri_is_what_parsing_the_url_would_give(host, port, tls, uri, host_header, mode):
    """The URI is built from its parts; it must equal websockets' parse of the same URL."""
    options = ProxyOptions(
        mode=mode,
        host=host,
        port=port,
        token="an-access-token",
        targets={"SSH": Target(host="127.0.0.1", port=22)} if mode is DESTINATION else {},
        source_ports={"SSH": 0} if mode is SOURCE else {},
        tls=tls,
    )
    bridge = DestinationBridge(options) if mode is DESTINATION else SourceBridge(options)
    dialer = _Dialer(options, bridge)
    query = f"?local-proxy-mode={mode.query}"
    assert dialer.uri == parse_uri(uri + query)
    request = dialer._connection()._request
    assert request.path == "/tunnel" + query
    assert request.headers["Host"] == host_header
    assert request.headers["access-token"] == "an-access-token"
