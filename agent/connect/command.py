"""
``tunnel-agent connect``: the operator's side of a tunnel in one command.

Opens a tunnel to a thing (OpenTunnel with ``destinationConfig``), starts a bundled source proxy on
local ports, prints what to type, follows the destination's connection state, and closes the
tunnel on Ctrl-C, SIGTERM, or when the proxy ends. The source token stays in this process and the
proxy's environment only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.protocol.ids import SERVICE_ID
from agent.protocol.report import parse_report


if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType


__all__ = ["ServiceRequest", "main", "parse_service"]

_SERVICE = re.compile(rf"({SERVICE_ID.pattern})(?:=([0-9]{{1,5}}))?", re.ASCII)
_LISTENING = re.compile(r"Listening for new connection on port ([0-9]+) service=(\S+)", re.ASCII)
POLL_INTERVAL = 1.0
# The agent's report (README, "Operate"): a rejection newer than our OpenTunnel is about us.
SHADOW = "tunnel-agent"
PROGRESS_EVERY = 5.0
# Exit status when the device refused the tunnel or nobody answered.
EXIT_NOT_CONNECTED = 3


@dataclass(frozen=True, slots=True)
class ServiceRequest:
    """
    One ``--service NAME[=LOCALPORT]`` (port 0: any free port).
    """

    name: str
    port: int = 0


def parse_service(value: str) -> ServiceRequest:
    """
    Parse ``SSH`` or ``SSH=2222``.

    Raises:
        argparse.ArgumentTypeError: If the value is malformed.
    """
    match = _SERVICE.fullmatch(value.strip())
    if not match or int(match.group(2) or 0) > 65535:
        raise argparse.ArgumentTypeError(
            f"invalid service {value!r}: expected NAME[=LOCALPORT], NAME of [a-zA-Z0-9_-]"
        )
    return ServiceRequest(match.group(1), int(match.group(2) or 0))


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnel-agent connect",
        description=(
            "Open a Secure Tunnel to THING, listen on local ports, and close the tunnel on Ctrl-C. "
            "AWS credentials and region come from the usual AWS environment and config files."
        ),
    )
    parser.add_argument("thing", help="the IoT thing whose agent should open the destination")
    parser.add_argument(
        "-s",
        "--service",
        action="append",
        type=parse_service,
        required=True,
        metavar="NAME[=LOCALPORT]",
        help="service to carry (repeat up to 3 times), e.g. SSH=2222 or HTTP",
    )
    parser.add_argument("--endpoint-url", help="Secure Tunneling API endpoint (e.g. the emulator)")
    parser.add_argument("--region", help="AWS region (default: from the AWS configuration)")
    parser.add_argument(
        "--proxy-endpoint",
        default=os.environ.get("AWSIOT_TUNNEL_ENDPOINT")
        or os.environ.get("TUNNEL_EMULATOR_RELAY_ENDPOINT"),
        help="data-plane HOST:PORT instead of the region's (emulator: from operator.env)",
    )
    parser.add_argument(
        "--ca",
        default=os.environ.get("TUNNEL_EMULATOR_CA_FILE"),
        help="CA certificate for the data plane (emulator: from operator.env)",
    )
    parser.add_argument(
        "--lifetime", type=int, default=60, help="tunnel lifetime in minutes, 1-720 (default 60)"
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long the device's agent may take to connect (default 30)",
    )
    parser.add_argument("--user", default="USER", help="user name shown in the ssh hint")
    parser.add_argument("--bind-address", default="localhost", help="where the local ports listen")
    return parser


def _hint(service: str, port: int, user: str) -> str:
    upper = service.upper()
    if upper.startswith("SSH"):
        return f"ssh -p {port} {user}@localhost"
    if upper.startswith(("HTTP", "WEB")):
        return f"http://localhost:{port}/"
    if upper.startswith("VNC"):
        return f"vncviewer localhost::{port}"
    return f"localhost:{port}"


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class _Interrupted(KeyboardInterrupt):
    """
    SIGTERM or SIGINT: like Ctrl-C, no ``except Exception`` on the way may swallow it.
    """


def _on_signal(_signum: int, _frame: FrameType | None) -> None:
    raise _Interrupted


def _catch_stop_signals() -> dict[int, Any]:
    """
    Make SIGTERM and SIGINT close the tunnel; return the handlers they had.

    SIGINT explicitly too: a process started with SIGINT ignored (a background job of a
    script, ``nohup``) inherits that, and Python then installs no KeyboardInterrupt
    handler. Ctrl-C must close the tunnel whatever the parent did.
    """
    return {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _client(args: argparse.Namespace) -> Any:
    import boto3  # noqa: PLC0415 - operator extra, only for this command

    return boto3.client(
        "iotsecuretunneling", endpoint_url=args.endpoint_url, region_name=args.region
    )


def _error_line(exc: BaseException) -> str:
    """
    One clear line for an AWS or network failure.
    """
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:
        error = response["Error"]
        return f"{error.get('Code', 'Error')}: {error.get('Message', '')}".rstrip(": ")
    name = type(exc).__name__
    if name == "NoCredentialsError":
        return "no AWS credentials: configure them (aws configure, AWS_PROFILE, or operator.env)"
    if name == "NoRegionError":
        return "no AWS region: pass --region or set AWS_DEFAULT_REGION"
    return f"{name}: {exc}"


class _Proxy:
    """
    The bundled source proxy, whose log we read for the listening ports.
    """

    def __init__(self, args: argparse.Namespace, token: str, region: str) -> None:
        mapping = ",".join(f"{s.name}={s.port}" for s in args.service)
        argv = [sys.executable, "-m", "agent.proxy", "-s", mapping, "-b", args.bind_address]
        argv += ["-e", args.proxy_endpoint] if args.proxy_endpoint else ["-r", region]
        if args.ca:
            argv += ["-c", args.ca]
        env = dict(os.environ)
        env["AWSIOT_TUNNEL_ACCESS_TOKEN"] = token
        env["AWSIOT_TUNNEL_CLIENT_TOKEN"] = secrets.token_hex(24)
        # The proxy's per-connection figures come on a private pipe, not from its log.
        report_read, report_write = os.pipe()
        argv += ["--report-fd", str(report_write)]
        self.ports: dict[str, int] = {}
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._expected = len(args.service)
        try:
            self.proc = subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, pass_fds=(report_write,),
            )  # fmt: skip
        finally:
            os.close(report_write)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._report = threading.Thread(target=self._read_report, args=(report_read,), daemon=True)
        self._report.start()

    def _read_report(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as pipe:
            for data in pipe:
                line = parse_report(data)
                if line is None or line.event == "totals":
                    continue
                name = f"{line.service or 'connection'} #{line.connection}"
                if line.event == "opened":
                    _say(f"{name}: opened")
                elif line.refused:
                    _say(f"{name}: the device's {line.service} service refused the connection")
                else:
                    _say(f"{name}: closed, {line.bytes_in} bytes in, {line.bytes_out} bytes out")

    def _read(self) -> None:
        assert self.proc.stdout is not None  # noqa: S101 - piped above
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            match = _LISTENING.search(line)
            if match:
                self.ports[match.group(2)] = int(match.group(1))
                if len(self.ports) >= self._expected:
                    self.ready.set()
        self.ready.set()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._reader.join(2)
        return self.proc.wait()


def _open(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    response: dict[str, Any] = client.open_tunnel(
        description=f"tunnel-agent connect to {args.thing}",
        destinationConfig={"thingName": args.thing, "services": [s.name for s in args.service]},
        timeoutConfig={"maxLifetimeTimeoutMinutes": args.lifetime},
    )
    return response


def _shadow_client(args: argparse.Namespace) -> Any:
    import boto3  # noqa: PLC0415 - operator extra, only for this command

    # boto3 reads AWS_ENDPOINT_URL_IOT_DATA_PLANE (the emulator's operator.env sets it).
    return boto3.client("iot-data", region_name=args.region)


def _reported(shadows: Any, thing: str) -> dict[str, Any] | None:
    """
    The agent's last report, or ``None`` if it never reported (or the shadow is unreadable).
    """
    try:
        response = shadows.get_thing_shadow(thingName=thing, shadowName=SHADOW)
        document = json.loads(response["payload"].read())
    except Exception:  # no shadow, no permission: nothing to explain with
        return None
    reported = document.get("state", {}).get("reported") if isinstance(document, dict) else None
    return reported if isinstance(reported, dict) else None


def _when(stamp: object) -> str:
    if not isinstance(stamp, int | float):
        return "an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(stamp))


def _last_said(reported: dict[str, Any] | None) -> str:
    if reported is None:
        return "its agent never reported to the shadow 'tunnel-agent'"
    state = reported.get("state")
    if state == "offline":
        return f"its agent is offline since {_when(reported.get('offline_since'))}"
    return f"its agent last reported '{state}' at {_when(reported.get('updated_at'))}"


def _refusal(reported: dict[str, Any] | None, opened_at: float) -> str | None:
    rejection = (reported or {}).get("last_rejection")
    if not isinstance(rejection, dict):
        return None
    at = rejection.get("at")
    # One second of slack: the device's clock and ours are not the same clock.
    if not isinstance(at, int | float) or at < opened_at - 1:
        return None
    return str(rejection.get("reason", "no reason given"))


def _wait_connected(
    client: Any, shadows: Any, args: argparse.Namespace, tunnel_id: str, opened_at: float
) -> int | None:
    """
    Wait for the destination; ``None`` once connected, else the exit status after explaining.
    """
    start = last_progress = time.monotonic()
    while True:
        tunnel = client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]
        if tunnel.get("destinationConnectionState", {}).get("status") == "CONNECTED":
            _say("destination CONNECTED")
            return None
        reported = _reported(shadows, args.thing)
        reason = _refusal(reported, opened_at)
        if reason is not None:
            _say(f"error: {args.thing} refused the tunnel: {reason}")
            return EXIT_NOT_CONNECTED
        waited = time.monotonic() - start
        if waited >= args.wait:
            _say(f"error: no tunnel agent answered on {args.thing} within {args.wait:g} s")
            _say(f"  {_last_said(reported)}")
            return EXIT_NOT_CONNECTED
        if time.monotonic() - last_progress >= PROGRESS_EVERY:
            last_progress = time.monotonic()
            _say(f"waiting for {args.thing}'s agent ({waited:.0f} s of {args.wait:g} s)")
        time.sleep(min(POLL_INTERVAL, max(0.05, args.wait - waited)))


def _follow(client: Any, tunnel_id: str, proxy: _Proxy) -> None:
    """
    Print destination connection state changes until the proxy ends.
    """
    last = "CONNECTED"
    while proxy.proc.poll() is None:
        tunnel = client.describe_tunnel(tunnelId=tunnel_id)["tunnel"]
        state = tunnel.get("destinationConnectionState", {}).get("status")
        if tunnel.get("status") == "CLOSED":
            _say("tunnel closed by the service")
            return
        if state != last:
            _say(f"destination {state}")
            last = state
        time.sleep(POLL_INTERVAL)


def _run(  # noqa: PLR0913 - the pieces main() made
    client: Any,
    shadows: Any,
    args: argparse.Namespace,
    *,
    tunnel_id: str,
    opened_at: float,
    proxy: _Proxy,
) -> int:
    """
    Print the ports, wait for the destination (or explain why not), then follow the tunnel.
    """
    proxy.ready.wait(30)
    if len(proxy.ports) < len(args.service):
        _say("error: the source proxy did not start:")
        for line in proxy.lines[-5:]:
            _say(f"  {line}")
        return 1
    for service in args.service:
        port = proxy.ports[service.name]
        _say(f"{service.name}: {_hint(service.name, port, args.user)}")
    _say(f"waiting up to {args.wait:g} s for {args.thing}'s agent")
    failed = _wait_connected(client, shadows, args, tunnel_id, opened_at)
    if failed is not None:
        return failed
    _follow(client, tunnel_id, proxy)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run ``tunnel-agent connect``; returns the exit status.
    """
    args = _build_parser().parse_args(argv)
    if len(args.service) > 3 or len({s.name for s in args.service}) != len(args.service):
        _say("error: give 1 to 3 distinct services")
        return 2
    previous = _catch_stop_signals()
    tunnel_id = None
    client = None
    proxy = None
    try:
        client = _client(args)
        shadows = _shadow_client(args)
        opened_at = time.time()
        opened = _open(client, args)
        tunnel_id = opened["tunnelId"]
        _say(f"tunnel {tunnel_id} open to {args.thing}")
        region = client.meta.region_name
        proxy = _Proxy(args, opened["sourceAccessToken"], region)
        return _run(client, shadows, args, tunnel_id=tunnel_id, opened_at=opened_at, proxy=proxy)
    except (KeyboardInterrupt, _Interrupted):
        _say("closing the tunnel")
    except Exception as exc:
        _say(f"error: {_error_line(exc)}")
        return 1
    finally:
        if proxy is not None:
            proxy.stop()
        if tunnel_id is not None and client is not None:
            try:
                client.close_tunnel(tunnelId=tunnel_id)
                _say(f"tunnel {tunnel_id} closed")
            except Exception as exc:
                _say(f"error: closing the tunnel: {_error_line(exc)}")
        _restore_signals(previous)
    return 0
