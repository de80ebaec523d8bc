"""
The agent's settings: one frozen pydantic-settings model, validated once at startup.

Sources, highest priority first: command-line flags (passed as ``overrides``),
``TUNNEL_AGENT_*`` environment variables (nested delimiter ``__``, e.g.
``TUNNEL_AGENT_MQTT__PORT``), then the TOML file (default
``/etc/iot-tunnel-agent/config.toml``). Components never receive this object:
the daemon passes plain keyword arguments down.

:func:`load_settings` turns every problem into one :class:`ConfigError` whose
message lists each bad field as ``field = value: why``, unknown keys and
``TUNNEL_AGENT_*`` variables with a suggestion; :func:`check_files` adds what only
the filesystem can tell (unreadable, exposed or damaged key and certificate files, a
key that is not the certificate's), :func:`check_dates` the certificates' validity.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tomllib
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict

from agent.daemon.credentials import certificate_problems, date_problems, key_problems
from agent.daemon.spelling import suggest_key, unknown_variables
from agent.exceptions import ConfigError
from agent.notify import NotifyKind, resolve_kind
from agent.protocol.ids import SERVICE_ID, THING_NAME


if TYPE_CHECKING:
    from collections.abc import Mapping

    from pydantic_settings import PydanticBaseSettingsSource


__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_RUNTIME_DIR",
    "DEFAULT_STATE_DIR",
    "ENV_PREFIX",
    "OTHER_VARIABLES",
    "AgentSettings",
    "LimitsSettings",
    "LoggingSettings",
    "MqttSettings",
    "ProxySettings",
    "ReportSettings",
    "TunnelsSettings",
    "check_dates",
    "check_files",
    "load_settings",
    "parse_duration",
    "parse_service_target",
]

DEFAULT_CONFIG_PATH = Path("/etc/iot-tunnel-agent/config.toml")
DEFAULT_RUNTIME_DIR = Path("/run/iot-tunnel-agent")
DEFAULT_STATE_DIR = Path("/var/lib/iot-tunnel-agent")
ENV_PREFIX = "TUNNEL_AGENT_"
#: Variables with the settings prefix that are not settings: read by agent/cli.py (--config)
#: and agent/common/loop.py.
OTHER_VARIABLES = frozenset({"TUNNEL_AGENT_CONFIG", "TUNNEL_AGENT_EVENT_LOOP"})

# host[:port] for the proxy endpoint override, as localproxy accepts it (docs/protocol.md §9.2).
_ENDPOINT = re.compile(r"[a-z0-9.\[\]-]+(:[0-9]{1,5})?")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)([dhms])", re.ASCII)
_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
# The agent sets these per tunnel; configuration must not override them (docs/architecture.md §5.2).
_RESERVED_ENV = frozenset(
    {"AWSIOT_TUNNEL_ACCESS_TOKEN", "AWSIOT_TUNNEL_CLIENT_TOKEN", "AWSIOT_CLIENT_TOKEN"}
)
# Flags the agent builds itself; extra_args must not change the tunnel's shape or carry a token.
_RESERVED_ARGS = frozenset(
    {"-t", "--access-token", "-i", "--client-token", "-r", "--region", "-e", "--proxy-endpoint",
     "-s", "--source-listen-port", "-d", "--destination-app", "-m", "--mode", "--config"}
)  # fmt: skip


def parse_service_target(value: object) -> str:
    """
    Validate one ``[services]`` value and return it in localproxy ``-d`` form.

    Args:
        value: A port (int or digits), ``host:port``, or an absolute Unix socket path.

    Returns:
        The target as localproxy's destination map expects it (docs/protocol.md §9.7).

    Raises:
        ValueError: The value is none of the accepted forms.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        # ValueError, not TypeError: pydantic turns only ValueError into a field error.
        raise ValueError("must be a port, 'host:port' or an absolute Unix socket path")  # noqa: TRY004
    text = str(value).strip()
    # ',' and '=' separate entries of the -d map: a target containing them would inject one.
    if any(ch in text for ch in ",= \t") or not text.isprintable():
        raise ValueError("must not contain ',', '=', spaces or control characters")
    if "/" in text:
        if not text.startswith("/"):
            raise ValueError("a Unix socket path must be absolute")
        return text
    host, sep, port = text.rpartition(":")
    if sep and not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{host!r} is not a valid host name or address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError("port must be an integer between 1 and 65535")
    return f"{host}:{int(port)}" if sep else str(int(port))


def parse_duration(value: object) -> object:
    """
    Accept ``"12h"``, ``"90m"``, ``"1h30m"``, ``"45s"`` besides what pydantic takes.

    Args:
        value: The raw setting value.

    Returns:
        A :class:`timedelta` for the compact form, else ``value`` unchanged
        (seconds as a number, ISO 8601 ``PT12H``: pydantic parses those).
    """
    if isinstance(value, str):
        text = value.strip().lower()
        parts = _DURATION_PART.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return timedelta(seconds=sum(float(n) * _DURATION_UNITS[u] for n, u in parts))
    return value


def _check_service_name(value: str) -> str:
    if not SERVICE_ID.fullmatch(value):
        raise ValueError(
            "a service name must match [a-zA-Z0-9_-]{1,128} (localproxy map ids cannot contain ':')"
        )
    return value


ServiceName = Annotated[str, AfterValidator(_check_service_name)]
ServiceTarget = Annotated[str, BeforeValidator(parse_service_target)]
Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class MqttSettings(_Section):
    """
    The MQTT connection to AWS IoT Core (or the emulator's broker).

    Required when the notification source is MQTT; ignored under Greengrass.
    """

    endpoint: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="AWS IoT Core data endpoint, host name only "
        "(aws iot describe-endpoint --endpoint-type iot:Data-ATS)",
    )
    port: int = Field(default=8883, ge=1, le=65535, description="MQTT port (mutual TLS), 1-65535")
    client_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="MQTT client id; unset: thing_name, which AWS IoT policies usually require",
    )
    cert: Path | None = Field(default=None, description="device certificate, PEM file")
    key: Path | None = Field(
        default=None,
        description="device private key, PEM file owned by the agent's user, mode 0600 or 0400",
    )
    ca: Path | None = Field(
        default=None,
        description="CA certificate(s) of the endpoint, PEM file, e.g. AmazonRootCA1.pem; "
        "unset: the system store",
    )
    http_proxy: SecretStr | None = Field(
        default=None,
        description="outbound web proxy http://[user:password@]host:port, also given to each "
        "local proxy; a secret: prefer the environment variable to the flag",
    )
    # Reconnection: exponential backoff with jitter from the minimum to the maximum delay,
    # back to the minimum once a connection lasted reconnect_reset_after seconds.
    min_reconnect_delay: float = Field(
        default=1.0,
        gt=0,
        le=300,
        description="first reconnection delay in seconds, (0, 300]; keep it >= 1 (AWS IoT "
        "accepts one CONNECT per second per client id)",
    )
    max_reconnect_delay: float = Field(
        default=20.0,
        gt=0,
        le=3600,
        description="longest reconnection delay in seconds, (0, 3600], >= the first",
    )
    reconnect_reset_after: float = Field(
        default=10.0,
        gt=0,
        le=3600,
        description="seconds a connection must last for the delay to start again from the "
        "first, (0, 3600]",
    )
    # Unacknowledged notifications the broker may have out at once (MQTT5 Receive Maximum).
    receive_maximum: int = Field(
        default=10,
        ge=1,
        le=100,
        description="notifications the broker may send before the agent acknowledged them "
        "(MQTT 5 Receive Maximum), 1-100",
    )

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not _HOSTNAME.fullmatch(value):
            raise ValueError("must be a host name or address, without scheme or port")
        return value

    @model_validator(mode="after")
    def _check_delays(self) -> Self:
        if self.max_reconnect_delay < self.min_reconnect_delay:
            raise ValueError("max_reconnect_delay must be >= min_reconnect_delay")
        return self

    @field_validator("http_proxy")
    @classmethod
    def _check_http_proxy(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.fullmatch(
            r"https?://[^\s/]+(:\d{1,5})?/?", value.get_secret_value()
        ):
            raise ValueError("must look like http://[user:password@]host:port")
        return value


class ProxySettings(_Section):
    """
    How the destination local proxy is started for each tunnel (docs/architecture.md §5.2).
    """

    binary: Literal["bundled"] | Path = Field(
        default="bundled",
        description="'bundled' (this package's tunnel-localproxy) or an absolute path to "
        "AWS localproxy",
    )
    launcher: bool = Field(
        default=True,
        description="start bundled proxies by forking one pre-initialised launcher process "
        "(a few MB and milliseconds per tunnel) instead of a new interpreter each",
    )
    merge_pages: bool = Field(
        default=True,
        description="offer the launcher's and its proxies' memory to the kernel's same-page "
        "merging (KSM), which shares their identical pages once ksmd runs "
        "(/sys/kernel/mm/ksm/run = 1): about 5 MB less per idle tunnel",
    )
    ca: Path | None = Field(
        default=None,
        description="CA file or directory for the data-plane TLS, localproxy -c; "
        "unset: the system store",
    )
    endpoint: str | None = Field(
        default=None,
        description="data-plane endpoint host[:port] instead of the notification's region, "
        "localproxy -e (the emulator)",
    )
    no_verify: bool = Field(
        default=False,
        description="skip data-plane TLS verification, localproxy -k; only with "
        "--proxy-endpoint (the emulator)",
    )
    extra_args: tuple[str, ...] = Field(
        default=(), description="extra localproxy flags; those the agent sets are refused"
    )
    extra_env: dict[str, SecretStr] = Field(
        default_factory=dict, description="extra environment for each local proxy (secrets)"
    )
    stop_grace: float = Field(
        default=2.0, gt=0, le=30, description="seconds between SIGTERM and SIGKILL, (0, 30]"
    )
    # A proxy with no connected line this long after its start (or a drop) is reported.
    connect_timeout: Duration = Field(
        default=timedelta(seconds=30),
        description="a proxy not connected this long after its start or a drop is reported "
        "(proxy_not_connected, status); 1s to 1h",
    )
    max_restarts: int = Field(
        default=5,
        ge=0,
        le=1000,
        description="restarts in a row of a failed proxy before its tunnel is dropped, 0-1000",
    )
    restart_backoff_initial: float = Field(
        default=1.0, gt=0, le=600, description="first restart delay in seconds, (0, 600]"
    )
    restart_backoff_max: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="longest restart delay in seconds, (0, 3600], >= the initial delay",
    )

    @field_validator("binary", mode="before")
    @classmethod
    def _check_binary(cls, value: object) -> object:
        if isinstance(value, str) and value != "bundled" and not value.startswith("/"):
            raise ValueError("must be 'bundled' or an absolute path to a localproxy binary")
        return value

    @field_validator("connect_timeout")
    @classmethod
    def _check_connect_timeout(cls, value: timedelta) -> timedelta:
        if not timedelta(seconds=1) <= value <= timedelta(hours=1):
            raise ValueError("must be between 1 second and 1 hour")
        return value

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.lower()
        if not _ENDPOINT.fullmatch(value):
            raise ValueError("must be host[:port] without scheme (localproxy -e)")
        return value

    @field_validator("extra_args")
    @classmethod
    def _check_extra_args(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for arg in value:
            if arg.split("=", 1)[0] in _RESERVED_ARGS:
                raise ValueError(f"{arg.split('=', 1)[0]!r} is set by the agent itself")
        return value

    @field_validator("extra_env")
    @classmethod
    def _check_extra_env(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        for name in value:
            if not _ENV_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid environment variable name")
            if name in _RESERVED_ENV:
                raise ValueError(f"{name} is set by the agent for each tunnel")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        # -k disables TLS verification: only acceptable against the local emulator.
        if self.no_verify and self.endpoint is None:
            raise ValueError("no_verify is only allowed with an endpoint override (the emulator)")
        if self.restart_backoff_max < self.restart_backoff_initial:
            raise ValueError("restart_backoff_max must be >= restart_backoff_initial")
        return self


class LoggingSettings(_Section):
    """
    Log level and format; ``auto`` means JSON unless stdout is a terminal.
    """

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="least severe level logged"
    )
    format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="json (one object per line, for journald), console (human), or auto: "
        "JSON unless stdout is a terminal",
    )

    @field_validator("level", "format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


class LimitsSettings(_Section):
    """
    Bounds on tunnels; reloaded on SIGHUP without touching running tunnels.
    """

    max_concurrent_tunnels: int = Field(
        default=10, ge=1, le=1000, description="most tunnels running at once, 1-1000"
    )
    max_tunnel_lifetime: Duration = Field(
        default=timedelta(hours=12),
        description="a tunnel's proxy is stopped this long after it started: 12h, 90m, 1h30m, "
        "45s, seconds, or ISO 8601 PT12H; 1 s to 7 days",
    )
    # What happens to a notification over the cap: "refuse_new" keeps running sessions
    # intact; "stop_oldest" favours the newest operator.
    on_limit: Literal["refuse_new", "stop_oldest"] = Field(
        default="refuse_new",
        description="a notification over the cap: refuse_new drops it, stop_oldest stops the "
        "oldest tunnel",
    )

    @field_validator("max_tunnel_lifetime")
    @classmethod
    def _check_lifetime(cls, value: timedelta) -> timedelta:
        if not timedelta(seconds=1) <= value <= timedelta(days=7):
            raise ValueError("must be between 1 second and 7 days")
        return value


class ReportSettings(_Section):
    """
    The agent's report to a named shadow of its thing (README, "Operate").
    """

    shadow: str = Field(
        default="tunnel-agent",
        description='named shadow the agent reports its health to; "" turns the report off',
    )

    @field_validator("shadow")
    @classmethod
    def _check_shadow(cls, value: str) -> str:
        # AWS IoT's shadow names: [a-zA-Z0-9:_-]{1,64}; the name goes into a topic.
        if value and not re.fullmatch(r"[a-zA-Z0-9:_-]{1,64}", value):
            raise ValueError('must match [a-zA-Z0-9:_-]{1,64}, or be "" to turn the report off')
        return value


class TunnelsSettings(_Section):
    """
    Whether live tunnels outlive the agent's process (restart, crash, reboot), and where.

    ``persist = false`` keeps access tokens in memory only: a restart then loses the tunnels.
    """

    persist: bool = True
    state_dir: Path | None = None

    @property
    def directory(self) -> Path:
        """
        Where tunnel records live: setting, ``$STATE_DIRECTORY`` (systemd), or ``/var/lib``.
        """
        if self.state_dir is not None:
            return self.state_dir
        # systemd may pass several directories separated by ':'; ours is the first.
        env = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        return Path(env) if env else DEFAULT_STATE_DIR


# TOML data for the current load_settings() call: the lowest-priority source.
_toml_data: ContextVar[Mapping[str, Any] | None] = ContextVar("_toml_data", default=None)


class AgentSettings(BaseSettings):
    """
    Every setting of the agent, frozen after validation.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
        validate_default=True,
    )

    thing_name: str = Field(description="the AWS IoT thing this device is, [a-zA-Z0-9:_-]{1,128}")
    notify: NotifyKind = Field(
        default="auto",
        description="where notifications come from: mqtt (own connection), greengrass "
        "(nucleus IPC), or auto: greengrass when the nucleus' IPC variables are set",
    )
    services: dict[ServiceName, ServiceTarget] = Field(
        default_factory=dict,
        description="services an operator may reach, name -> port, host:port or socket path; "
        "deny by default",
    )
    runtime_dir: Path | None = Field(
        default=None,
        description="directory of the status file; unset: $RUNTIME_DIRECTORY (systemd), else "
        "/run/iot-tunnel-agent",
    )
    mqtt: MqttSettings = MqttSettings()
    proxy: ProxySettings = ProxySettings()
    logging: LoggingSettings = LoggingSettings()
    limits: LimitsSettings = LimitsSettings()
    tunnels: TunnelsSettings = TunnelsSettings()
    report: ReportSettings = ReportSettings()

    @field_validator("thing_name")
    @classmethod
    def _check_thing_name(cls, value: str) -> str:
        if not THING_NAME.fullmatch(value):
            raise ValueError("must match [a-zA-Z0-9:_-]{1,128}")
        return value

    @model_validator(mode="after")
    def _check_mqtt_required(self) -> Self:
        if resolve_kind(self.notify) == "mqtt":
            missing = [
                f"mqtt.{n}" for n in ("endpoint", "cert", "key") if getattr(self.mqtt, n) is None
            ]
            if missing:
                raise ValueError(f"{', '.join(missing)} required for the MQTT notification source")
        return self

    @property
    def client_id(self) -> str:
        """
        The MQTT client id: the configured one, else the thing name.
        """
        return self.mqtt.client_id or self.thing_name

    @property
    def state_dir(self) -> Path:
        """
        Where the status file lives: setting, ``$RUNTIME_DIRECTORY`` (systemd), or ``/run``.
        """
        if self.runtime_dir is not None:
            return self.runtime_dir
        # systemd may pass several directories separated by ':'; ours is the first.
        env = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
        return Path(env) if env else DEFAULT_RUNTIME_DIR

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """
        Rank the sources: flags (init kwargs), then environment, then the TOML file.
        """
        return (
            init_settings,
            env_settings,
            InitSettingsSource(settings_cls, dict(_toml_data.get() or {})),
        )


def _default_missing() -> bool:
    """
    Whether the default config file is known to be absent (not merely unreadable).
    """
    try:
        DEFAULT_CONFIG_PATH.stat()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError as exc:
        raise ConfigError(f"config: {path}: no such file") from exc
    except PermissionError as exc:
        raise ConfigError(f"config: {path}: not readable by this user") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"config: {path}: is a directory") from exc
    except OSError as exc:
        raise ConfigError(f"config: {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path}: invalid TOML: {exc}") from exc


_SECRET_FIELDS = ("http_proxy", "extra_env")


def _describe(error: Mapping[str, Any]) -> str:
    loc = ".".join(str(part) for part in error["loc"]).replace(".[key]", " (name)") or "(settings)"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{loc}: required, not set"
    if error["type"] == "extra_forbidden":
        # Without its value: a misspelt http_proxy may carry a password.
        close = suggest_key(AgentSettings, error["loc"])
        return f"{loc}: unknown setting" + (f"; did you mean {close}?" if close else "")
    if any(part in _SECRET_FIELDS for part in error["loc"]):
        return f"{loc}: {message}"
    value = error.get("input")
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{loc} = {shown}: {message}"


def _variable(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + "__".join(str(part) for part in loc).upper()


def load_settings(
    config: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> AgentSettings:
    """
    Build the settings from the TOML file, the environment and flag overrides.

    Args:
        config: The TOML file; ``None`` uses the default path when it exists.
        overrides: Values from command-line flags (nested dicts for sections).

    Returns:
        The validated, frozen settings.

    Raises:
        ConfigError: One line per problem, each naming the field, value and reason.
    """
    absent = None
    if config is None:
        try:
            data = _read_toml(DEFAULT_CONFIG_PATH)
        except ConfigError:
            # No usable default file (absent, or /etc/iot-tunnel-agent is 0750 and we are not
            # in its group): say so precisely rather than run on defaults or a traceback.
            if not _default_missing():
                raise
            data, absent = {}, f"config: {DEFAULT_CONFIG_PATH}: no such file"
    else:
        data = _read_toml(config)
    lines = unknown_variables(
        AgentSettings, os.environ, prefix=ENV_PREFIX, delimiter="__", others=OTHER_VARIABLES
    )
    variables = {name.upper() for name in os.environ}
    token = _toml_data.set(data)
    try:
        settings = AgentSettings(**dict(overrides or {}))
    except ValidationError as exc:
        lines += [
            _describe(error)
            for error in exc.errors(include_url=False)
            # A misspelt TUNNEL_AGENT_MQTT__X also reaches pydantic as mqtt.x: named above.
            if not (error["type"] == "extra_forbidden" and _variable(error["loc"]) in variables)
        ]
    else:
        if not lines:
            return settings
    finally:
        _toml_data.reset(token)
    # Only worth saying when something is wrong: settings may come from the environment alone.
    where = f" in {config or DEFAULT_CONFIG_PATH}" if data else ""
    lines = [absent, *lines] if absent else lines
    raise ConfigError(f"invalid configuration{where}:\n  " + "\n  ".join(lines))


def _check_readable(problems: list[str], field: str, path: Path) -> bool:
    try:
        with path.open("rb"):
            pass
    except FileNotFoundError:
        problems.append(f"{field} = '{path}': file does not exist")
    except IsADirectoryError:
        problems.append(f"{field} = '{path}': is a directory, expected a file")
    except OSError as exc:
        problems.append(f"{field} = '{path}': not readable by this user ({exc.strerror})")
    else:
        return True
    return False


def _certificate_files(settings: AgentSettings) -> list[tuple[str, Path, bool]]:
    """(field, path, is a CA bundle) of the certificate files that are set."""
    files = [
        ("mqtt.cert", settings.mqtt.cert, False),
        ("mqtt.ca", settings.mqtt.ca, True),
        ("proxy.ca", settings.proxy.ca, True),
    ]
    # proxy.ca may also name a directory of CA files (localproxy -c): nothing to parse then.
    return [
        (f, p, ca) for f, p, ca in files if p is not None and not (f == "proxy.ca" and _is_dir(p))
    ]


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.stat().st_mode)
    except OSError:
        return False  # unreadable: _check_readable says so


def check_files(settings: AgentSettings) -> list[str]:
    """
    Check the files the settings point to, as the daemon's user.

    Certificates and the key are parsed (agent/daemon/credentials.py): empty or damaged
    PEM, or a key that is not the certificate's, is reported; their dates are not (see
    :func:`check_dates`).

    Args:
        settings: Validated settings.

    Returns:
        One ``field = value: why`` line per problem; empty when all is well.
    """
    problems: list[str] = []
    mqtt = settings.mqtt
    cert_ok = False
    for field, path, _ in _certificate_files(settings):
        if _check_readable(problems, field, path):
            found = certificate_problems(field, path)
            problems += found
            cert_ok = cert_ok or (field == "mqtt.cert" and not found)
    if mqtt.key is not None and _check_readable(problems, "mqtt.key", mqtt.key):
        mode = stat.S_IMODE(mqtt.key.stat().st_mode)
        # A private key readable by others defeats mutual TLS (chmod 0600 or 0400).
        if mode & 0o077:
            problems.append(
                f"mqtt.key = '{mqtt.key}': mode {mode:04o} lets group/others read the "
                "private key; chmod 600 it"
            )
        problems += key_problems("mqtt.key", mqtt.key, "mqtt.cert", mqtt.cert if cert_ok else None)
    binary = settings.proxy.binary
    if isinstance(binary, Path):
        if not binary.is_file():
            problems.append(f"proxy.binary = '{binary}': file does not exist")
        elif not os.access(binary, os.X_OK):
            problems.append(f"proxy.binary = '{binary}': not executable by this user")
    return problems


def check_dates(settings: AgentSettings, now: datetime | None = None) -> list[str]:
    """
    Check that the certificates are within their validity period.

    Args:
        settings: Validated settings.
        now: The time to check at; the current time by default.

    Returns:
        One line per certificate file outside its period (an unreadable or damaged file
        is :func:`check_files`' to report, not this one's).
    """
    now = now or datetime.now(UTC)
    problems: list[str] = []
    for field, path, bundle in _certificate_files(settings):
        with contextlib.suppress(OSError):
            problems += date_problems(field, path, now, bundle=bundle)
    return problems
