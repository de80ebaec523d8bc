"""
``make demo``: the whole system on one machine, end to end, with a timeline.

Starts the emulator (API, relay, Mosquitto), a device agent for thing ``demo-device`` with SSH (a
loopback sshd) and HTTP (a local web page) mapped, then acts as the operator with
``tunnel-agent connect``: a command over SSH, a 20 MB scp with its hash checked, the web page, a
destination token rotation with the new proxy taking over, and the tunnel closed. Exits non-zero
if any step fails and leaves no process behind.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from agent.emulator.targets import Sshd, WebServer
from agent.exceptions import AgentError


if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


__all__ = ["main"]

THING = "demo-device"
PAGE = b"<!doctype html><title>demo-device</title><h1>Hello from demo-device</h1>\n"
AGENT = [sys.executable, "-m", "agent"]


class DemoError(AgentError):
    """
    A step of the demo failed.
    """


class Process:
    """
    A child whose output lines are collected by a thread and can be waited for.
    """

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None  # noqa: S101
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 20, start: int = 0) -> re.Match[str]:
        """
        Wait for a line matching ``pattern`` (searching from line ``start``).
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    match = regex.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._changed.wait(0.2)):
                    tail = "\n".join(self.lines[-15:])
                    raise DemoError(f"{self.name}: no {pattern!r} within {timeout:.0f}s\n{tail}")
                self._changed.wait(min(left, 0.5))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """
        Signal the process and wait; kill it if it does not exit.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode


class Timeline:
    """
    Named steps with their durations, printed as they happen.
    """

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.start = time.monotonic()
        self.steps: list[tuple[str, float, bool]] = []

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Callable[[str], None]]:
        began = time.monotonic()
        notes: list[str] = []
        try:
            yield notes.append
        except Exception:
            self.steps.append((name, time.monotonic() - began, False))
            self._print(name, time.monotonic() - began, "FAILED", notes)
            raise
        self.steps.append((name, time.monotonic() - began, True))
        self._print(name, time.monotonic() - began, "ok", notes)

    def _print(self, name: str, seconds: float, status: str, notes: list[str]) -> None:
        at = time.monotonic() - self.start
        detail = f"  ({'; '.join(notes)})" if notes else ""
        self.out.write(f"[{at:6.2f}s] {name:<44} {seconds * 1000:8.0f} ms  {status}{detail}\n")
        self.out.flush()


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS", "TUNNEL_AGENT"))}
    env.update(extra or {})
    return env


def _operator_env(directory: Path) -> dict[str, str]:
    values = {}
    for line in (directory / "operator.env").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            values[key.strip()] = value.strip()
    return values


def _ssh(sshd: Sshd, port: int, command: str) -> str:
    result = subprocess.run(
        ["ssh", *sshd.ssh_options(port), f"{sshd.user}@localhost", command],  # noqa: S607
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise DemoError(f"ssh failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout.strip()


def _boto3_client(operator: dict[str, str]) -> Any:
    import boto3  # noqa: PLC0415 - emulator extra

    return boto3.client(
        "iotsecuretunneling",
        endpoint_url=operator["AWS_ENDPOINT_URL_IOTSECURETUNNELING"],
        region_name=operator["AWS_DEFAULT_REGION"],
        aws_access_key_id=operator["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=operator["AWS_SECRET_ACCESS_KEY"],
    )


def _agent_status(directory: Path) -> dict[str, Any]:
    status = directory / "agent-run" / f"status.{THING}.json"  # status.<thing_name>.json
    return json.loads(status.read_text()) if status.exists() else {}


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise DemoError(f"timed out waiting for {what}")
        time.sleep(0.05)


def run(directory: Path, out: IO[str]) -> None:  # noqa: PLR0915 - one story, step by step
    """
    Run every step; raises DemoError on the first failure. Cleans up in all cases.
    """
    timeline = Timeline(out)
    processes: list[Process] = []
    cleanups: list[Callable[[], object]] = []
    try:
        with timeline.step("start sshd and web page on loopback") as note:
            sshd = Sshd(directory / "sshd")
            cleanups.append(sshd.stop)
            web = WebServer(PAGE)
            cleanups.append(web.stop)
            note(f"sshd :{sshd.port}, http :{web.port}")

        with timeline.step("start emulator (API, relay, Mosquitto)") as note:
            emulator = Process(
                "emulator",
                [*AGENT, "emulator", "--dir", str(directory / "emulator")],
                _env(),
                directory / "emulator.log",
            )
            processes.append(emulator)
            emulator.wait_for("Ctrl-C to stop", timeout=30)
            note(emulator.wait_for(r"control plane\s+(\S+)").group(1))

        with timeline.step(f"register thing {THING}"):
            subprocess.run(
                [*AGENT, "emulator", "add-thing", THING, "--dir", str(directory / "emulator"),
                 "--service", f"SSH=127.0.0.1:{sshd.port}",
                 "--service", f"HTTP=127.0.0.1:{web.port}"],
                env=_env(), check=True, capture_output=True, timeout=30,
            )  # fmt: skip

        config = directory / "emulator" / "things" / THING / "config.toml"
        with timeline.step("start device agent (MQTT, mutual TLS)"):
            agent = Process(
                "agent",
                [*AGENT, "run", "--config", str(config), "--runtime-dir",
                 str(directory / "agent-run"), "--logging-format", "json"],
                _env(),
                directory / "agent.log",
            )  # fmt: skip
            processes.append(agent)
            agent.wait_for("mqtt_subscribed", timeout=30)

        operator = _operator_env(directory / "emulator")
        with timeline.step("operator: tunnel-agent connect (OpenTunnel)") as note:
            connect = Process(
                "connect",
                [*AGENT, "connect", THING, "-s", "SSH", "-s", "HTTP", "--user", sshd.user],
                _env(operator),
                directory / "connect.log",
            )
            processes.append(connect)
            tunnel_id = connect.wait_for(r"tunnel (\S+) open").group(1)
            ssh_port = int(connect.wait_for(r"SSH: ssh -p (\d+)").group(1))
            http_port = int(connect.wait_for(r"HTTP: http://localhost:(\d+)/").group(1))
            connect.wait_for("destination CONNECTED", timeout=30)
            note(f"tunnel {tunnel_id[:8]}…, ssh -p {ssh_port}, http :{http_port}")

        with timeline.step("ssh: run a command on the device") as note:
            output = _ssh(sshd, ssh_port, "echo hello from $(hostname); uname -sr")
            note(output.replace("\n", " | "))

        with timeline.step("scp: copy 20 MB and compare sha256") as note:
            payload = directory / "payload.bin"
            payload.write_bytes(os.urandom(20 * 1024 * 1024))
            copied = directory / "copied.bin"
            began = time.monotonic()
            result = subprocess.run(
                ["scp", *sshd.scp_options(ssh_port), str(payload),  # noqa: S607
                 f"{sshd.user}@localhost:{copied}"],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            elapsed = time.monotonic() - began
            if result.returncode != 0:
                raise DemoError(f"scp failed: {result.stderr.strip()}")
            sent = hashlib.sha256(payload.read_bytes()).hexdigest()
            if hashlib.sha256(copied.read_bytes()).hexdigest() != sent:
                raise DemoError("the copied file's sha256 differs")
            note(f"sha256 {sent[:16]}… equal, {20 * 1.048576 / elapsed:.0f} MB/s")

        with timeline.step("http: fetch the device's web page") as note:
            url = f"http://localhost:{http_port}/"
            with urllib.request.urlopen(url, timeout=10) as response:
                body = response.read()
            if body != PAGE:
                raise DemoError("the web page differs")
            note(f"{len(body)} bytes, identical")

        with timeline.step("rotate the destination token") as note:
            before = {t["pid"] for t in _agent_status(directory).get("tunnels", [])}
            client = _boto3_client(operator)
            client.rotate_tunnel_access_token(
                tunnelId=tunnel_id,
                clientMode="DESTINATION",
                destinationConfig={"thingName": THING, "services": ["SSH", "HTTP"]},
            )

            def new_proxy() -> bool:
                tunnels = _agent_status(directory).get("tunnels", [])
                pids = {t["pid"] for t in tunnels if not t.get("superseded") and t.get("pid")}
                return bool(pids - before)

            _wait(new_proxy, 30, "the agent to start a proxy with the new token")
            _wait(lambda: len(_agent_status(directory).get("tunnels", [])) == 1, 30,
                  "the old proxy to hand over")  # fmt: skip
            output = _ssh(sshd, ssh_port, "echo still here")
            note(f"new proxy took over; ssh after rotation: {output}")

        with timeline.step("close the tunnel (Ctrl-C on connect)") as note:
            code = connect.stop(signal.SIGINT, timeout=15)
            connect.wait_for(r"tunnel \S+ closed")
            if code != 0:
                raise DemoError(f"connect exited {code}")
            _wait(lambda: not _agent_status(directory).get("tunnels"), 15, "proxies to exit")
            state = client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]["status"]
            note(f"status {state}, device proxies gone")

        with timeline.step("stop agent and emulator"):
            for process in reversed(processes):
                if process.stop() not in {0, -signal.SIGTERM}:
                    raise DemoError(f"{process.name} exited {process.proc.returncode}")
    finally:
        for process in reversed(processes):
            process.stop(timeout=5)
        for cleanup in reversed(cleanups):
            with contextlib.suppress(Exception):
                cleanup()
    total = sum(seconds for _, seconds, _ in timeline.steps)
    out.write(f"all {len(timeline.steps)} steps passed in {total:.1f} s\n")


def main(argv: list[str] | None = None) -> int:
    """
    Run the demo; returns 0 when every step passed.
    """
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="tunnel-demo-"))
    try:
        run(directory, sys.stdout)
    except (DemoError, subprocess.SubprocessError, OSError, RuntimeError) as exc:
        sys.stdout.write(f"demo failed: {exc}\nlogs in {directory}\n")
        return 1
    if args.keep:
        sys.stdout.write(f"logs in {directory}\n")
    else:
        import shutil  # noqa: PLC0415

        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
