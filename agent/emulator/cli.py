"""
``tunnel-agent emulator``: run the emulator in the foreground, or add a thing to its directory.

::

    tunnel-agent emulator [--dir DIR] [--host H] [--api-port N] [--relay-port N]
                          [--mqtt-port N] [--region R] [--no-verify-signatures]
                          [--max-open-tunnels N] [--no-relay] [--relay-plain]
                          [--relay-handshake-timeout SECONDS]
                          [--thing NAME ...] [--broker-user USER] [--log-level L]
    tunnel-agent emulator add-thing NAME --dir DIR [--service NAME=TARGET ...]

Endpoints and file locations go to stdout once everything listens; logs go to
stderr. SIGINT / SIGTERM only set a stop flag; the main coroutine then stops the
services in order (docs/architecture.md §6.5). Without ``--dir`` a temporary directory is used and
removed at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from agent.emulator.admission import HANDSHAKE_TIMEOUT
from agent.exceptions import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE, AgentError, ConfigError


if TYPE_CHECKING:
    from collections.abc import Sequence

    from agent.emulator.app import Emulator


__all__ = ["main"]


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be 0..65535")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def _run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnel-agent emulator",
        description="Run the Secure Tunneling emulator (API, relay, MQTT broker) on loopback.",
        epilog="Sub-command: `tunnel-agent emulator add-thing NAME --dir DIR`.",
    )
    parser.add_argument("--dir", type=Path, help="state directory (default: temporary)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--api-port", type=_port, default=0, help="control-plane port (0: any)")
    parser.add_argument("--relay-port", type=_port, default=0, help="data-plane port (0: any)")
    parser.add_argument("--mqtt-port", type=_port, default=0, help="MQTT broker port (0: any)")
    parser.add_argument("--region", default="us-east-1", help="default tunnel region")
    parser.add_argument(
        "--no-verify-signatures",
        dest="verify_signatures",
        action="store_false",
        help="accept any SigV4 credentials",
    )
    parser.add_argument("--max-open-tunnels", type=int, default=100, metavar="N")
    parser.add_argument("--no-relay", dest="relay", action="store_false", help="no data plane")
    parser.add_argument(
        "--relay-plain", dest="relay_tls", action="store_false", help="serve ws:// (tests only)"
    )
    parser.add_argument(
        "--relay-handshake-timeout",
        type=_seconds,
        default=HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="abort relay connections without a WebSocket upgrade after this long "
        f"(default {HANDSHAKE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--thing", action="append", default=[], metavar="NAME", help="create a thing at startup"
    )
    parser.add_argument(
        "--broker-user",
        default=None,
        metavar="USER",
        help="account mosquitto drops to when run as root (default: stay root)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    return parser


def _add_thing_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnel-agent emulator add-thing",
        description="Create a thing's certificate, key and agent config in DIR/things/NAME/.",
    )
    parser.add_argument("name", help="thing name, [a-zA-Z0-9:_-]{1,128}")
    parser.add_argument("--dir", type=Path, required=True, help="the emulator's directory")
    parser.add_argument(
        "--service",
        action="append",
        default=[],
        metavar="NAME=TARGET",
        help="[services] entry of config.toml (default SSH=22)",
    )
    return parser


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(f"tunnel-agent emulator: {text}\n")


def _print_endpoints(emulator: Emulator) -> None:
    host, port = emulator.mqtt_endpoint
    _out(f"tunnel emulator running in {emulator.directory}")
    _out(f"  control plane  {emulator.api_url}")
    _out(f"  shadows        {emulator.api_url} (iot-data)")
    if emulator.relay is not None:
        scheme = "wss" if emulator.relay_tls else "ws"
        _out(f"  data plane     {emulator.relay_endpoint} ({scheme})")
    _out(f"  mqtt           {host}:{port} (mutual TLS)")
    _out(f"  CA             {emulator.ca_file}")
    _out(f"  operator env   {emulator.operator_env}")
    for name in sorted(emulator.thing_names()):
        _out(f"  thing {name:<9}{emulator.bundle(name).config}")
    _out("Ctrl-C to stop.")


async def _serve(args: argparse.Namespace, directory: Path) -> int:
    from agent.emulator.app import Emulator  # noqa: PLC0415 - keeps `--help` fast

    emulator = Emulator(
        directory,
        host=args.host,
        api_port=args.api_port,
        relay_port=args.relay_port,
        mqtt_port=args.mqtt_port,
        region=args.region,
        relay_tls=args.relay_tls,
        verify_signatures=args.verify_signatures,
        max_open_tunnels=args.max_open_tunnels,
        relay=args.relay,
        broker_run_as=args.broker_user,
        relay_handshake_timeout=args.relay_handshake_timeout,
    )
    for name in args.thing:
        emulator.add_thing(name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with emulator:
            _print_endpoints(emulator)
            await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    _out("tunnel emulator stopped")
    return EXIT_OK


def _run(argv: list[str]) -> int:
    try:
        args = _run_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and EXIT_USAGE
    from agent.logging import configure_logging  # noqa: PLC0415

    configure_logging(level=args.log_level, stream=sys.stderr)
    temporary = args.dir is None
    directory = Path(tempfile.mkdtemp(prefix="tunnel-emulator-")) if temporary else args.dir
    try:
        return asyncio.run(_serve(args, directory))
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    except (AgentError, OSError) as exc:
        _err(f"cannot start: {exc}")
        return EXIT_FAILURE
    finally:
        if temporary:
            shutil.rmtree(directory, ignore_errors=True)


def _add_thing(argv: list[str]) -> int:
    try:
        args = _add_thing_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and EXIT_USAGE
    from agent.emulator.app import Emulator  # noqa: PLC0415

    services: dict[str, str] = {}
    for entry in args.service:
        name, sep, target = entry.partition("=")
        if not sep or not name or not target:
            _err(f"--service {entry!r}: expected NAME=TARGET")
            return EXIT_USAGE
        services[name] = target
    try:
        emulator = Emulator(args.dir)
        bundle = emulator.add_thing(args.name, services=services or None)
    except ValueError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except ConfigError as exc:
        _err(str(exc))
        return EXIT_CONFIG
    except (AgentError, OSError) as exc:
        _err(str(exc))
        return EXIT_FAILURE
    _out(f"thing {bundle.name}")
    _out(f"  certificate  {bundle.cert}")
    _out(f"  key          {bundle.key}")
    _out(f"  CA           {bundle.ca}")
    if bundle.config.exists():
        _out(f"  config       {bundle.config}")
    else:
        _out(f"  config       {bundle.config} (written when the emulator starts)")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run ``tunnel-agent emulator`` with ``argv`` (the arguments after ``emulator``).

    Args:
        argv: Arguments; ``sys.argv[1:]`` when ``None``.

    Returns:
        0 on a clean stop, 1 if startup failed, 2 on a usage error, 78 on a
        configuration error.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] == "add-thing":
        return _add_thing(arguments[1:])
    with contextlib.suppress(KeyboardInterrupt):
        return _run(arguments)
    return EXIT_FAILURE
