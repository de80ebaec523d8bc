"""Tests for agent.daemon.settings: sources, validation messages and file checks."""

from __future__ import annotations

import json
import os
import pwd
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.daemon import settings as settings_module
from agent.daemon.settings import (
    AgentSettings,
    check_dates,
    check_files,
    load_settings,
    parse_duration,
    parse_service_target,
)
from agent.exceptions import ConfigError
from tests.certs import DAY, certificate, write_certificate, write_credentials, write_key


MINIMAL = """\
thing_name = "dev-1"
notify = "mqtt"
[mqtt]
endpoint = "iot.example.test"
cert = "{d}/cert.pem"
key = "{d}/key.pem"
ca = "{d}/ca.pem"
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TUNNEL_AGENT_") or name in ("RUNTIME_DIRECTORY", "SVCUID"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", raising=False)


@pytest.fixture
def files(tmp_path):
    """A device certificate, its key (0600) and its CA in tmp_path."""
    write_credentials(tmp_path)
    return tmp_path


def write_config(directory: Path, extra: str = "") -> Path:
    path = directory / "config.toml"
    path.write_text(MINIMAL.format(d=directory) + extra)
    return path


def error_of(path: Path | None, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, overrides)
    return str(info.value)


class TestDefaults:
    def test_minimal_file(self, files):
        """A minimal file yields the documented defaults."""
        settings = load_settings(write_config(files))

        assert settings.thing_name == "dev-1"
        assert settings.mqtt.port == 8883
        assert settings.client_id == "dev-1"
        assert settings.mqtt.min_reconnect_delay == 1.0
        assert settings.mqtt.max_reconnect_delay == 20.0
        assert settings.mqtt.reconnect_reset_after == 10.0
        assert settings.mqtt.receive_maximum == 10
        assert settings.services == {}
        assert settings.limits.max_concurrent_tunnels == 10
        assert settings.limits.max_tunnel_lifetime == timedelta(hours=12)
        assert settings.limits.on_limit == "refuse_new"
        assert settings.proxy.binary == "bundled"
        assert settings.proxy.no_verify is False
        assert settings.logging.level == "info"
        assert settings.logging.format == "auto"
        assert settings.notify == "mqtt"

    def test_frozen(self, files):
        """Settings cannot be changed after validation."""
        settings = load_settings(write_config(files))

        with pytest.raises(ValidationError):
            settings.thing_name = "other"  # type: ignore[misc]

    def test_state_dir_precedence(self, files, monkeypatch):
        """The runtime dir is the setting, else $RUNTIME_DIRECTORY's first entry, else /run."""
        path = write_config(files)
        default = load_settings(path).state_dir
        monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/a:/run/b")
        from_systemd = load_settings(path).state_dir
        configured = load_settings(path, {"runtime_dir": "/tmp/x"}).state_dir

        assert default == Path("/run/iot-tunnel-agent")
        assert from_systemd == Path("/run/a")
        assert configured == Path("/tmp/x")

    def test_tunnels_state_dir_precedence(self, files, monkeypatch):
        """Tunnel records: setting, then $STATE_DIRECTORY (systemd), then /var/lib."""
        path = write_config(files)
        monkeypatch.delenv("STATE_DIRECTORY", raising=False)
        default = load_settings(path).tunnels
        default_dir = default.directory
        monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/a:/var/lib/b")
        from_systemd = load_settings(path).tunnels.directory
        configured = load_settings(path, {"tunnels": {"state_dir": "/tmp/y"}}).tunnels.directory

        assert default.persist is True
        assert default_dir == Path("/var/lib/iot-tunnel-agent")
        assert from_systemd == Path("/var/lib/a")
        assert configured == Path("/tmp/y")

    def test_example_config_valid(self):
        """config/config.example.toml parses (its placeholder paths aside)."""
        example = Path(__file__).parents[2] / "config" / "config.example.toml"

        settings = load_settings(example)

        assert settings.thing_name == "my-device"
        assert settings.services == {"SSH": "22", "HTTP": "127.0.0.1:8080"}
        assert settings.mqtt.port == 8883

    def test_example_documents_every_field(self):
        """Every setting appears in config/config.example.toml (set or commented out)."""
        example = (Path(__file__).parents[2] / "config" / "config.example.toml").read_text()
        sections = {"mqtt", "proxy", "logging", "limits", "tunnels", "report"}
        missing = []
        for name, info in AgentSettings.model_fields.items():
            fields = info.annotation.model_fields if name in sections else {name: None}
            tables = {"extra_env", "services"}
            missing += [f for f in fields if f not in tables and f"{f} = " not in example]

        assert missing == []
        assert "[proxy.extra_env]" in example
        assert "[services]" in example


class TestSources:
    def test_env_overrides_file(self, files, monkeypatch):
        """TUNNEL_AGENT_* variables (nested with __) override the TOML file."""
        monkeypatch.setenv("TUNNEL_AGENT_MQTT__PORT", "1883")
        monkeypatch.setenv("TUNNEL_AGENT_LIMITS__MAX_TUNNEL_LIFETIME", "90m")

        settings = load_settings(write_config(files))

        assert settings.mqtt.port == 1883
        assert settings.mqtt.endpoint == "iot.example.test"
        assert settings.limits.max_tunnel_lifetime == timedelta(minutes=90)

    def test_flags_override_env(self, files, monkeypatch):
        """Flag overrides win over the environment."""
        monkeypatch.setenv("TUNNEL_AGENT_MQTT__PORT", "1883")

        settings = load_settings(write_config(files), {"mqtt": {"port": "8884"}})

        assert settings.mqtt.port == 8884

    def test_services_merge(self, files, monkeypatch):
        """Services from env (JSON) and flags add to the file's map, names keep their case."""
        monkeypatch.setenv("TUNNEL_AGENT_SERVICES", '{"Web": 9000}')
        path = write_config(files, '[services]\nSSH = 22\nDB = "/run/db.sock"\n')

        settings = load_settings(path, {"services": {"HTTP": "10.0.0.2:80"}})

        assert settings.services == {
            "SSH": "22",
            "DB": "/run/db.sock",
            "Web": "9000",
            "HTTP": "10.0.0.2:80",
        }

    def test_greengrass_needs_no_mqtt(self, tmp_path):
        """Under Greengrass the MQTT endpoint and certificates are not required."""
        path = tmp_path / "c.toml"
        path.write_text('thing_name = "dev-1"\nnotify = "greengrass"\n')

        settings = load_settings(path)

        assert settings.mqtt.endpoint is None

    def test_auto_uses_greengrass_env(self, tmp_path, monkeypatch):
        """notify=auto needs no MQTT settings when the nucleus IPC variables are set."""
        monkeypatch.setenv("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", "/x")
        monkeypatch.setenv("SVCUID", "abc")
        path = tmp_path / "c.toml"
        path.write_text('thing_name = "dev-1"\n')

        assert load_settings(path).notify == "auto"


class TestErrors:
    def test_unusable_default_path_is_a_config_error(self, tmp_path, monkeypatch):
        """A default path that cannot be read (here: its parent is a file) is a ConfigError."""
        blocker = tmp_path / "etc"
        blocker.write_text("")
        monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", blocker / "config.toml")

        with pytest.raises(ConfigError, match=r"config: .*/etc/config.toml: Not a directory"):
            load_settings(None)

    def test_absent_default_path_uses_defaults(self, tmp_path, monkeypatch):
        """No default file is not an error by itself: the environment may hold everything."""
        monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", tmp_path / "none.toml")
        monkeypatch.setenv("TUNNEL_AGENT_THING_NAME", "dev-9")
        monkeypatch.setenv("TUNNEL_AGENT_NOTIFY", "greengrass")

        assert load_settings(None).thing_name == "dev-9"

    def test_absent_default_path_named_when_incomplete(self, tmp_path, monkeypatch):
        """When settings are missing, the absent default file is named first, as such."""
        monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", tmp_path / "none.toml")

        assert error_of(None) == (
            "invalid configuration:\n"
            f"  config: {tmp_path}/none.toml: no such file\n"
            "  thing_name: required, not set"
        )

    def test_missing_file(self, tmp_path):
        """A named file that does not exist is a config error naming it."""
        assert error_of(tmp_path / "nope.toml") == f"config: {tmp_path}/nope.toml: no such file"

    def test_bad_toml(self, tmp_path):
        """A TOML syntax error names the file and the position."""
        path = tmp_path / "c.toml"
        path.write_text("thing_name = \n")

        message = error_of(path)

        assert message.startswith(f"config: {path}: invalid TOML: ")
        assert "line 1" in message

    def test_field_value_why(self, files):
        """Each problem is one line: field = value: why."""
        path = write_config(
            files, "[limits]\nmax_concurrent_tunnels = 0\n[services]\nSSH = 70000\n"
        )

        message = error_of(path, {"mqtt": {"port": "99999"}})

        assert f"invalid configuration in {path}:" in message
        assert "  mqtt.port = '99999': Input should be less than or equal to 65535" in message
        assert (
            "  limits.max_concurrent_tunnels = 0: Input should be greater than or equal to 1"
            in message
        )
        assert "  services.SSH = 70000: port must be an integer between 1 and 65535" in message

    def test_missing_thing_name(self, tmp_path):
        """A missing thing name is reported as required."""
        path = tmp_path / "c.toml"
        path.write_text('notify = "mqtt"\n')

        assert (
            error_of(path) == f"invalid configuration in {path}:\n  thing_name: required, not set"
        )

    def test_missing_mqtt(self, tmp_path):
        """With the MQTT source, a missing endpoint, cert and key are reported together."""
        path = tmp_path / "c.toml"
        path.write_text('thing_name = "dev-1"\nnotify = "mqtt"\n')

        message = error_of(path)

        assert (
            "mqtt.endpoint, mqtt.cert, mqtt.key required for the MQTT notification source"
            in message
        )

    def test_unknown_key(self, files):
        """A misspelt key is refused rather than silently ignored, with the closest name."""
        path = files / "c.toml"
        path.write_text(
            'max_tunnels = 3\nthing_name = "d"\nnotify = "greengrass"\n[mqtt]\nprot = 1\n'
            "[limits]\nmax_concurrent_tunnel = 2\n"
        )

        message = error_of(path)

        assert message.splitlines()[1:] == [
            "  mqtt.prot: unknown setting; did you mean mqtt.port?",
            (
                "  limits.max_concurrent_tunnel: unknown setting; did you mean "
                "limits.max_concurrent_tunnels?"
            ),
            (
                "  max_tunnels: unknown setting; did you mean limits.max_tunnel_lifetime or "
                "limits.max_concurrent_tunnels?"
            ),
        ]

    def test_misplaced_key(self, files):
        """A key in the wrong section is pointed to the section that has it."""
        path = files / "c.toml"
        path.write_text('thing_name = "d"\nnotify = "greengrass"\nendpoint = "x"\n')

        assert "  endpoint: unknown setting; did you mean mqtt.endpoint?" in error_of(path)

    def test_unknown_key_without_suggestion(self, files):
        """Nothing close: the key is still named, without a guess."""
        path = files / "c.toml"
        path.write_text('thing_name = "d"\nnotify = "greengrass"\nzzz = 1\n')

        assert error_of(path).splitlines()[1] == "  zzz: unknown setting"

    def test_service_name_with_colon(self, files):
        """A service name with ':' is refused: localproxy map ids cannot hold it."""
        message = error_of(write_config(files, '[services]\n"a:b" = 22\n'))

        assert (
            "services.a:b (name) = 'a:b': a service name must match [a-zA-Z0-9_-]{1,128}" in message
        )

    def test_secret_value_not_echoed(self, files):
        """A bad http_proxy (may hold a password) is reported without its value."""
        message = error_of(write_config(files), {"mqtt": {"http_proxy": "ftp://user:hunter2@x"}})

        assert "mqtt.http_proxy: must look like http://[user:password@]host:port" in message
        assert "hunter2" not in message

    def test_no_verify_needs_endpoint(self, files):
        """-k is only allowed together with an endpoint override (the emulator)."""
        message = error_of(write_config(files, "[proxy]\nno_verify = true\n"))

        assert "no_verify is only allowed with an endpoint override" in message

    @pytest.mark.parametrize(
        ("proxy", "expected"),
        [
            ('binary = "localproxy"', "must be 'bundled' or an absolute path"),
            ('endpoint = "https://relay:443"', "must be host[:port] without scheme"),
            ('extra_args = ["-t", "x"]', "'-t' is set by the agent itself"),
            ('extra_args = ["--region=us-east-1"]', "'--region' is set by the agent itself"),
            ('extra_env = {AWSIOT_TUNNEL_ACCESS_TOKEN = "x"}', "set by the agent for each tunnel"),
            (
                'extra_env = {"BAD NAME" = "x"}',
                "'BAD NAME' is not a valid environment variable name",
            ),
            (
                "restart_backoff_initial = 10\nrestart_backoff_max = 5",
                "restart_backoff_max must be >=",
            ),
        ],
    )
    def test_proxy_section(self, files, proxy, expected):
        """Proxy settings that would change the tunnel's shape or leak a token are refused."""
        assert expected in error_of(write_config(files, f"[proxy]\n{proxy}\n"))

    @pytest.mark.parametrize(
        ("mqtt", "expected"),
        [
            ("min_reconnect_delay = 5\nmax_reconnect_delay = 2", "max_reconnect_delay must be >="),
            ("min_reconnect_delay = 0", "mqtt.min_reconnect_delay = 0"),
            ("reconnect_reset_after = 0", "mqtt.reconnect_reset_after = 0"),
            ("receive_maximum = 0", "mqtt.receive_maximum = 0"),
            ("receive_maximum = 101", "mqtt.receive_maximum = 101"),
        ],
    )
    def test_mqtt_flow_settings(self, files, mqtt, expected):
        """Reconnect delays must be ordered and positive; Receive Maximum is 1..100."""
        path = files / "config.toml"
        path.write_text(MINIMAL.format(d=files) + mqtt + "\n")

        assert expected in error_of(path)

    @pytest.mark.parametrize("value", ['"0s"', '"8d"', '"soon"', "-1"])
    def test_lifetime_bounds(self, files, value):
        """The tunnel lifetime must be a duration between 1 s and 7 days."""
        assert "limits.max_tunnel_lifetime" in error_of(
            write_config(files, f"[limits]\nmax_tunnel_lifetime = {value}\n")
        )


class TestServiceTarget:
    @pytest.mark.parametrize(
        ("value", "expected"),
        [
            (22, "22"),
            ("22", "22"),
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("db.local:5432", "db.local:5432"),
            ("[::1]:22", "[::1]:22"),
            ("/run/app.sock", "/run/app.sock"),
        ],
    )
    def test_accepted(self, value, expected):
        """Ports, host:port and absolute socket paths become localproxy -d targets."""
        assert parse_service_target(value) == expected

    @pytest.mark.parametrize(
        "value",
        [
            0,
            65536,
            True,
            1.5,
            "",
            "ssh",
            "a:b:c",
            "host:",
            "run/app.sock",
            "22,EVIL=23",
            "a=b",
            "x y:1",
        ],
    )
    def test_refused(self, value):
        """Anything else, notably values that would inject a map entry, is refused."""
        with pytest.raises(ValueError):
            parse_service_target(value)


class TestDuration:
    @pytest.mark.parametrize(
        ("value", "seconds"),
        [("12h", 43200), ("90m", 5400), ("1h30m", 5400), ("45s", 45), ("1d", 86400)],
    )
    def test_compact(self, value, seconds):
        """Compact durations become timedeltas."""
        assert parse_duration(value) == timedelta(seconds=seconds)

    def test_passthrough(self):
        """Other values are left for pydantic (seconds, ISO 8601)."""
        assert parse_duration("PT12H") == "PT12H"
        assert parse_duration(30) == 30


class TestUnknownVariables:
    @pytest.mark.parametrize(
        ("variable", "line"),
        [
            (
                "TUNNEL_AGENT_MQTT_PORT",
                (
                    "TUNNEL_AGENT_MQTT_PORT: not a setting variable; "
                    "did you mean TUNNEL_AGENT_MQTT__PORT?"
                ),
            ),
            (
                "TUNNEL_AGENT_LIMITS__MAX_TUNNELS",
                (
                    "TUNNEL_AGENT_LIMITS__MAX_TUNNELS: not a setting variable; "
                    "did you mean TUNNEL_AGENT_LIMITS__MAX_TUNNEL_LIFETIME?"
                ),
            ),
            ("TUNNEL_AGENT_XYZZY", "TUNNEL_AGENT_XYZZY: not a setting variable"),
        ],
    )
    def test_misspelt_variable(self, files, monkeypatch, variable, line):
        """A TUNNEL_AGENT_* variable that names no setting is refused, with a suggestion."""
        monkeypatch.setenv(variable, "1")
        path = write_config(files)

        assert error_of(path) == f"invalid configuration in {path}:\n  {line}"

    def test_value_not_shown(self, files, monkeypatch):
        """The variable's value may be a secret: it is never part of the message."""
        monkeypatch.setenv("TUNNEL_AGENT_MQTT__HTTP_PROXYY", "http://user:s3cret@proxy:3128")

        message = error_of(write_config(files))

        assert "TUNNEL_AGENT_MQTT__HTTP_PROXYY: not a setting variable" in message
        assert "s3cret" not in message

    def test_known_variables_pass(self, files, monkeypatch):
        """Settings, mapping entries, sections as JSON and the non-setting variables pass."""
        for name, value in {
            "TUNNEL_AGENT_MQTT__PORT": "1883",
            "tunnel_agent_logging__level": "debug",
            "TUNNEL_AGENT_SERVICES__WEB": "9000",
            "TUNNEL_AGENT_PROXY__EXTRA_ENV__HTTPS_PROXY": "http://p:3128",
            "TUNNEL_AGENT_LIMITS": '{"max_concurrent_tunnels": 3}',
            "TUNNEL_AGENT_CONFIG": "/nowhere.toml",
            "TUNNEL_AGENT_EVENT_LOOP": "asyncio",
        }.items():
            monkeypatch.setenv(name, value)

        settings = load_settings(write_config(files))

        assert settings.mqtt.port == 1883
        assert settings.logging.level == "debug"
        assert settings.services == {"web": "9000"}
        assert settings.limits.max_concurrent_tunnels == 3


class TestCheckFiles:
    def test_all_good(self, files):
        """Readable certificate files and a 0600 key raise no problem."""
        assert check_files(load_settings(write_config(files))) == []

    def test_missing_files(self, tmp_path):
        """Missing certificate, key and CA files are each reported."""
        problems = check_files(load_settings(write_config(tmp_path)))

        assert problems == [
            f"mqtt.cert = '{tmp_path}/cert.pem': file does not exist",
            f"mqtt.ca = '{tmp_path}/ca.pem': file does not exist",
            f"mqtt.key = '{tmp_path}/key.pem': file does not exist",
        ]

    @pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
    def test_exposed_key(self, files, mode):
        """A private key readable by group or others is reported with its mode."""
        (files / "key.pem").chmod(mode)

        problems = check_files(load_settings(write_config(files)))

        assert problems == [
            (
                f"mqtt.key = '{files}/key.pem': mode {mode:04o} lets group/others read the "
                "private key; chmod 600 it"
            )
        ]

    def test_unreadable_key(self, files):
        """A key the agent's user cannot read is reported, and check-config exits 78."""
        if os.geteuid() != 0:
            (files / "key.pem").chmod(0o000)
            problems = check_files(load_settings(write_config(files)))

            assert problems == [
                f"mqtt.key = '{files}/key.pem': not readable by this user (Permission denied)"
            ]
            return
        # Root reads any file: check in a forked child that became an unprivileged user.
        nobody = pwd.getpwnam("nobody")
        config = write_config(files)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            try:
                settings = load_settings(config)
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                os.write(write_end, json.dumps(check_files(settings)).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            problems = json.loads(pipe.read() or b"null")
        os.waitpid(pid, 0)

        assert f"mqtt.key = '{files}/key.pem': not readable by this user (Permission denied)" in (
            problems
        )

    def test_damaged_certificate_and_foreign_key(self, files):
        """check_files parses the files: a damaged CA and a key that is not the cert's."""
        (files / "ca.pem").write_text("not a certificate\n")
        write_key(files / "key.pem")

        problems = check_files(load_settings(write_config(files)))

        assert problems == [
            (
                f"mqtt.ca = '{files}/ca.pem': no PEM certificate (-----BEGIN CERTIFICATE-----) "
                "in the file"
            ),
            (
                f"mqtt.key = '{files}/key.pem': does not belong to the certificate "
                f"mqtt.cert = '{files}/cert.pem'"
            ),
        ]

    def test_dates_are_a_check_of_their_own(self, files):
        """An expired certificate is check_dates' to report, not check_files'."""
        now = datetime.now(UTC)
        key = write_key(files / "key.pem")
        cert = certificate(key, name="dev-1", not_before=now - 9 * DAY, not_after=now - DAY)
        write_certificate(files / "cert.pem", cert)
        settings = load_settings(write_config(files))

        assert check_files(settings) == []
        assert check_dates(settings, now) == [
            f"mqtt.cert = '{files}/cert.pem': certificate expired on {now - DAY:%Y-%m-%d %H:%M} UTC"
        ]

    def test_proxy_ca_directory(self, files):
        """proxy.ca may be a directory (localproxy -c): nothing to parse in it."""
        settings = load_settings(write_config(files), {"proxy": {"ca": str(files)}})

        assert check_files(settings) == []

    def test_proxy_binary(self, files):
        """A proxy binary path must exist and be executable."""
        binary = files / "localproxy"
        missing = check_files(
            load_settings(write_config(files), {"proxy": {"binary": str(binary)}})
        )
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o644)
        not_exec = check_files(
            load_settings(write_config(files), {"proxy": {"binary": str(binary)}})
        )

        assert missing == [f"proxy.binary = '{binary}': file does not exist"]
        if os.geteuid() != 0:
            assert not_exec == [f"proxy.binary = '{binary}': not executable by this user"]

    def test_settings_model_direct(self, monkeypatch):
        """AgentSettings reads the environment by itself (no file)."""
        monkeypatch.setenv("TUNNEL_AGENT_THING_NAME", "dev-9")
        monkeypatch.setenv("TUNNEL_AGENT_NOTIFY", "greengrass")

        assert AgentSettings().thing_name == "dev-9"  # type: ignore[call-arg]
