"""Benchmark of the emulator's control-plane API through boto3 (one client, sequential calls).

Starts its own ControlPlaneApi on 127.0.0.1:0 (SigV4 verification on, like the emulator app)
and measures requests per second for DescribeTunnel and for OpenTunnel+CloseTunnel pairs.

    .venv/bin/python tests/bench/api_bench.py [--requests N] [--no-verify] [--state-file] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import boto3
import structlog
from botocore.config import Config

from agent.emulator.api import ControlPlaneApi
from agent.emulator.store import TunnelStore


ACCESS_KEY, SECRET_KEY = "AKIABENCH00000000000", "bench-secret"


def measure(name: str, calls: int, fn: Any) -> dict[str, Any]:
    """Run ``fn`` ``calls`` times and return throughput and latency percentiles."""
    latencies = []
    start = time.perf_counter()
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "name": name,
        "calls": calls,
        "seconds": round(elapsed, 3),
        "per_second": round(calls / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2),
    }


def run(requests: int, *, verify: bool, state_dir: Path | None) -> dict[str, Any]:
    """Start an API on a background loop, benchmark it with one boto3 client, stop it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    store = TunnelStore(
        max_open_tunnels=requests + 10,
        state_file=None if state_dir is None else state_dir / "state.json",
    )
    api = ControlPlaneApi(store, credentials={ACCESS_KEY: SECRET_KEY} if verify else None)
    asyncio.run_coroutine_threadsafe(api.start(), loop).result(30)
    client = boto3.client(
        "iotsecuretunneling",
        endpoint_url=api.url,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(retries={"total_max_attempts": 1}),
    )
    try:
        tunnel_id = client.open_tunnel(destinationConfig={"thingName": "t", "services": ["SSH"]})[
            "tunnelId"
        ]
        for _ in range(20):  # warm up connections and botocore's caches
            client.describe_tunnel(tunnelId=tunnel_id)
        describe = measure(
            "DescribeTunnel", requests, lambda: client.describe_tunnel(tunnelId=tunnel_id)
        )

        def open_close() -> None:
            tid = client.open_tunnel()["tunnelId"]
            client.close_tunnel(tunnelId=tid)

        pairs = measure("OpenTunnel+CloseTunnel", max(1, requests // 2), open_close)
        pairs["api_calls_per_second"] = round(pairs["per_second"] * 2, 1)
    finally:
        client.close()
        asyncio.run_coroutine_threadsafe(api.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
    return {
        "signature_check": verify,
        "state_file": state_dir is not None,
        "results": [describe, pairs],
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="DescribeTunnel calls")
    parser.add_argument("--no-verify", action="store_true", help="turn the SigV4 check off")
    parser.add_argument("--state-file", action="store_true", help="persist to a state file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--localproxy",
        metavar="PATH",
        help="accepted like every bench; this one measures no local proxy, so it has no effect",
    )
    args = parser.parse_args(argv)
    # Per-call log lines would land on stdout and cost time: keep warnings and errors only.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory() as tmp:
        report = run(
            args.requests,
            verify=not args.no_verify,
            state_dir=Path(tmp) if args.state_file else None,
        )
    if args.json:
        print(json.dumps(report))
        return 0
    print(
        f"control-plane API via boto3, one client "
        f"(SigV4 check {'on' if report['signature_check'] else 'off'}, "
        f"state file {'on' if report['state_file'] else 'off'})"
    )
    for r in report["results"]:
        extra = (
            f"  ({r['api_calls_per_second']} API calls/s)" if "api_calls_per_second" in r else ""
        )
        print(
            f"  {r['name']:<24} {r['per_second']:>8.1f}/s  p50 {r['p50_ms']:.2f} ms  "
            f"p99 {r['p99_ms']:.2f} ms  n={r['calls']}{extra}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
