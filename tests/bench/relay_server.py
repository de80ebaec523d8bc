"""
A relay in its own process for benchmarks: its CPU and memory are measured apart from the proxies.

Reads commands on stdin, one per line, and answers one JSON line on stdout:
``open SVC[,SVC...]`` -> ``{"tunnel_id", "source", "destination"}``; ``close ID`` -> ``{}``;
``stats`` -> the admission's counters (``pending``, ``refused``, ``dropped``, ``expired``) and
``peers``, the connections handed to the relay.
Prints ``{"port", "ca"}`` first. Tokens travel over this private pipe only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
from pathlib import Path

from agent.common.loop import run
from agent.emulator.admission import (
    HANDSHAKE_TIMEOUT,
    MAX_UNAUTHENTICATED,
    MAX_UNAUTHENTICATED_PER_IP,
)
from agent.emulator.pki import CertificateAuthority, KeyPair
from agent.emulator.relay import Relay
from agent.emulator.store import TunnelStore


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT)
    parser.add_argument("--max-unauthenticated", type=int, default=MAX_UNAUTHENTICATED)
    parser.add_argument(
        "--max-unauthenticated-per-ip", type=int, default=MAX_UNAUTHENTICATED_PER_IP
    )
    args = parser.parse_args()
    # Our answers own stdout; anything else (log lines) goes to stderr.
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    ca = CertificateAuthority(args.dir / "ca")
    ca.load_or_create()
    pair = ca.issue_server(KeyPair(args.dir / "relay.crt", args.dir / "relay.key"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pair.cert, pair.key)
    store = TunnelStore()
    relay = Relay(
        store,
        ssl_context=context,
        handshake_timeout=args.handshake_timeout,
        max_unauthenticated=args.max_unauthenticated,
        max_unauthenticated_per_ip=args.max_unauthenticated_per_ip,
    )
    await relay.start()
    print(json.dumps({"port": relay.port, "ca": str(ca.cert_file)}), file=channel, flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command, _, argument = line.strip().partition(" ")
        if command == "open":
            tunnel = store.open_tunnel(services=argument.split(","))
            answer = {
                "tunnel_id": tunnel.tunnel_id,
                "source": tunnel.source.token,
                "destination": tunnel.destination.token,
            }
        elif command == "close":
            store.close_tunnel(argument)
            answer = {}
        elif command == "stats":
            admission = relay.admission
            answer = {
                "pending": admission.pending,
                "refused": admission.refused,
                "dropped": admission.dropped,
                "expired": admission.expired,
                "peers": len(relay.peers),
            }
        else:
            answer = {"error": f"unknown command {command!r}"}
        print(json.dumps(answer), file=channel, flush=True)
    await relay.close()


if __name__ == "__main__":
    run(main())
