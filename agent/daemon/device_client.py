"""
The AWS IoT Device Client's JSON configuration, turned into this agent's TOML.

What carries over: ``endpoint``, ``cert``, ``key``, ``root-ca``, ``thing-name`` (the five
the Device Client requires), ``logging.level``, ``tunneling.endpoint`` (the data-plane
override). What the Device Client's tunneling implied and this agent never assumes: the
services. The Device Client maps a notification's ``SSH`` to port 22 and ``VNC`` to 5900 for
any tunnel; here the ``[services]`` map is deny by default, so those two are written only
when the user asks (``--service``) or confirms. Everything else (jobs, fleet provisioning,
Device Defender, the samples, log files ...) is reported as not carried over.

Paths are read as the Device Client reads them (``wordexp``: ``~`` and ``$VARIABLES``
expanded); a relative path, which the Device Client resolves against its working
directory, is taken relative to the configuration file's directory and said so. The
agent's unit cannot read home directories (``ProtectHome=yes``) and wants the key owned
by its own user, mode 0600, where the Device Client's is root's: the files are copied
into the agent's certificate directory by ``install`` commands printed for the user.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from agent.daemon.settings import MqttSettings, ProxySettings, parse_service_target
from agent.exceptions import ConfigError
from agent.protocol.ids import SERVICE_ID, THING_NAME


if TYPE_CHECKING:
    from collections.abc import Mapping


__all__ = [
    "AGENT_USER",
    "DEFAULT_CERTS_DIR",
    "IMPLIED_SERVICES",
    "Copy",
    "DeviceClientConfig",
    "read_device_client_config",
    "render_toml",
]

#: The agent's system user (created by the .deb; the unit's User=).
AGENT_USER = "iot-tunnel-agent"
#: Where the certificates go: readable by the unit (ProtectSystem=strict allows /etc).
DEFAULT_CERTS_DIR = Path("/etc/iot-tunnel-agent/certs")
#: The Device Client's fixed service-to-port map (SecureTunnelingFeature::GetPortFromService).
IMPLIED_SERVICES = {"SSH": "22", "VNC": "5900"}

# (Device Client key, our setting, what it is): the five the Device Client requires.
_REQUIRED = (
    ("endpoint", "mqtt.endpoint", "the AWS IoT Core data endpoint"),
    ("cert", "mqtt.cert", "the device certificate file"),
    ("key", "mqtt.key", "the private key file"),
    ("root-ca", "mqtt.ca", "the root CA file"),
    ("thing-name", "thing_name", "the thing this device is"),
)
_PROVISIONED_KEYS = ("cert", "key", "thing-name")
_PATH_KEYS = frozenset({"cert", "key", "root-ca"})
# Feature blocks this agent does not implement; ``enabled`` tells whether they were in use.
_FEATURES = {
    "jobs": "AWS IoT Jobs",
    "device-defender": "Device Defender metrics",
    "fleet-provisioning": "fleet provisioning",
    "samples": "the samples (pub-sub)",
    "sample-shadow": "the sample shadow",
    "config-shadow": "the configuration shadow",
    "sensor-publish": "sensor publish",
    "secure-element": "the secure element (PKCS#11 key)",
}
_LOG_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARN": "warning", "ERROR": "error"}
_VARIABLE = re.compile(r"\$(\w+|\{\w+\})")


@dataclass(frozen=True)
class Copy:
    """One file to place for the agent, as an ``install`` command does."""

    setting: str
    source: Path
    target: Path
    owner: str
    group: str
    mode: int

    def command(self) -> str:
        """The shell command that does it (``chown``/``chmod`` when the file stays in place)."""
        if self.source == self.target:
            return (
                f"sudo chown {self.owner}:{self.group} {_quote(self.target)} && "
                f"sudo chmod {self.mode:04o} {_quote(self.target)}"
            )
        return (
            f"sudo install -o {self.owner} -g {self.group} -m {self.mode:04o} "
            f"{_quote(self.source)} {_quote(self.target)}"
        )


def _quote(path: Path) -> str:
    text = str(path)
    return text if re.fullmatch(r"[\w./@:+-]+", text) else "'" + text.replace("'", "'\\''") + "'"


@dataclass
class DeviceClientConfig:
    """What was read from one Device Client configuration file."""

    source: Path
    thing_name: str
    endpoint: str
    files: dict[str, Path]  # our setting (mqtt.cert ...) -> the Device Client's file
    tunneling: bool
    proxy_endpoint: str | None = None
    log_level: str | None = None
    notes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def copies(self, certs_dir: Path) -> list[Copy]:
        """
        The files to place in ``certs_dir`` for the agent, key last.

        Args:
            certs_dir: The agent's certificate directory.
        """
        copies: list[Copy] = []
        names: set[str] = set()
        for setting, source in self.files.items():
            name = source.name
            if name in names:  # two files of one name in different directories
                name = f"{setting.rpartition('.')[2]}-{name}"
            names.add(name)
            is_key = setting == "mqtt.key"
            owner = AGENT_USER if is_key else "root"
            copies.append(
                Copy(
                    setting, source, certs_dir / name, owner, AGENT_USER, 0o600 if is_key else 0o644
                )
            )
        return sorted(copies, key=lambda c: c.setting == "mqtt.key")


def _expand(key: str, raw: str, base: Path, notes: list[str]) -> Path:
    """Expand a Device Client path as wordexp does, then anchor a relative one at ``base``."""
    text = raw
    if raw.startswith("~"):
        text = str(Path(raw).expanduser())
        notes.append(f"{key}: '~' in {raw!r} expanded for this user to {text}")
    expanded = os.path.expandvars(text)
    if _VARIABLE.search(expanded):
        raise ValueError(f"uses an environment variable that is not set here: {raw!r}")
    path = Path(expanded)
    if not path.is_absolute():
        path = base / path
        notes.append(
            f"{key}: relative path {raw!r} taken relative to the configuration file's "
            f"directory: {path} (the Device Client resolved it against its working directory)"
        )
    return path


def _feature_enabled(block: object) -> bool | None:
    if isinstance(block, dict):
        value = block.get("enabled")
        if isinstance(value, bool):
            return value
        if "completed-fp" in block:
            return bool(block.get("completed-fp"))
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"device client config: {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"device client config: {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"device client config: {path}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"device client config: {path}: not a JSON object")
    return data


def read_device_client_config(path: Path) -> DeviceClientConfig:
    """
    Read a Device Client configuration file and check what this agent needs from it.

    Args:
        path: The Device Client's JSON configuration.

    Returns:
        The values to carry over, with notes on what changed and what was left behind.

    Raises:
        ConfigError: The file is unreadable or not JSON, or required values are missing or
            invalid: one line per problem.
    """
    path = path.absolute()
    data = _read_json(path)
    # After fleet provisioning the Device Client uses the runtime configuration's values.
    block = data.get("runtime-config")
    runtime: dict[str, Any] = block if isinstance(block, dict) else {}
    provisioned = runtime.get("completed-fp") is True
    notes: list[str] = []
    problems: list[str] = []
    values: dict[str, str] = {}
    files: dict[str, Path] = {}
    for key, setting, what in _REQUIRED:
        value = data.get(key)
        if provisioned and key in _PROVISIONED_KEYS and runtime.get(key):
            value = runtime[key]
            notes.append(f"{key}: taken from runtime-config (fleet provisioning completed)")
        if value is None or value == "":
            problems.append(f"{key}: required, not set ({what}; becomes {setting})")
            continue
        if not isinstance(value, str):
            problems.append(f"{key} = {value!r}: must be a string")
            continue
        if key in _PATH_KEYS:
            try:
                files[setting] = _expand(key, value, path.parent, notes)
            except ValueError as exc:
                problems.append(f"{key} = {value!r}: {exc}")
        else:
            values[key] = value
    problems += _check_values(values)
    if problems and _feature_enabled(data.get("fleet-provisioning")):
        problems.append(
            "fleet-provisioning is enabled: the certificate, key and thing name it obtained are "
            "in the Device Client's runtime configuration (aws-iot-device-client-runtime.conf)"
        )
    if problems:
        raise ConfigError(f"cannot import {path}:\n  " + "\n  ".join(problems))
    config = DeviceClientConfig(
        source=path,
        thing_name=values["thing-name"],
        endpoint=values["endpoint"],
        files=files,
        tunneling=True,
        notes=notes,
    )
    _read_tunneling(data.get("tunneling"), config)
    _read_logging(data.get("logging"), config)
    _read_features(data, config)
    return config


def _check_values(values: Mapping[str, str]) -> list[str]:
    problems: list[str] = []
    if "thing-name" in values and not THING_NAME.fullmatch(values["thing-name"]):
        problems.append(
            f"thing-name = {values['thing-name']!r}: must match [a-zA-Z0-9:_-]{{1,128}}"
        )
    if "endpoint" in values:
        try:
            MqttSettings(endpoint=values["endpoint"])
        except ValidationError:
            problems.append(
                f"endpoint = {values['endpoint']!r}: must be a host name, without scheme or port"
            )
    return problems


def _read_tunneling(block: object, config: DeviceClientConfig) -> None:
    if block is None:
        config.notes.append(
            "tunneling: no block in the file; recent Device Client versions enable it by default"
        )
        return
    if not isinstance(block, dict):
        config.dropped.append("tunneling: not a JSON object, ignored")
        return
    config.tunneling = block.get("enabled", True) is not False
    if not config.tunneling:
        config.notes.append(
            "tunneling: disabled in the Device Client; this agent serves tunnels, so check "
            "that this is the device you mean to migrate"
        )
    endpoint = block.get("endpoint")
    if isinstance(endpoint, str) and endpoint:
        try:
            ProxySettings(endpoint=endpoint)
        except ValidationError:
            config.dropped.append(
                f"tunneling.endpoint = {endpoint!r}: not a host[:port], not carried over"
            )
        else:
            config.proxy_endpoint = endpoint
            config.notes.append(
                f"tunneling.endpoint: carried over as proxy.endpoint = {endpoint!r} "
                "(the data-plane endpoint, instead of the one of the notification's region)"
            )
    if block.get("subscribe-notification") is False:
        config.notes.append(
            "tunneling.subscribe-notification = false: this agent always subscribes to its "
            "notify topic; a single tunnel started from a token is `tunnel-localproxy`'s job"
        )
    for key in sorted(set(block) - {"enabled", "endpoint", "subscribe-notification"}):
        config.dropped.append(f"tunneling.{key}: not a Device Client setting, ignored")


def _read_logging(block: object, config: DeviceClientConfig) -> None:
    if not isinstance(block, dict):
        return
    level = block.get("level")
    if isinstance(level, str) and level.upper() in _LOG_LEVELS:
        config.log_level = _LOG_LEVELS[level.upper()]
        config.notes.append(f"logging.level: carried over as {config.log_level}")
    others = sorted(set(block) - {"level"})
    if others:
        config.dropped.append(
            f"logging ({', '.join(others)}): this agent logs to stdout (journald under "
            "systemd), JSON or console ([logging] format); log files are not carried over"
        )


def _read_features(data: Mapping[str, Any], config: DeviceClientConfig) -> None:
    known = {key for key, _, _ in _REQUIRED} | {"tunneling", "logging"}
    for key in data:
        if key in known:
            continue
        if key == "runtime-config":
            done = isinstance(data[key], dict) and data[key].get("completed-fp") is True
            if not done:
                config.dropped.append("runtime-config: fleet provisioning not completed, ignored")
        elif key in _FEATURES:
            enabled = _feature_enabled(data[key])
            state = {True: "enabled", False: "disabled", None: "present"}[enabled]
            config.dropped.append(
                f"{key} ({state}): {_FEATURES[key]}, not part of this agent"
                + ("; keep the Device Client for it" if enabled else "")
            )
        elif key == "clean-session":
            config.dropped.append("clean-session: not read by the Device Client either, ignored")
        else:
            config.dropped.append(f"{key}: not a Device Client setting, ignored")


def _toml_string(value: str) -> str:
    # JSON strings are TOML basic strings (escapes included) for the characters used here.
    return json.dumps(value)


def _toml_target(target: str) -> str:
    return target if target.isdigit() else _toml_string(target)


def render_toml(config: DeviceClientConfig, *, services: Mapping[str, str], certs_dir: Path) -> str:
    """
    Write this agent's configuration for an imported Device Client configuration.

    Args:
        config: From :func:`read_device_client_config`.
        services: The ``[services]`` map (validated targets), possibly empty.
        certs_dir: Where the certificate files are placed (see :meth:`DeviceClientConfig.copies`).

    Returns:
        The TOML text.

    Raises:
        ConfigError: A service name or target is invalid.
    """
    problems = [
        f"--service {name}: a service name must match [a-zA-Z0-9_-]{{1,128}}"
        for name in services
        if not SERVICE_ID.fullmatch(name)
    ]
    targets: dict[str, str] = {}
    for name, target in services.items():
        try:
            targets[name] = parse_service_target(target)
        except ValueError as exc:
            problems.append(f"--service {name}={target}: {exc}")
    if problems:
        raise ConfigError("invalid services:\n  " + "\n  ".join(problems))
    placed = {copy.setting: copy.target for copy in config.copies(certs_dir)}
    lines = [
        f"# Imported from the AWS IoT Device Client configuration {config.source}",
        "# by `tunnel-agent import-device-client`. Check it, as the agent's user, with:",
        "#   tunnel-agent check-config --config THIS_FILE",
        "",
        f"thing_name = {_toml_string(config.thing_name)}",
        'notify = "mqtt"',
        "",
        "# Deny by default: a notification naming any service not listed here is refused.",
        "[services]",
        *(f"{name} = {_toml_target(target)}" for name, target in targets.items()),
        *([] if targets else ["# none yet, e.g. SSH = 22"]),
        "",
        "[mqtt]",
        f"endpoint = {_toml_string(config.endpoint)}",
        *(
            f"{setting.partition('.')[2]} = {_toml_string(str(placed[setting]))}"
            for setting in ("mqtt.cert", "mqtt.key", "mqtt.ca")
        ),
    ]
    if config.proxy_endpoint:
        lines += ["", "[proxy]", f"endpoint = {_toml_string(config.proxy_endpoint)}"]
    if config.log_level:
        lines += ["", "[logging]", f"level = {_toml_string(config.log_level)}"]
    return "\n".join(lines) + "\n"
