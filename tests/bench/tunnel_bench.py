"""
Data-plane benchmark: throughput, latency, setup time, memory and CPU of a tunnel on loopback.

source proxy -> relay (own process, TLS) -> destination proxy -> local services, with the same
transfers over plain loopback TCP as the reference. ``--localproxy PATH`` runs source and
destination with another binary taking the AWS localproxy flags (e.g. the AWS C++ localproxy).
``--floor`` also runs the transfers and the echo through three bare uvloop forwarders standing where
source, relay and destination stand (forwarder.py): the least any asyncio design pays here. MB =
10^6 bytes.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.emulator.pki import CertificateAuthority, KeyPair
from agent.emulator.targets import stop_process


ROOT = Path(__file__).resolve().parents[2]
BUNDLED = [sys.executable, "-m", "agent.proxy"]
TICKS = os.sysconf("SC_CLK_TCK")
CONNECTED = re.compile(r"connected to the tunnel|[Ss]uccessfully established websocket|session ID")
LISTENING = re.compile(r"Listening for new connection on port (\d+)")
CHUNK = memoryview(os.urandom(1 << 20))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def pss_uss_mb(pid: int) -> tuple[float, float]:
    """PSS and USS (private clean + dirty) from ``/proc/PID/smaps_rollup``, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    uss = fields["Private_Clean"] + fields["Private_Dirty"]
    return fields["Pss"] * 1024 / 1e6, uss * 1024 / 1e6


def vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """A loopback TCP service run by threads: sink, sender or echo."""

    def __init__(self, kind: str, size: int = 0) -> None:
        self.kind = kind
        self.size = size
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self.sock.getsockname()[1]
        self.received: list[int] = []
        self.done = threading.Semaphore(0)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            try:
                if self.kind == "sink":
                    total = 0
                    while data := conn.recv(1 << 20):
                        total += len(data)
                    self.received.append(total)
                elif self.kind == "send":
                    left = self.size
                    while left:
                        n = conn.send(CHUNK[: min(left, len(CHUNK))])
                        left -= n
                else:
                    while data := conn.recv(65536):
                        conn.sendall(data)
            except OSError:
                pass
            finally:
                self.done.release()

    def close(self) -> None:
        self.sock.close()


def send(port: int, size: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        left = size
        while left:
            n = sock.send(CHUNK[: min(left, len(CHUNK))])
            left -= n


def upload(port: int, size: int, sink: Server) -> None:
    """
    Send ``size`` bytes to ``port`` and wait until ``sink`` has them all.
    """
    send(port, size)
    sink.done.acquire(timeout=600)


def receive(port: int, size: int) -> int:
    total = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        while total < size and (data := sock.recv(1 << 20)):
            total += len(data)
    return total


def echo_latencies(port: int, count: int) -> list[float]:
    message = b"x" * 64
    out = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(50):  # warm-up
            sock.sendall(message)
            got = 0
            while got < 64:
                got += len(sock.recv(64 - got))
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(message)
            got = 0
            while got < 64:
                got += len(sock.recv(64 - got))
            out.append((time.perf_counter() - start) * 1e6)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Relay:
    def __init__(self, directory: Path) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("relay_server.py")),
                "--dir",
                str(directory),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        info = self.request(None)
        self.port = info["port"]
        self.ca_dir = directory / "ca-dir"
        self.ca_dir.mkdir()
        ca = Path(info["ca"])
        digest = subprocess.run(
            ["openssl", "x509", "-hash", "-noout", "-in", str(ca)],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        (self.ca_dir / f"{digest}.0").write_bytes(ca.read_bytes())

    def request(self, command: str | None) -> dict[str, Any]:
        assert self.proc.stdin
        assert self.proc.stdout
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())  # type: ignore[no-any-return]

    def stop(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(10)


class Proxy:
    def __init__(self, binary: list[str], args: list[str], token: str, log: Path) -> None:
        env = dict(os.environ)
        env["AWSIOT_TUNNEL_ACCESS_TOKEN"] = token
        env["AWSIOT_TUNNEL_CLIENT_TOKEN"] = secrets.token_hex(20)
        self.log_path = log
        self.started = time.perf_counter()
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*binary, *args], env=env, stdout=out, stderr=out, cwd=ROOT
            )

    def wait_for(self, pattern: re.Pattern[str], count: int = 1, timeout: float = 20) -> float:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if len(pattern.findall(self.log_path.read_text(errors="replace"))) >= count:
                return time.perf_counter() - self.started
            if self.proc.poll() is not None:
                break
            time.sleep(0.001)
        raise RuntimeError(f"proxy did not log {pattern.pattern!r}:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        stop_process(self.proc)


class Floor:
    """
    Three bare forwarders (forwarder.py) in the places of source, relay and destination.

    TCP in, TLS out; TLS in and out; TLS in, TCP out: the tunnel's sockets and TLS, no tunnel.
    """

    ROLES = ("source", "relay", "destination")

    def __init__(self, pki: KeyPair, ca: Path, service_port: int) -> None:
        tls_in = ["--cert", str(pki.cert), "--key", str(pki.key)]
        tls_out = ["--ca", str(ca)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        port = service_port
        for role, flags in zip(
            reversed(self.ROLES), (tls_in, [*tls_in, *tls_out], tls_out), strict=True
        ):
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("forwarder.py")), "--to", str(port),
                 *flags],
                stdout=subprocess.PIPE, cwd=ROOT,
            )  # fmt: skip
            self.procs[role] = proc
            assert proc.stdout
            port = int(proc.stdout.readline())
        self.port = port
        self.pids = {role: proc.pid for role, proc in self.procs.items()}

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_process(proc)


def floor_figures(size: int, echo_count: int, workdir: Path) -> dict[str, float]:
    """
    Throughput, CPU per GB and echo latency through a :class:`Floor` chain.
    """
    ca = CertificateAuthority(workdir / "floor-ca")
    ca.load_or_create()
    pki = ca.issue_server(KeyPair(workdir / "floor.crt", workdir / "floor.key"))
    sink, sender, echo = Server("sink"), Server("send", size), Server("echo")
    figures: dict[str, float] = {}
    gb = size / 1e9
    for direction, server in (("up", sink), ("down", sender)):
        floor = Floor(pki, ca.cert_file, server.port)
        try:
            if direction == "up":
                elapsed, cpu = measure(floor.pids, lambda port=floor.port: upload(port, size, sink))
                assert sink.received[-1] == size, sink.received
            else:
                elapsed, cpu = measure(floor.pids, lambda port=floor.port: receive(port, size))
            figures[f"floor_{direction}_MBps"] = size / elapsed / 1e6
            for name, seconds in cpu.items():
                figures[f"floor_{direction}_cpu_s_per_GB_{name}"] = seconds / gb
        finally:
            floor.stop()
    floor = Floor(pki, ca.cert_file, echo.port)
    try:
        lat = echo_latencies(floor.port, echo_count)
    finally:
        floor.stop()
    figures["floor_echo_p50_us"] = percentile(lat, 0.5)
    figures["floor_echo_p99_us"] = percentile(lat, 0.99)
    for server in (sink, sender, echo):
        server.close()
    return figures


def measure(pids: dict[str, int], action: Any) -> tuple[float, dict[str, float]]:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    start = time.perf_counter()
    action()
    elapsed = time.perf_counter() - start
    return elapsed, {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}


def one_run(args: argparse.Namespace, relay: Relay, workdir: Path, run: int) -> dict[str, float]:
    size = args.size * 1024 * 1024
    sink, sender, echo = Server("sink"), Server("send", size), Server("echo")
    tunnel = relay.request("open BULK,SEND,ECHO")
    endpoint = ["-e", f"127.0.0.1:{relay.port}", "-c", str(relay.ca_dir)]
    dst = Proxy(
        args.localproxy,
        [*endpoint, "-d", f"BULK={sink.port},SEND={sender.port},ECHO={echo.port}"],
        tunnel["destination"],
        workdir / f"dst{run}.log",
    )
    figures: dict[str, float] = {}
    try:
        figures["setup_destination_ms"] = dst.wait_for(CONNECTED) * 1000
        ports = {name: free_port() for name in ("BULK", "SEND", "ECHO")}
        src = Proxy(
            args.localproxy,
            [*endpoint, "-s", ",".join(f"{k}={v}" for k, v in ports.items())],
            tunnel["source"],
            workdir / f"src{run}.log",
        )
        try:
            figures["setup_source_ms"] = src.wait_for(LISTENING, count=3) * 1000
            pids = {"source": src.proc.pid, "relay": relay.proc.pid, "destination": dst.proc.pid}
            gb = size / 1e9

            elapsed, cpu = measure(pids, lambda: upload(ports["BULK"], size, sink))
            assert sink.received[-1] == size, sink.received
            figures["up_MBps"] = size / elapsed / 1e6
            for name, seconds in cpu.items():
                figures[f"up_cpu_s_per_GB_{name}"] = seconds / gb

            elapsed, cpu = measure(pids, lambda: receive(ports["SEND"], size))
            figures["down_MBps"] = size / elapsed / 1e6
            for name, seconds in cpu.items():
                figures[f"down_cpu_s_per_GB_{name}"] = seconds / gb

            each = size // args.connections

            def parallel() -> None:
                with ThreadPoolExecutor(args.connections) as pool:
                    list(pool.map(lambda _: send(ports["BULK"], each), range(args.connections)))
                for _ in range(args.connections):
                    sink.done.acquire(timeout=600)

            elapsed, _ = measure(pids, parallel)
            assert sink.received[-args.connections :] == [each] * args.connections
            figures[f"parallel{args.connections}_MBps"] = each * args.connections / elapsed / 1e6

            lat = echo_latencies(ports["ECHO"], args.echo_count)
            figures["echo_p50_us"] = percentile(lat, 0.5)
            figures["echo_p99_us"] = percentile(lat, 0.99)
            for name, pid in pids.items():
                figures[f"vmhwm_MB_{name}"] = vm_hwm_mb(pid)
                pss, uss = pss_uss_mb(pid)
                figures[f"pss_MB_{name}"] = pss
                figures[f"uss_MB_{name}"] = uss
        finally:
            src.stop()
    finally:
        dst.stop()
        relay.request(f"close {tunnel['tunnel_id']}")
    if not args.skip_reference:
        elapsed, _ = measure({}, lambda: upload(sink.port, size, sink))
        figures["tcp_up_MBps"] = size / elapsed / 1e6
        elapsed, _ = measure({}, lambda: receive(sender.port, size))
        figures["tcp_down_MBps"] = size / elapsed / 1e6
        lat = echo_latencies(echo.port, args.echo_count)
        figures["tcp_echo_p50_us"] = percentile(lat, 0.5)
        figures["tcp_echo_p99_us"] = percentile(lat, 0.99)
    for server in (sink, sender, echo):
        server.close()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--localproxy",
        type=lambda p: [p],
        default=BUNDLED,
        metavar="PATH",
        help="proxy binary for source and destination (default: the bundled tunnel-localproxy)",
    )
    parser.add_argument("--size", type=int, default=256, help="MiB per transfer (default 256)")
    parser.add_argument("--runs", type=int, default=1, help="runs; figures are medians")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--echo-count", type=int, default=2000)
    parser.add_argument("--skip-reference", action="store_true", help="no plain-TCP reference")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure bare uvloop TLS forwarders in the proxies' and relay's places",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.localproxy == BUNDLED:
        # Measure the proxy as installed: pip and the .deb compile its bytecode at install time.
        compileall.compile_dir(ROOT / "agent", quiet=1)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        relay = Relay(workdir / "relay")
        try:
            runs = [one_run(args, relay, workdir, i) for i in range(args.runs)]
            if args.floor:
                size = args.size * 1024 * 1024
                for i, figures in enumerate(runs):
                    figures.update(floor_figures(size, args.echo_count, workdir / f"floor{i}"))
        finally:
            relay.stop()
    result = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    result["size_MiB"] = args.size
    result["runs"] = args.runs
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:36} {value:12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
