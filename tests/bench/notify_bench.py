"""Benchmark: latency from the OpenTunnel call to the notification on the device's MQTT client.

Runs a whole emulator (API with SigV4 checks, mosquitto, notifier) on a background event
loop, and a device-side :class:`MqttNotificationSource` for one thing on the main loop.
For each tunnel, sequentially: boto3 ``OpenTunnel`` with ``destinationConfig.thingName``
(in a worker thread), then wait for the notification. Reported:

* ``open_to_notify``: from just before the OpenTunnel call to the moment the payload is
  handed to the device's event loop (what an agent would see);
* ``open_call``: the OpenTunnel round trip alone (boto3 -> API -> boto3);
* ``after_response``: arrival minus the moment boto3 returned (negative: the
  notification beat the HTTP response, since the store event fires inside the call).

    .venv/bin/python tests/bench/notify_bench.py [--tunnels N] [--json]
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

import structlog

from agent.emulator.app import Emulator
from agent.notify.mqtt import MqttNotificationSource


def percentiles(name: str, samples: list[float]) -> dict[str, Any]:
    """Summarise latencies in seconds as milliseconds."""
    ordered = sorted(samples)
    return {
        "name": name,
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


async def measure(emulator: Emulator, tunnels: int) -> dict[str, Any]:
    """Open ``tunnels`` tunnels one by one and time each notification's arrival."""
    bundle = emulator.bundle("bench-thing")
    host, port = emulator.mqtt_endpoint
    client = emulator.api_client()
    config = {"thingName": "bench-thing", "services": ["SSH"]}
    arrivals: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    source = MqttNotificationSource(
        thing_name="bench-thing",
        endpoint=host,
        port=port,
        cert=bundle.cert,
        key=bundle.key,
        ca=bundle.ca,
    )

    async def consume() -> None:
        async for notification in source:
            arrivals.put_nowait((time.perf_counter(), notification.payload))
            notification.ack()

    end_to_end: list[float] = []
    calls: list[float] = []
    after: list[float] = []
    async with source:
        consumer = asyncio.create_task(consume())
        try:
            for _ in range(10):  # warm up boto3, the API and the MQTT path
                await asyncio.to_thread(client.open_tunnel, destinationConfig=config)
                await arrivals.get()
            for _ in range(tunnels):
                start = time.perf_counter()
                response = await asyncio.to_thread(client.open_tunnel, destinationConfig=config)
                returned = time.perf_counter()
                async with asyncio.timeout(10):
                    arrived, payload = await arrivals.get()
                token = json.loads(payload)["clientAccessToken"]
                if token != response["destinationAccessToken"]:
                    raise RuntimeError("notification for another tunnel")
                end_to_end.append(arrived - start)
                calls.append(returned - start)
                after.append(arrived - returned)
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            client.close()
    return {
        "tunnels": tunnels,
        "results": [
            percentiles("open_to_notify", end_to_end),
            percentiles("open_call", calls),
            percentiles("after_response", after),
        ],
    }


def run(tunnels: int, directory: Path) -> dict[str, Any]:
    """Start the emulator on a background loop, measure from the main loop, stop it."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    emulator = Emulator(directory, relay=False, max_open_tunnels=tunnels + 100)
    emulator.add_thing("bench-thing")
    asyncio.run_coroutine_threadsafe(emulator.__aenter__(), loop).result(60)
    try:
        return asyncio.run(measure(emulator, tunnels))
    finally:
        asyncio.run_coroutine_threadsafe(emulator.__aexit__(None, None, None), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunnels", type=int, default=200, help="tunnels opened (default 200)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--localproxy",
        metavar="PATH",
        help="accepted like every bench; this one measures no local proxy, so it has no effect",
    )
    args = parser.parse_args(argv)
    # Per-tunnel log lines would cost time and flood stdout: warnings and errors only.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args.tunnels, Path(tmp) / "emulator")
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"OpenTunnel -> MQTT notification, {report['tunnels']} tunnels, sequential")
    for r in report["results"]:
        print(
            f"  {r['name']:<16} p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  "
            f"max {r['max_ms']:7.2f} ms  mean {r['mean_ms']:7.2f} ms  n={r['n']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
