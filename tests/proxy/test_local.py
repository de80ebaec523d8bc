"""
Tests for the local side of the proxy: how much a local read may take, how connections end.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

from agent.protocol import SOURCE, SessionReset
from agent.proxy.local import PAUSED_READ_SIZE, READ_SIZE, Bridge, LocalConnection
from agent.proxy.options import ProxyOptions


if TYPE_CHECKING:
    from pathlib import Path


def bridge() -> Bridge:
    return Bridge(ProxyOptions(mode=SOURCE, host="127.0.0.1", port=1, token="t"))


def test_reads_while_the_tunnel_is_congested_are_small():
    """
    A read while locals are paused takes at most 1 KB.

    uvloop reads a new connection once even if paused: a burst of new connections must not
    stack 64 KB each behind a full WebSocket.
    """
    local = LocalConnection(bridge(), "SSH", 1)

    free = len(local.get_buffer(-1))
    local.bridge.pause_locals()
    paused = len(local.get_buffer(-1))
    local.bridge.resume_locals()
    resumed = len(local.get_buffer(-1))

    assert (free, paused, resumed) == (READ_SIZE, PAUSED_READ_SIZE, READ_SIZE)


async def attach(local: LocalConnection) -> socket.socket:
    """Connect ``local`` over TCP on 127.0.0.1; return the application's (non-blocking) end."""
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)  # noqa: FBT003 - the socket API
        _, (app, _) = await asyncio.gather(
            loop.create_connection(lambda: local, *listener.getsockname()),
            loop.sock_accept(listener),
        )
    local.bridge.add_local(local)
    return app


async def read_to_end(app: socket.socket) -> tuple[bytes, str]:
    """Everything the application reads, and how its connection ended: "eof" or "reset"."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    try:
        async with asyncio.timeout(10):
            while chunk := await loop.sock_recv(app, 1 << 20):
                data += chunk
    except ConnectionResetError:
        return bytes(data), "reset"
    finally:
        app.close()
    return bytes(data), "eof"


class TestEnds:
    async def test_a_normal_end_is_eof_after_the_data(self):
        """A stream the far side ended closes with FIN once its bytes are delivered."""
        local = LocalConnection(bridge(), "SSH", 1)
        app = await attach(local)
        payload = bytes(range(256)) * 40_000  # more than the socket buffers take at once

        local.write(payload)
        local.close_by_peer()

        assert await read_to_end(app) == (payload, "eof")

    async def test_a_reset_is_an_error_to_the_application(self):
        """reset() sends RST: the application's read fails instead of seeing a clean EOF."""
        local = LocalConnection(bridge(), "SSH", 1)
        app = await attach(local)
        payload = b"x" * 10_000_000

        local.write(payload)
        local.reset()
        data, end = await read_to_end(app)

        assert end == "reset"
        assert len(data) < len(payload)

    async def test_session_end_resets_cut_streams_and_lets_ended_ones_finish(self):
        """When the session ends, open connections get RST; one the peer ended gets its data."""
        side = bridge()
        ended, cut = LocalConnection(side, "SSH", 1), LocalConnection(side, "SSH", 2)
        ended_app, cut_app = await attach(ended), await attach(cut)
        payload = b"y" * 3_000_000

        ended.write(payload)
        ended.close_by_peer()
        cut.write(payload)
        side.session_ended()
        results = await asyncio.gather(read_to_end(ended_app), read_to_end(cut_app))

        assert results[0] == (payload, "eof")
        assert results[1][1] == "reset"
        assert side.locals == {}

    async def test_session_reset_resets(self):
        """A SESSION_RESET from the relay cuts every stream: RST."""
        side = bridge()
        local = LocalConnection(side, "SSH", 1)
        app = await attach(local)

        local.write(b"partial")
        side.handle_event(SessionReset())

        assert (await read_to_end(app))[1] == "reset"

    async def test_reset_while_connecting_resets_once_connected(self):
        """A stream cut before its local connect completes: data dropped, RST on connect."""
        side = bridge()
        local = LocalConnection(side, "SSH", 1)
        side.add_local(local)
        local.write(b"never delivered")

        side.session_ended()
        app = await attach(local)

        assert await read_to_end(app) == (b"", "reset")
        assert local.closed

    async def test_unix_socket_reset_drops_what_is_queued(self, tmp_path: Path):
        """A Unix socket cannot send RST: reset closes it without writing the queued bytes."""
        loop = asyncio.get_running_loop()
        path = str(tmp_path / "s")
        local = LocalConnection(bridge(), "SSH", 1)
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(path)
            listener.listen()
            listener.setblocking(False)  # noqa: FBT003 - the socket API
            _, (app, _) = await asyncio.gather(
                loop.create_unix_connection(lambda: local, path), loop.sock_accept(listener)
            )
        payload = b"z" * 10_000_000

        local.write(payload)
        local.reset()
        data, _ = await read_to_end(app)

        assert len(data) < len(payload)
