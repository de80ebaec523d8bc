"""
Agent benchmark: OpenTunnel -> destination CONNECTED latency, and the agent's idle footprint.

Everything on loopback: the emulator (API, relay, Mosquitto) in this process, ``tunnel-agent
run`` as a child with the emulator's generated config and the bundled proxy. For each of
``--tunnels`` tunnels (default 50, one after the other): time from the OpenTunnel call to
DescribeTunnel reporting the destination CONNECTED (MQTT notification, validation, proxy
spawn, WebSocket handshake), then CloseTunnel and wait for the proxy to end. Then the agent
sits idle with no tunnel for ``--idle`` seconds (default 60): its VmRSS and the CPU time it
used (should be ~0: nothing polls).

Footprint: ``--idle-tunnels`` tunnels (default 10) are then opened and left idle; the figures
are the total and per-tunnel PSS and USS (``/proc/PID/smaps_rollup``) of every proxy
process, the launcher included (``proxy.launcher``), the OpenTunnel -> destination CONNECTED
p50/p99, notification -> connected p50/p99 (from the agent's ``notification_received`` to its
``proxy_connected`` event) and the proxy start -> connected p50/p99 (that event's figure).
A proxy forked by the launcher owns only what it dirtied after the fork: its USS.
``--proxy-binary PATH`` runs the same with an external binary (the AWS localproxy);
``--no-launcher`` with a plain process per bundled proxy.

Same-page merging: the launcher offers its proxies' memory to KSM (``proxy.merge_pages``),
which only acts while ksmd runs. ``--ksm`` starts ksmd for the run (root; the previous state is
restored), waits until merging has settled and adds ``ksm_settle_seconds`` (from the last
tunnel connected), the CPU seconds ksmd spent meanwhile and its CPU share over the next
``--ksm-idle`` seconds, at the kernel's scan settings as they are. ``ksm`` in the output says
whether ksmd ran.

    python tests/bench/agent_bench.py [--tunnels 50] [--idle 60] [--idle-tunnels 10]
        [--proxy-binary PATH | --no-launcher] [--ksm [--ksm-idle 20]] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.integration.test_agent_e2e import World, wait_until  # noqa: E402


TICKS = os.sysconf("SC_CLK_TCK")
KSM = Path("/sys/kernel/mm/ksm")
KSM_SETTLE_LIMIT = 180.0


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


def smaps_kb(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in KiB: Pss, Rss, Private_Clean, Private_Dirty, ..."""
    found = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        found[name] = int(rest.split()[0])
    return found


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid``."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found


@contextlib.contextmanager
def ksmd(start: bool) -> Any:
    """Run ksmd for the block when ``start``, then put back the state it had."""
    run_file = KSM / "run"
    before = run_file.read_text().strip() if run_file.exists() else None
    if start:
        run_file.write_text("1")
    try:
        yield
    finally:
        if start and before is not None:
            run_file.write_text(before)


def ksm_running() -> bool:
    """Whether ksmd runs."""
    run_file = KSM / "run"
    return run_file.exists() and run_file.read_text().strip() == "1"


def ksmd_pid() -> int:
    """The kernel thread ksmd."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "ksmd":
                    return int(entry.name)
    raise RuntimeError("no ksmd thread")


def merging_pages(pids: list[int]) -> int:
    """Pages of ``pids`` that KSM maps from a shared copy (``/proc/PID/ksm_stat``)."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/ksm_stat").read_text().splitlines():
            if line.startswith("ksm_merging_pages"):
                total += int(line.split()[1])
    return total


def ksm_settle(pids: list[int], connected_at: float, idle: float) -> dict[str, float]:
    """Wait until merging stops growing; ksmd's time to get there and its CPU afterwards."""
    daemon = ksmd_pid()
    cpu_start = cpu_seconds(daemon)
    last, steady = -1, 0
    while steady < 6 and time.monotonic() - connected_at < KSM_SETTLE_LIMIT:
        now = merging_pages(pids)
        steady = steady + 1 if now == last else 0
        last = now
        time.sleep(0.5)
    settled = time.monotonic() - connected_at - 3.0  # the six polls that saw no change
    cpu_settle = cpu_seconds(daemon) - cpu_start
    before = cpu_seconds(daemon)
    time.sleep(idle)
    return {
        "ksm_settle_seconds": settled,
        "ksm_merging_pages": last,
        "ksmd_cpu_seconds_to_settle": cpu_settle,
        "ksmd_cpu_percent_after": 100 * (cpu_seconds(daemon) - before) / idle,
    }


def footprint(world: World, agent: Any, count: int, ksm_idle: float = 0.0) -> dict[str, float]:
    """Open ``count`` tunnels, leave them idle, measure their proxies' memory."""
    opened = []
    latencies = []
    notified_before = len(agent.events("notification_received"))
    connected_before = len(agent.events("proxy_connected"))
    for _ in range(count):
        started = time.perf_counter()
        tunnel = world.open(["SSH"])
        world.wait_connected(tunnel["tunnelId"], timeout=30)
        latencies.append((time.perf_counter() - started) * 1000)
        opened.append(tunnel)
    connected_at = time.monotonic()
    time.sleep(3)  # idle: pings only
    proxies = [t["pid"] for t in agent.status()["tunnels"] if t["pid"]]
    assert len(proxies) == count, proxies
    launchers = [p for p in children_of(agent.pid) if p not in proxies]
    merged = ksm_settle(proxies + launchers, connected_at, ksm_idle) if ksm_running() else {}
    per = {pid: smaps_kb(pid) for pid in proxies + launchers}
    uss = {pid: m["Private_Clean"] + m["Private_Dirty"] for pid, m in per.items()}
    started_connected = [e["after"] * 1000 for e in agent.events("proxy_connected")][-count:]
    # One tunnel at a time: the i-th notification is the i-th proxy's.
    notified_connected = [
        (stamp(connected) - stamp(notified)) * 1000
        for notified, connected in zip(
            agent.events("notification_received")[notified_before:],
            agent.events("proxy_connected")[connected_before:],
            strict=True,
        )
    ]
    for tunnel in opened:
        world.client.close_tunnel(tunnelId=tunnel["tunnelId"])
    mib = 1024
    return {
        "idle_tunnels": count,
        "proxy_processes": len(per),
        "pss_total_mib": sum(m["Pss"] for m in per.values()) / mib,
        "pss_per_tunnel_mib": statistics.fmean(per[p]["Pss"] for p in proxies) / mib,
        "uss_total_mib": sum(uss.values()) / mib,
        "uss_per_tunnel_mib": statistics.fmean(uss[p] for p in proxies) / mib,
        "rss_per_tunnel_mib": statistics.fmean(per[p]["Rss"] for p in proxies) / mib,
        "dirty_anon_per_tunnel_mib": statistics.fmean(per[p]["Anonymous"] for p in proxies) / mib,
        "launcher_pss_mib": sum(per[p]["Pss"] for p in launchers) / mib,
        "launcher_uss_mib": sum(uss[p] for p in launchers) / mib,
        "open_connected_p50_ms": percentile(latencies, 50),
        "open_connected_p99_ms": percentile(latencies, 99),
        "notification_connected_p50_ms": percentile(notified_connected, 50),
        "notification_connected_p99_ms": percentile(notified_connected, 99),
        "proxy_start_connected_p50_ms": percentile(started_connected, 50),
        "proxy_start_connected_p99_ms": percentile(started_connected, 99),
        "ksm": "running" if ksm_running() else "stopped",
        **merged,
    }


def stamp(event: dict[str, Any]) -> float:
    """An agent log event's time, in seconds since the epoch."""
    return dt.datetime.fromisoformat(event["timestamp"]).timestamp()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def run(
    tunnels: int,
    idle: float,
    localproxy: str | None = None,
    idle_tunnels: int = 10,
    flags: tuple[str, ...] = (),
    ksm_idle: float = 0.0,
) -> dict[str, float]:
    """Run the benchmark in a temporary directory and return the figures."""
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as temp:
        world = World(Path(temp), {"SSH": "22"})
        try:
            agent = world.agent(*(["--proxy-binary", localproxy] if localproxy else []), *flags)
            time.sleep(1)  # the launcher's imports
            resident = footprint(world, agent, idle_tunnels, ksm_idle) if idle_tunnels else {}
            agent.wait_event("tunnel_ended", idle_tunnels, timeout=30)
            latencies = []
            for index in range(tunnels):
                started = time.perf_counter()
                tunnel = world.open(["SSH"])
                world.wait_connected(tunnel["tunnelId"], timeout=30)
                latencies.append(time.perf_counter() - started)
                world.client.close_tunnel(tunnelId=tunnel["tunnelId"])
                agent.wait_event("tunnel_ended", idle_tunnels + index + 1, timeout=30)
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
    ms = [v * 1000 for v in latencies] or [0.0]
    return {
        **resident,
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
    parser.add_argument("--idle-tunnels", type=int, default=10, help="idle tunnels measured")
    parser.add_argument(
        "--no-launcher", action="store_true", help="a plain process per bundled proxy"
    )
    parser.add_argument("--idle", type=float, default=60.0, help="idle measurement, seconds")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument(
        "--proxy-binary",
        "--localproxy",
        dest="localproxy",
        metavar="PATH",
        help="destination proxy binary the agent spawns (default: the bundled one)",
    )
    parser.add_argument(
        "--ksm", action="store_true", help="run ksmd for the measurement (root), then restore it"
    )
    parser.add_argument(
        "--ksm-idle", type=float, default=20.0, help="ksmd CPU measured after merging, seconds"
    )
    args = parser.parse_args()
    # The emulator shares this process: keep its logs out of the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    logging.basicConfig(level=logging.WARNING)
    flags = ("--no-proxy-launcher",) if args.no_launcher else ()
    with ksmd(args.ksm):
        result = run(
            args.tunnels, args.idle, args.localproxy, args.idle_tunnels, flags, args.ksm_idle
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            shown = f"{value:12.3f}" if isinstance(value, float) else f"{value:>12}"
            print(f"{key:28} {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
