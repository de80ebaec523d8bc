"""
Tests for the local side of the proxy: how much a local read may take.
"""

from __future__ import annotations

from agent.protocol import SOURCE
from agent.proxy.local import PAUSED_READ_SIZE, READ_SIZE, Bridge, LocalConnection
from agent.proxy.options import ProxyOptions


def test_reads_while_the_tunnel_is_congested_are_small():
    """
    A read while locals are paused takes at most 1 KB.

    uvloop reads a new connection once even if paused: a burst of new connections must not
    stack 64 KB each behind a full WebSocket.
    """
    bridge = Bridge(ProxyOptions(mode=SOURCE, host="127.0.0.1", port=1, token="t"))
    local = LocalConnection(bridge, "SSH", 1)

    free = len(local.get_buffer(-1))
    bridge.pause_locals()
    paused = len(local.get_buffer(-1))
    bridge.resume_locals()
    resumed = len(local.get_buffer(-1))

    assert (free, paused, resumed) == (READ_SIZE, PAUSED_READ_SIZE, READ_SIZE)
