"""
``tunnel-agent``: the command line of the device agent.

Sub-commands: ``run`` (the daemon), ``check-config``, ``status``, ``version``;
``emulator`` and ``connect`` dispatch lazily to modules that are not needed on
a device (imported only when that sub-command runs).

Every setting has a flag mirroring its environment variable one to one, as
uvicorn's ``auto_envvar_prefix`` does: ``TUNNEL_AGENT_MQTT__PORT``
is ``--mqtt-port``; ``[services]`` entries are ``--service NAME=TARGET``.

Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 configuration error (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args, get_origin

from pydantic import BaseModel

from agent import __version__
from agent.daemon.capath import ca_directory_plan, needs_ca_directory
from agent.daemon.settings import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_RUNTIME_DIR,
    AgentSettings,
    check_files,
    load_settings,
)
from agent.daemon.status import format_status, read_status
from agent.exceptions import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, AgentError, ConfigError
from agent.notify import resolve_kind


if TYPE_CHECKING:
    from collections.abc import Sequence


__all__ = ["main"]


# Sub-commands implemented elsewhere; imported only when used.
_LAZY = {
    "emulator": ("agent.emulator.cli", "run the Secure Tunneling emulator (development)"),
    "connect": ("agent.connect.command", "open a tunnel and connect to a device (operator side)"),
}
_SKIPPED_FIELDS = frozenset({"services"})


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def _is_scalar(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin in (dict, tuple, list):
        return False
    return all(_is_scalar(arg) for arg in get_args(annotation) if arg is not type(None))


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _setting_flags() -> list[tuple[tuple[str, ...], str, bool]]:
    """
    List (path, flag, is_bool) for every scalar setting, sections included.
    """
    flags: list[tuple[tuple[str, ...], str, bool]] = []
    for name, info in AgentSettings.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub, sub_info in annotation.model_fields.items():
                if _is_scalar(sub_info.annotation):
                    flag = f"--{name}-{sub}".replace("_", "-")
                    flags.append(((name, sub), flag, _is_bool(sub_info.annotation)))
        elif name not in _SKIPPED_FIELDS and _is_scalar(annotation):
            flags.append(((name,), f"--{name}".replace("_", "-"), _is_bool(annotation)))
    return flags


def _add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("TUNNEL_AGENT_CONFIG"),
        help=f"TOML settings file (default {DEFAULT_CONFIG_PATH}; env TUNNEL_AGENT_CONFIG)",
    )
    group = parser.add_argument_group("settings (each overrides its TUNNEL_AGENT_* variable)")
    for path, flag, is_bool in _setting_flags():
        env = "TUNNEL_AGENT_" + "__".join(path).upper()
        dest = "setting:" + ".".join(path)
        if is_bool:
            group.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=env
            )
        else:
            group.add_argument(flag, dest=dest, metavar="VALUE", default=None, help=env)
    group.add_argument(
        "--service",
        dest="services",
        action="append",
        metavar="NAME=TARGET",
        default=[],
        help="add or replace a [services] entry (TARGET: port, host:port or socket path)",
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith("setting:") or value is None:
            continue
        *sections, leaf = dest.removeprefix("setting:").split(".")
        target = overrides
        for section in sections:
            target = target.setdefault(section, {})
        target[leaf] = value
    services: dict[str, str] = {}
    for entry in args.services:
        name, sep, target = entry.partition("=")
        if not sep:
            raise ConfigError(f"--service {entry!r}: expected NAME=TARGET")
        services[name] = target
    if services:
        overrides["services"] = services
    return overrides


def _load(args: argparse.Namespace) -> AgentSettings:
    settings = load_settings(args.config, _overrides(args))
    problems = check_files(settings)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return settings


def _cmd_check_config(args: argparse.Namespace) -> int:
    settings = _load(args)
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


def _cmd_run(args: argparse.Namespace) -> int:
    # Imported here: `status` and `check-config` need neither asyncio apps nor SDKs.
    from agent.daemon.lifecycle import build_daemon  # noqa: PLC0415
    from agent.daemon.reexec import ReexecPlan  # noqa: PLC0415
    from agent.logging import configure_logging  # noqa: PLC0415

    settings = _load(args)
    configure_logging(level=settings.logging.level, fmt=settings.logging.format)
    overrides = _overrides(args)

    def reload() -> AgentSettings:
        return load_settings(args.config, overrides)

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


def _status_dir(args: argparse.Namespace) -> Path:
    if args.runtime_dir is not None:
        return Path(args.runtime_dir)
    if env := os.environ.get("TUNNEL_AGENT_RUNTIME_DIR"):
        return Path(env)
    config = args.config or DEFAULT_CONFIG_PATH
    try:
        with Path(config).open("rb") as file:
            configured = tomllib.load(file).get("runtime_dir")
    except (OSError, tomllib.TOMLDecodeError):
        configured = None
    if isinstance(configured, str):
        return Path(configured)
    if env := os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]:
        return Path(env)
    return DEFAULT_RUNTIME_DIR


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        document = read_status(_status_dir(args))
    except AgentError as exc:
        _err(f"tunnel-agent: {exc}")
        return EXIT_FAILURE
    if args.json:
        _out(json.dumps(document, indent=2))
    else:
        sys.stdout.write(format_status(document))
    return EXIT_OK


def _cmd_version(_args: argparse.Namespace) -> int:
    _out(f"tunnel-agent {__version__}")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnel-agent", description="AWS IoT Secure Tunneling device agent."
    )
    parser.add_argument("--version", action="version", version=f"tunnel-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the agent daemon")
    _add_setting_arguments(run)
    run.set_defaults(handler=_cmd_run)
    check = commands.add_parser(
        "check-config", help="validate the settings; exit 78 and say what is wrong"
    )
    _add_setting_arguments(check)
    check.set_defaults(handler=_cmd_check_config)
    status = commands.add_parser("status", help="show the running agent's tunnels")
    status.add_argument("--runtime-dir", help="directory of the agent's status file")
    status.add_argument("--config", type=Path, help="settings file (for its runtime_dir)")
    status.add_argument("--json", action="store_true", help="print the raw status document")
    status.set_defaults(handler=_cmd_status)
    version = commands.add_parser("version", help="print the version")
    version.set_defaults(handler=_cmd_version)
    for name, (_, help_text) in _LAZY.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


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
        try:
            module = importlib.import_module(_LAZY[arguments[0]][0])
        except ImportError as exc:
            # e.g. a device install without the emulator/operator extras.
            _err(f"tunnel-agent: '{arguments[0]}' is not available in this installation: {exc}")
            return EXIT_FAILURE
        result: int = module.main(arguments[1:])
        return result
    args = _parser().parse_args(arguments)
    args.argv = arguments
    try:
        result = args.handler(args)
    except ConfigError as exc:
        _err(f"tunnel-agent: {exc}")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_FAILURE
    return result
