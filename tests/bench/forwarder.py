"""
A bare byte forwarder, for the benchmark's floor: uvloop and TLS without WebSocket or tunnel.

Three of these stand where the source proxy, the relay and the destination proxy stand, with the
same sockets and the same TLS, but each connection is only copied to one upstream connection.
What that chain measures is the least any asyncio/uvloop design pays on this machine; the tunnel's
figures minus the floor's are what our WebSocket and tunnel code cost.

Prints its listening port on stdout, then runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from typing import cast

from agent.common.loop import run


READ_SIZE = 64 * 1024


class _Pipe(asyncio.BufferedProtocol):
    """
    One side of a forwarded connection; ``peer`` is the other side.
    """

    def __init__(self, peer: _Pipe | None = None) -> None:
        self.buffer = memoryview(bytearray(READ_SIZE))
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []  # read before the upstream connection exists
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(self.buffer[:nbytes])
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        # TLS cannot half-close: the other side closes once its buffer is flushed.
        self.eof = True
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    server_tls = None
    if args.cert:
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(args.cert, args.key)
    client_tls = ssl.create_default_context(cafile=args.ca) if args.ca else None

    async def connect(downstream: _Pipe) -> None:
        try:
            _, upstream = await loop.create_connection(
                lambda: _Pipe(downstream), "127.0.0.1", args.to, ssl=client_tls
            )
        except OSError:
            if downstream.transport is not None:
                downstream.transport.close()
            return
        downstream.peer = upstream
        assert upstream.transport is not None
        upstream.transport.writelines(downstream.early)
        downstream.early.clear()
        if downstream.eof:
            upstream.transport.close()

    def accepted() -> _Pipe:
        downstream = _Pipe()
        loop.call_soon(lambda: loop.create_task(connect(downstream)))
        return downstream

    server = await loop.create_server(accepted, "127.0.0.1", 0, ssl=server_tls)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--to", type=int, required=True, help="upstream port on 127.0.0.1")
    parser.add_argument("--cert", help="serve TLS with this certificate (PEM)")
    parser.add_argument("--key", help="private key of --cert")
    parser.add_argument("--ca", help="connect upstream with TLS, verified against this CA")
    run(serve(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
