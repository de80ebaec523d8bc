"""
Agent benchmark: OpenTunnel -> destination CONNECTED latency, and the agent's idle footprint.

Everything on loopback: the emulator (API, relay, Mosquitto) in this process, ``tunnel-agent
run`` as a child with the emulator's generated config and the bundled proxy. For each of
``--tunnels`` tunnels (default 50, one after the other): time from the OpenTunnel call to
DescribeTunnel reporting the destination CONNECTED (MQTT notification, validation, proxy
spawn, WebSocket handshake), then CloseTunnel and wait for the proxy to end. Then the agent
sits idle with no tunnel for ``--idle`` seconds (default 60): its VmRSS and the CPU time it
used (should be ~0: nothing polls).

    python tests/bench/agent_bench.py [--tunnels 50] [--idle 60] [--localproxy PATH] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import structlog


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.integration.test_agent_e2e import World, wait_until  # noqa: E402


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def status_kb(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` size field (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return -1


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def run(tunnels: int, idle: float, localproxy: str | None = None) -> dict[str, float]:
    """Run the benchmark in a temporary directory and return the figures."""
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as temp:
        world = World(Path(temp), {"SSH": "22"})
        try:
            agent = world.agent(*(["--proxy-binary", localproxy] if localproxy else []))
            latencies = []
            for index in range(tunnels):
                started = time.perf_counter()
                tunnel = world.open(["SSH"])
                world.wait_connected(tunnel["tunnelId"], timeout=30)
                latencies.append(time.perf_counter() - started)
                world.client.close_tunnel(tunnelId=tunnel["tunnelId"])
                agent.wait_event("tunnel_ended", index + 1, timeout=30)
            # Idle: no tunnel, no child; let the last exit settle first.
            wait_until(lambda: agent.status()["tunnels"] == [], 10, "no tunnel")
            time.sleep(2)
            cpu_before = cpu_seconds(agent.pid)
            time.sleep(idle)
            cpu_idle = cpu_seconds(agent.pid) - cpu_before
            rss = status_kb(agent.pid, "VmRSS")
            hwm = status_kb(agent.pid, "VmHWM")
            sigterm_started = time.perf_counter()
            code = agent.terminate(timeout=10)
            stop_seconds = time.perf_counter() - sigterm_started
        finally:
            world.close()
    ms = [v * 1000 for v in latencies]
    return {
        "tunnels": tunnels,
        "connect_p50_ms": percentile(ms, 50),
        "connect_p99_ms": percentile(ms, 99),
        "connect_mean_ms": statistics.fmean(ms),
        "connect_max_ms": max(ms),
        "idle_seconds": idle,
        "idle_cpu_seconds": cpu_idle,
        "idle_cpu_percent": 100 * cpu_idle / idle,
        "idle_vmrss_mib": rss / 1024,
        "peak_vmhwm_mib": hwm / 1024,
        "sigterm_exit_code": code,
        "sigterm_stop_seconds": stop_seconds,
    }


def main() -> int:
    """Parse the flags, run, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunnels", type=int, default=50)
    parser.add_argument("--idle", type=float, default=60.0, help="idle measurement, seconds")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--localproxy",
        metavar="PATH",
        help="destination proxy binary the agent spawns (default: the bundled one)",
    )
    args = parser.parse_args()
    # The emulator shares this process: keep its logs out of the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.basicConfig(level=logging.WARNING)
    result = run(args.tunnels, args.idle, args.localproxy)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:24} {value:12.3f}" if isinstance(value, float) else f"{key:24} {value:12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
