"""
Command-line flags generated from the settings model, one per scalar setting.

Every flag mirrors its environment variable one to one, as uvicorn's
``auto_envvar_prefix`` does: ``TUNNEL_AGENT_MQTT__PORT`` is ``--mqtt-port``;
``[services]`` entries are ``--service NAME=TARGET``. The help of each flag is
the field's description, its allowed values, default and variable, so
``tunnel-agent run --help`` documents every setting without a second source.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from pydantic import BaseModel, SecretStr

from agent.daemon.settings import DEFAULT_CONFIG_PATH, AgentSettings
from agent.exceptions import ConfigError


if TYPE_CHECKING:
    from collections.abc import Iterable

    from pydantic.fields import FieldInfo


__all__ = [
    "ENV_PREFIX",
    "SettingFlag",
    "add_setting_arguments",
    "overrides",
    "parse_service_flags",
    "setting_flags",
]

ENV_PREFIX = "TUNNEL_AGENT_"
# Mappings and lists have no flag: the TOML file or the variable (JSON) sets them.
_SKIPPED_FIELDS = frozenset({"services"})
# Where the type alone says too little.
_METAVARS = {
    ("thing_name",): "NAME",
    ("mqtt", "endpoint"): "HOST",
    ("mqtt", "client_id"): "ID",
    ("proxy", "endpoint"): "HOST[:PORT]",
}


class SettingFlag:
    """
    One generated flag: the setting's path, the flag, its variable and help text.
    """

    def __init__(self, path: tuple[str, ...], info: FieldInfo) -> None:
        """
        Describe the flag of the setting at ``path`` (section, name) with field ``info``.
        """
        self.path = path
        self.flag = "--" + "-".join(path).replace("_", "-")
        self.env = ENV_PREFIX + "__".join(path).upper()
        self.dest = "setting:" + ".".join(path)
        self.is_bool = info.annotation is bool
        self.choices = _choices(info.annotation)
        if self.choices:
            self.metavar = "{" + ",".join(self.choices) + "}"
        else:
            self.metavar = _METAVARS.get(path) or _metavar(info.annotation)
        self.help = _help(info, self.choices, self.env)


def _choices(annotation: Any) -> tuple[str, ...]:
    """The values of a ``Literal`` (optionally ``| None``), else nothing."""
    if get_origin(annotation) is Literal:
        return tuple(str(arg) for arg in get_args(annotation))
    args = [arg for arg in get_args(annotation) if arg is not type(None)]
    if len(args) == 1 and get_origin(args[0]) is Literal:
        return tuple(str(arg) for arg in get_args(args[0]))
    return ()


def _metavar(annotation: Any) -> str:
    members = get_args(annotation) or (annotation,)
    # A Literal beside another type (proxy.binary: "bundled" or a path) lists its words first.
    words = [str(w) for m in members if get_origin(m) is Literal for w in get_args(m)]
    kinds = {m for m in members if isinstance(m, type)}
    return "|".join([*words, _type_metavar(kinds)])


def _type_metavar(kinds: set[type]) -> str:
    for kind, metavar in (
        (timedelta, "DURATION"),
        (SecretStr, "URL"),
        (Path, "PATH"),
        (int, "N"),
        (float, "SECONDS"),
    ):
        if kind in kinds:
            return metavar
    return "VALUE"


def _shown(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, timedelta):
        seconds = int(value.total_seconds())
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if seconds % size == 0:
                return f"{seconds // size}{unit}"
        return f"{seconds}s"
    return str(value)


def _help(info: FieldInfo, choices: tuple[str, ...], env: str) -> str:
    text = info.description or ""
    if choices and not all(choice in text for choice in choices):
        text += f"; one of {', '.join(choices)}"
    if info.is_required():
        tail = "required"
    elif info.annotation is bool:
        tail = f"default: {'on' if info.default else 'off'}"
    else:
        tail = f"default: {_shown(info.get_default(call_default_factory=True))}"
    # argparse %-formats help strings.
    return f"{text} ({tail}; env {env})".replace("%", "%%")


def setting_flags() -> list[SettingFlag]:
    """
    Return the flag of every scalar setting, sections included, in model order.
    """
    flags: list[SettingFlag] = []
    for name, info in AgentSettings.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            flags.extend(
                SettingFlag((name, sub), sub_info)
                for sub, sub_info in annotation.model_fields.items()
                if _is_scalar(sub_info.annotation)
            )
        elif name not in _SKIPPED_FIELDS and _is_scalar(annotation):
            flags.append(SettingFlag((name,), info))
    return flags


def _is_scalar(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin in (dict, tuple, list):
        return False
    return all(_is_scalar(arg) for arg in get_args(annotation) if arg is not type(None))


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """
    Add ``--config``, one flag per setting and ``--service`` to ``parser``.
    """
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        default=os.environ.get("TUNNEL_AGENT_CONFIG"),
        help=f"TOML settings file (default: {DEFAULT_CONFIG_PATH}; env TUNNEL_AGENT_CONFIG)",
    )
    group = parser.add_argument_group(
        "settings",
        "Each flag overrides its TUNNEL_AGENT_* variable, which overrides the TOML file.",
    )
    for setting in setting_flags():
        if setting.is_bool:
            group.add_argument(
                setting.flag,
                dest=setting.dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=setting.help,
            )
        else:
            group.add_argument(
                setting.flag, dest=setting.dest, metavar=setting.metavar, help=setting.help
            )
    group.add_argument(
        "--service",
        dest="services",
        action="append",
        metavar="NAME=TARGET",
        default=[],
        help="add or replace a [services] entry; TARGET: port, host:port or absolute socket "
        "path (repeatable; default: none, every notification is refused; env "
        "TUNNEL_AGENT_SERVICES as JSON)",
    )


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """
    Collect the flags given on the command line as nested settings overrides.

    Raises:
        ConfigError: A ``--service`` value is not ``NAME=TARGET``.
    """
    found: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if not dest.startswith("setting:") or value is None:
            continue
        *sections, leaf = dest.removeprefix("setting:").split(".")
        target = found
        for section in sections:
            target = target.setdefault(section, {})
        target[leaf] = value
    if services := parse_service_flags(args.services):
        found["services"] = services
    return found


def parse_service_flags(entries: Iterable[str]) -> dict[str, str]:
    """
    Turn ``--service NAME=TARGET`` values into a map (targets are validated later).

    Raises:
        ConfigError: A value is not ``NAME=TARGET``.
    """
    services: dict[str, str] = {}
    for entry in entries:
        name, sep, target = entry.partition("=")
        if not sep:
            raise ConfigError(f"--service {entry!r}: expected NAME=TARGET")
        services[name] = target
    return services
