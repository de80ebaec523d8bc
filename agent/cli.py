"""
``tunnel-agent``: the command line of the device agent.

Sub-commands: ``run`` (the daemon), ``check-config``, ``status``, ``version``,
``import-device-client``; ``emulator`` and ``connect`` dispatch lazily to modules
that are not needed on a device (imported only when that sub-command runs). Without
their extra ([emulator], [operator]) they print one line naming it and exit 1.

Every setting has a flag mirroring its environment variable one to one
(agent/daemon/flags.py): ``TUNNEL_AGENT_MQTT__PORT`` is ``--mqtt-port``.

Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 configuration error (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import os
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.common.files import write_private
from agent.daemon.capath import ca_directory_plan, needs_ca_directory
from agent.daemon.device_client import (
    AGENT_USER,
    DEFAULT_CERTS_DIR,
    IMPLIED_SERVICES,
    DeviceClientConfig,
    read_device_client_config,
    render_toml,
)
from agent.daemon.flags import add_setting_arguments, overrides, parse_service_flags
from agent.daemon.settings import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_RUNTIME_DIR,
    AgentSettings,
    check_dates,
    check_files,
    load_settings,
)
from agent.daemon.status import format_status, read_status
from agent.exceptions import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, AgentError, ConfigError
from agent.notify import resolve_kind
from agent.protocol.ids import THING_NAME


if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


__all__ = ["build_parser", "main"]


@dataclass(frozen=True)
class _Lazy:
    """A sub-command implemented elsewhere, imported only when used, and the extra it needs."""

    module: str
    help: str
    extra: str
    # Top-level modules of the extra's distributions, checked before anything is imported.
    requires: tuple[str, ...]


_LAZY = {
    "emulator": _Lazy(
        "agent.emulator.cli",
        "run the Secure Tunneling emulator (development)",
        "emulator",
        ("aiohttp", "botocore", "boto3", "cryptography", "regex"),
    ),
    "connect": _Lazy(
        "agent.connect.command",
        "open a tunnel and connect to a device (operator side)",
        "operator",
        ("boto3",),
    ),
}


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _load(args: argparse.Namespace, *, dates: bool) -> AgentSettings:
    settings = load_settings(args.config, overrides(args))
    problems = check_files(settings) + (check_dates(settings) if dates else [])
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return settings


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args, dates=True)
    source = args.config or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None)
    _out(f"configuration ok ({source or 'environment and flags only'})")
    _out(f"  thing_name: {settings.thing_name}")
    _out(f"  notify: {settings.notify}")
    services = ", ".join(f"{k}={v}" for k, v in settings.services.items())
    _out(f"  services: {services or '(none: every notification will be refused)'}")
    _out(
        f"  limits: max_concurrent_tunnels={settings.limits.max_concurrent_tunnels} "
        f"max_tunnel_lifetime={settings.limits.max_tunnel_lifetime} "
        f"on_limit={settings.limits.on_limit}"
    )
    _out(f"  proxy: {settings.proxy.binary}")
    if settings.proxy.binary == "bundled" and settings.proxy.launcher:
        _out(f"  memory: {_page_merging(settings.proxy.merge_pages)}")
    if resolve_kind(settings.notify) == "mqtt":
        mqtt = settings.mqtt
        _out(
            f"  mqtt: reconnect {mqtt.min_reconnect_delay:g}-{mqtt.max_reconnect_delay:g}s "
            f"(reset after {mqtt.reconnect_reset_after:g}s connected) "
            f"receive_maximum={mqtt.receive_maximum}"
        )
    proxy = settings.proxy
    if proxy.ca is not None and needs_ca_directory(proxy.binary, proxy.ca):
        # The file must hold certificates the agent can hash: fail now, not at start.
        directory = ca_directory_plan(proxy.ca, settings.state_dir / "ca")
        _err(
            f"tunnel-agent: warning: proxy.ca = '{proxy.ca}' is a file, but proxy.binary = "
            f"'{proxy.binary}' takes only a hashed CA directory (-c): at start the agent makes "
            f"one from the file, {directory}, and passes that instead"
        )
    return EXIT_OK


def _page_merging(offered: bool) -> str:
    """What check-config says of same-page merging among the launcher's proxies."""
    if not offered:
        return "proxies not offered to same-page merging (proxy.merge_pages = false)"
    from agent.common.process import ksm_state  # noqa: PLC0415 - ctypes, for this line only

    state = ksm_state()
    if state == "running":
        return "proxies offered to same-page merging; ksmd runs"
    if state == "stopped":
        return (
            "proxies offered to same-page merging, but ksmd is stopped: about 5 MB more per "
            "tunnel (README: 'Memory: same-page merging')"
        )
    return "this kernel has no same-page merging (KSM)"


def _cmd_run(args: argparse.Namespace) -> int:
    # Imported here: `status` and `check-config` need neither asyncio apps nor SDKs.
    import structlog  # noqa: PLC0415

    from agent.daemon.lifecycle import build_daemon  # noqa: PLC0415
    from agent.daemon.reexec import ReexecPlan  # noqa: PLC0415
    from agent.logging import configure_logging  # noqa: PLC0415

    settings = _load(args, dates=False)
    configure_logging(level=settings.logging.level, fmt=settings.logging.format)
    for problem in check_dates(settings):
        # Not fatal here: the clock may be wrong until NTP has synced, or the certificate
        # renewed in place; AWS IoT's refusal is then logged and retried.
        structlog.get_logger("agent.cli").warning("certificate_not_valid_now", problem=problem)
    flags = overrides(args)

    def reload() -> AgentSettings:
        return load_settings(args.config, flags)

    # SIGHUP re-executes this command line, which is only ours when main() got sys.argv.
    run_args: list[str] = args.argv[1:]
    plan = None
    if args.argv == sys.argv[1:]:
        plan = ReexecPlan.for_cli(run_args, runtime_dir=settings.state_dir)
    try:
        daemon = build_daemon(settings, reload=reload, reexec_plan=plan)
    except ImportError as exc:
        _err(f"tunnel-agent: notification source unavailable: {exc}")
        return EXIT_FAILURE
    return asyncio.run(daemon.run())


def _status_target(args: argparse.Namespace) -> tuple[Path, str | None]:
    """
    Where the agent's status file is: its runtime directory, and its thing when known.

    The thing comes from --thing, else ``TUNNEL_AGENT_THING_NAME``, else the file given with
    --config; without any, :func:`read_status` takes the only live agent in the directory.
    """
    config: dict[str, Any] = {}
    if args.config is not None or DEFAULT_CONFIG_PATH.exists():
        try:
            with Path(args.config or DEFAULT_CONFIG_PATH).open("rb") as file:
                config = tomllib.load(file)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            if args.config is not None:
                raise ConfigError(f"config: {args.config}: {_reason(exc)}") from None
    thing = args.thing or os.environ.get("TUNNEL_AGENT_THING_NAME")
    if thing is None and args.config is not None and isinstance(config.get("thing_name"), str):
        thing = config["thing_name"]
    if thing is not None and not THING_NAME.fullmatch(thing):
        raise ConfigError(f"thing_name = {thing!r}: must match [a-zA-Z0-9:_-]{{1,128}}")
    if args.runtime_dir is not None:
        return Path(args.runtime_dir), thing
    if env := os.environ.get("TUNNEL_AGENT_RUNTIME_DIR"):
        return Path(env), thing
    if isinstance(config.get("runtime_dir"), str):
        return Path(config["runtime_dir"]), thing
    if env := os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]:
        return Path(env), thing
    return DEFAULT_RUNTIME_DIR, thing


def _reason(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"invalid TOML: {exc}"


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        document = read_status(*_status_target(args))
    except AgentError as exc:
        _err(f"tunnel-agent: {exc}")
        return EXIT_FAILURE
    if args.json:
        _out(json.dumps(document, indent=2))
    else:
        sys.stdout.write(format_status(document))
    return EXIT_OK


_IMPLIED = " and ".join(f"{name} on port {port}" for name, port in IMPLIED_SERVICES.items())


def _confirm(question: str) -> bool:
    # Asked on the terminal only: stdout may be the TOML being written.
    if not sys.stdin.isatty():
        return False
    sys.stderr.write(f"{question} [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in {"y", "yes"}


def _cmd_import_device_client(args: argparse.Namespace) -> int:
    config = read_device_client_config(args.path)
    services = parse_service_flags(args.services)
    question = f"Allow {_IMPLIED}, as the Device Client's tunneling did?"
    if config.tunneling and not services and (args.yes or _confirm(question)):
        services = dict(IMPLIED_SERVICES)
    text = render_toml(config, services=services, certs_dir=args.certs_dir)
    report = _out if args.output else _err
    if args.output is not None:
        if args.output.exists() and not (args.yes or _confirm(f"Replace {args.output}?")):
            _err(f"tunnel-agent: {args.output} exists: pass --yes to replace it")
            return EXIT_FAILURE
        try:
            write_private(args.output, text.encode())
            # No secret in it (the key stays in its own file): readable like any configuration.
            args.output.chmod(0o644)
        except OSError as exc:
            _err(f"tunnel-agent: {args.output}: {exc.strerror or exc}")
            return EXIT_FAILURE
        report(f"wrote {args.output} for thing {config.thing_name}")
    else:
        sys.stdout.write(text)
    _import_report(config, services, args, report)
    return EXIT_OK


def _import_report(
    config: DeviceClientConfig,
    services: dict[str, str],
    args: argparse.Namespace,
    report: Callable[[str], None],
) -> None:
    if services:
        report("services: " + ", ".join(f"{k}={v}" for k, v in services.items()))
    elif config.tunneling:
        report(
            f"services: none. The Device Client's tunneling allowed {_IMPLIED} for any tunnel; "
            "this agent refuses every service not listed: rerun with --service SSH=22 "
            "(--service VNC=5900) or --yes to allow them, or edit [services]."
        )
    for title, lines in (("notes", config.notes), ("not carried over", config.dropped)):
        if lines:
            report(f"{title}:")
            for line in lines:
                report(f"  - {line}")
    copies = config.copies(args.certs_dir)
    report(
        f"next steps, as root. This agent requires its key owned by its own user "
        f"({AGENT_USER}), mode 0600 or 0400 (the Device Client's is root's), and cannot "
        "read home directories: the files are copied for it."
    )
    report(f"  sudo install -d -o root -g {AGENT_USER} -m 0750 {args.certs_dir}")
    for copy in copies:
        try:
            copy.source.stat()
        except OSError as exc:
            report(f"  # {copy.setting}: {copy.source}: {exc.strerror} here")
        report(f"  {copy.command()}")
    target = args.output or "FILE"
    report(f"  sudo -u {AGENT_USER} tunnel-agent check-config --config {target}")
    report(
        "  then stop the Device Client (sudo systemctl disable --now aws-iot-device-client) or "
        'at least its tunneling ("tunneling": {"enabled": false}): AWS IoT allows one '
        f"connection per client id, and both would connect as {config.thing_name}."
    )


def _cmd_version(_args: argparse.Namespace) -> int:
    _out(f"tunnel-agent {__version__}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """
    Return the `tunnel-agent` parser with every sub-command (also the man page's source).
    """
    parser = argparse.ArgumentParser(
        prog="tunnel-agent", description="AWS IoT Secure Tunneling device agent."
    )
    parser.add_argument("--version", action="version", version=f"tunnel-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the agent daemon")
    add_setting_arguments(run)
    run.set_defaults(handler=_cmd_run)
    check = commands.add_parser(
        "check-config", help="validate the settings; exit 78 and say what is wrong"
    )
    add_setting_arguments(check)
    check.set_defaults(handler=_cmd_check_config)
    status = commands.add_parser("status", help="show the running agent's tunnels")
    status.add_argument("--runtime-dir", metavar="DIR", help="directory of the agent's status file")
    status.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the agent's settings file (for its thing_name and runtime_dir)",
    )
    status.add_argument(
        "--thing",
        metavar="NAME",
        help="the agent serving this thing, when several run on this host (default: the only one)",
    )
    status.add_argument("--json", action="store_true", help="print the raw status document")
    status.set_defaults(handler=_cmd_status)
    importer = commands.add_parser(
        "import-device-client",
        help="turn an AWS IoT Device Client configuration into this agent's",
        description="Write this agent's TOML configuration from the AWS IoT Device Client's "
        "JSON one, and say what it could not carry over and which commands give the agent "
        "its certificate files. The TOML goes to stdout (the report to stderr) unless "
        "--output is given. Exit status 78 when required values are missing.",
    )
    importer.add_argument("path", type=Path, help="the Device Client's configuration file")
    importer.add_argument(
        "--output", type=Path, metavar="FILE", help="write the TOML here (default: stdout)"
    )
    importer.add_argument(
        "--service",
        dest="services",
        action="append",
        metavar="NAME=TARGET",
        default=[],
        help="a [services] entry (repeatable); without any, SSH=22 and VNC=5900 (what the "
        "Device Client's tunneling allowed) are written only when confirmed or with --yes",
    )
    importer.add_argument(
        "--certs-dir",
        type=Path,
        metavar="DIR",
        default=DEFAULT_CERTS_DIR,
        help=f"where the certificate and key are copied for the agent (default: "
        f"{DEFAULT_CERTS_DIR})",
    )
    importer.add_argument(
        "--yes",
        action="store_true",
        help="answer yes: allow SSH=22 and VNC=5900, replace an existing --output file",
    )
    importer.set_defaults(handler=_cmd_import_device_client)
    version = commands.add_parser("version", help="print the version")
    version.set_defaults(handler=_cmd_version)
    for name, lazy in _LAZY.items():
        commands.add_parser(name, help=f"{lazy.help} [{lazy.extra} extra]", add_help=False)
    return parser


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _run_lazy(command: str, argv: list[str]) -> int:
    lazy = _LAZY[command]
    # A device installs neither extra: say which one to add, not a ModuleNotFoundError.
    missing = (
        f"error: tunnel-agent {command} needs the [{lazy.extra}] extra: "
        f"pip install 'iot-tunnel-agent[{lazy.extra}]'"
    )
    if not all(_installed(name) for name in lazy.requires):
        _err(missing)
        return EXIT_FAILURE
    try:
        module = importlib.import_module(lazy.module)
    except ImportError as exc:
        name = exc.name or ""
        ours = not name or name.split(".")[0] in lazy.requires or lazy.module.startswith(name)
        _err(missing if ours else f"error: tunnel-agent {command}: {exc}")
        return EXIT_FAILURE
    status: int = module.main(argv)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run ``tunnel-agent`` with ``argv`` (``sys.argv[1:]`` by default).

    Args:
        argv: Command-line arguments without the program name.

    Returns:
        The exit status.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments and arguments[0] in _LAZY:
        return _run_lazy(arguments[0], arguments[1:])
    args = build_parser().parse_args(arguments)
    args.argv = arguments
    try:
        result: int = args.handler(args)
    except ConfigError as exc:
        _err(f"tunnel-agent: {exc}")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_FAILURE
    return result
