"""Tests for agent.cli: sub-commands, flags mirroring settings, exit codes."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent import __version__
from agent.cli import main
from agent.common import process
from agent.daemon.status import StatusFile
from agent.daemon.tunnels import TunnelInfo
from agent.exceptions import EXIT_CONFIG
from tests.certs import DAY, certificate, new_key, write_certificate, write_credentials, write_key


ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TUNNEL_AGENT_") or name == "RUNTIME_DIRECTORY":
            monkeypatch.delenv(name)


@pytest.fixture
def config(tmp_path):
    write_credentials(tmp_path)
    path = tmp_path / "config.toml"
    path.write_text(
        'thing_name = "dev-1"\nnotify = "mqtt"\n[services]\nSSH = 22\n'
        f'[mqtt]\nendpoint = "127.0.0.1"\ncert = "{tmp_path}/cert.pem"\n'
        f'key = "{tmp_path}/key.pem"\nca = "{tmp_path}/ca.pem"\n'
    )
    return path


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


class TestVersion:
    def test_version_flag(self):
        """`python -m agent --version` prints the version and exits 0."""
        result = run_cli("--version")

        assert result.returncode == 0
        assert result.stdout == f"tunnel-agent {__version__}\n"

    def test_version_command(self, capsys):
        """`tunnel-agent version` prints the same."""
        code = main(["version"])

        assert code == 0
        assert capsys.readouterr().out == f"tunnel-agent {__version__}\n"

    def test_usage_error(self):
        """An unknown sub-command or flag exits 2."""
        assert run_cli("frobnicate").returncode == 2
        assert run_cli("run", "--no-such-flag").returncode == 2


class TestCheckConfig:
    def test_ok(self, config, capsys):
        """A valid file exits 0 and summarises the effective settings."""
        code = main(["check-config", "--config", str(config)])
        out = capsys.readouterr().out

        assert code == 0
        assert out.startswith(f"configuration ok ({config})\n")
        assert "  services: SSH=22\n" in out
        assert "  mqtt: reconnect 1-20s (reset after 10s connected) receive_maximum=10\n" in out

    @pytest.mark.parametrize(
        ("run", "flags", "said"),
        [
            ("1", [], "  memory: proxies offered to same-page merging; ksmd runs\n"),
            ("0", [], "  memory: proxies offered to same-page merging, but ksmd is stopped"),
            (None, [], "  memory: this kernel has no same-page merging (KSM)\n"),
            ("1", ["--no-proxy-merge-pages"], "(proxy.merge_pages = false)\n"),
        ],
    )
    def test_says_whether_proxies_share_pages(
        self, config, capsys, monkeypatch, tmp_path, run, flags, said
    ):
        """The launcher's proxies and ksmd: what the operator needs to know to save memory."""
        run_file = tmp_path / "ksm-run"
        if run is not None:
            run_file.write_text(run + "\n")
        monkeypatch.setattr(process, "_KSM_RUN", str(run_file))

        code = main(["check-config", "--config", str(config), *flags])

        assert code == 0
        assert said in capsys.readouterr().out

    def test_flags_mirror_env(self, config, capsys, monkeypatch):
        """Flags override env, env overrides the file, for every setting."""
        monkeypatch.setenv("TUNNEL_AGENT_LIMITS__MAX_CONCURRENT_TUNNELS", "4")

        code = main(
            [
                "check-config",
                "--config",
                str(config),
                "--service",
                "HTTP=8080",
                "--limits-on-limit",
                "stop_oldest",
            ]
        )
        out = capsys.readouterr().out

        assert code == 0
        assert "  services: SSH=22, HTTP=8080\n" in out
        assert "max_concurrent_tunnels=4 " in out
        assert "on_limit=stop_oldest" in out

    def test_invalid_values(self, config, capsys):
        """Bad values exit 78 with one field = value: why line each."""
        code = main(
            ["check-config", "--config", str(config), "--mqtt-port", "0", "--service", "X=22,Y=23"]
        )
        err = capsys.readouterr().err

        assert code == EXIT_CONFIG
        assert "  mqtt.port = '0': Input should be greater than or equal to 1\n" in err
        assert (
            "  services.X = '22,Y=23': must not contain ',', '=', spaces or control characters\n"
            in err
        )

    def test_exposed_key(self, config, capsys):
        """A group-readable private key exits 78 and says how to fix it."""
        (config.parent / "key.pem").chmod(0o644)

        code = main(["check-config", "--config", str(config)])

        assert code == EXIT_CONFIG
        assert (
            "mode 0644 lets group/others read the private key; chmod 600 it"
            in capsys.readouterr().err
        )

    def test_missing_file_subprocess(self, tmp_path):
        """Through the real entry point a missing file exits 78 with its name."""
        result = run_cli("check-config", "--config", str(tmp_path / "nope.toml"))

        assert result.returncode == 78
        assert result.stderr == f"tunnel-agent: config: {tmp_path}/nope.toml: no such file\n"

    def test_bad_service_flag(self, config, capsys):
        """A --service without '=' is a config error."""
        assert main(["check-config", "--config", str(config), "--service", "SSH"]) == EXIT_CONFIG
        assert "--service 'SSH': expected NAME=TARGET" in capsys.readouterr().err

    def test_run_refuses_bad_config(self, tmp_path):
        """`run` with an invalid configuration exits 78 before starting anything."""
        result = run_cli("run", "--config", str(tmp_path / "nope.toml"))

        assert result.returncode == 78


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _empty_cert(d: Path) -> None:
    (d / "cert.pem").write_bytes(b"")


def _garbage_cert(d: Path) -> None:
    (d / "cert.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n"
    )


def _empty_ca(d: Path) -> None:
    (d / "ca.pem").write_bytes(b"")


def _garbage_key(d: Path) -> None:
    (d / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


def _other_key(d: Path) -> None:
    write_key(d / "key.pem")


def _expired(d: Path) -> None:
    key = write_key(d / "key.pem")
    cert = certificate(key, name="dev-1", not_before=now() - 9 * DAY, not_after=now() - DAY)
    write_certificate(d / "cert.pem", cert)


def _future(d: Path) -> None:
    key = write_key(d / "key.pem")
    cert = certificate(key, name="dev-1", not_before=now() + DAY, not_after=now() + 9 * DAY)
    write_certificate(d / "cert.pem", cert)


def _expired_ca(d: Path) -> None:
    ca = certificate(new_key(), name="Root", not_before=now() - 9 * DAY, not_after=now() - DAY)
    write_certificate(d / "ca.pem", ca)


class TestCheckConfigFiles:
    """Each damaged file gives exactly one `field = value: why` line and exit 78."""

    @pytest.mark.parametrize(
        ("damage", "line"),
        [
            (_empty_cert, "mqtt.cert = '{d}/cert.pem': empty file, expected a PEM certificate"),
            (
                _garbage_cert,
                "mqtt.cert = '{d}/cert.pem': not a valid PEM certificate (damaged or truncated)",
            ),
            (_empty_ca, "mqtt.ca = '{d}/ca.pem': empty file, expected a PEM certificate"),
            (
                _garbage_key,
                "mqtt.key = '{d}/key.pem': not a valid PEM private key (damaged or truncated)",
            ),
            (
                _other_key,
                (
                    "mqtt.key = '{d}/key.pem': does not belong to the certificate "
                    "mqtt.cert = '{d}/cert.pem'"
                ),
            ),
            (_expired, "mqtt.cert = '{d}/cert.pem': certificate expired on "),
            (_future, "mqtt.cert = '{d}/cert.pem': certificate not valid before "),
            (_expired_ca, "mqtt.ca = '{d}/ca.pem': certificate expired on "),
        ],
    )
    def test_one_line_each(self, config, capsys, damage, line):
        """The configuration passes, then one damaged file makes it fail with its line."""
        assert main(["check-config", "--config", str(config)]) == 0
        capsys.readouterr()
        damage(config.parent)

        code = main(["check-config", "--config", str(config)])
        lines = capsys.readouterr().err.splitlines()

        assert code == EXIT_CONFIG
        assert len(lines) == 2, lines
        assert lines[0] == "tunnel-agent: invalid configuration:"
        assert lines[1].startswith("  " + line.format(d=config.parent)), lines[1]

    def test_run_starts_despite_dates(self, config, monkeypatch, capsys):
        """`run` only warns about an expired certificate (the clock may be wrong at boot)."""
        from agent.daemon import lifecycle

        _expired(config.parent)
        started = []

        def build_daemon(settings, **_kwargs):
            started.append(settings.thing_name)
            raise ImportError("stop here")

        monkeypatch.setattr(lifecycle, "build_daemon", build_daemon)

        code = main(["run", "--config", str(config), "--logging-format", "json"])
        out = capsys.readouterr()

        assert started == ["dev-1"]
        assert code == 1
        event = json.loads(out.out.splitlines()[0])
        assert event["event"] == "certificate_not_valid_now"
        assert "certificate expired on" in event["problem"]

    def test_missing_default_config(self, monkeypatch, tmp_path, capsys):
        """Without --config and without the default file, the file is named as missing."""
        import agent.daemon.settings as settings_module

        monkeypatch.setattr(settings_module, "DEFAULT_CONFIG_PATH", tmp_path / "config.toml")

        code = main(["check-config"])
        err = capsys.readouterr().err

        assert code == EXIT_CONFIG
        assert err.splitlines()[1] == f"  config: {tmp_path}/config.toml: no such file"

    def test_misspelt_variable(self, config, monkeypatch, capsys):
        """A misspelt TUNNEL_AGENT_* variable fails check-config with a suggestion."""
        monkeypatch.setenv("TUNNEL_AGENT_MQTT_ENDPOINT", "elsewhere.example")

        code = main(["check-config", "--config", str(config)])

        assert code == EXIT_CONFIG
        assert capsys.readouterr().err.splitlines()[1] == (
            "  TUNNEL_AGENT_MQTT_ENDPOINT: not a setting variable; "
            "did you mean TUNNEL_AGENT_MQTT__ENDPOINT?"
        )

    def test_misspelt_key(self, config, capsys):
        """A misspelt key in the file fails check-config with a suggestion."""
        config.write_text(config.read_text().replace("endpoint =", "endpiont ="))

        code = main(["check-config", "--config", str(config)])
        err = capsys.readouterr().err

        assert code == EXIT_CONFIG
        assert "  mqtt.endpiont: unknown setting; did you mean mqtt.endpoint?\n" in err


class TestRunHelp:
    def test_every_flag_described(self, capsys):
        """`run --help` gives each setting flag a description, its default and its variable."""
        from agent.daemon.flags import setting_flags

        with pytest.raises(SystemExit):
            main(["run", "--help"])
        text = " ".join(capsys.readouterr().out.split()).split(" settings: ", 1)[1]

        flags = setting_flags()
        starts = [re.search(f" {flag.flag}[ ,]", text).start() for flag in flags]
        assert len(flags) >= 20
        assert starts == sorted(starts)
        for flag, start, end in zip(flags, starts, [*starts[1:], len(text)], strict=True):
            entry = text[start:end]
            assert f"env {flag.env})" in entry, entry
            assert "default: " in entry or "(required;" in entry, entry
            assert len(entry.split("(", 1)[0]) > 15, entry  # a description before the default

    def test_values_and_defaults(self, capsys):
        """Allowed values and defaults are the model's."""
        with pytest.raises(SystemExit):
            main(["run", "--help"])
        text = " ".join(capsys.readouterr().out.split())

        assert "--logging-level {debug,info,warning,error}" in text
        assert "--limits-on-limit {refuse_new,stop_oldest}" in text
        assert "--proxy-binary bundled|PATH" in text
        assert "(default: 8883; env TUNNEL_AGENT_MQTT__PORT)" in text
        assert "(default: 12h; env TUNNEL_AGENT_LIMITS__MAX_TUNNEL_LIFETIME)" in text
        assert "(default: off; env TUNNEL_AGENT_PROXY__NO_VERIFY)" in text
        assert "(required; env TUNNEL_AGENT_THING_NAME)" in text


class TestStatus:
    def test_table_and_json(self, tmp_path, capsys):
        """`status` renders the running agent's tunnels; --json prints the document."""
        info = TunnelInfo(
            key="ab12cd34",
            services=("SSH",),
            region="us-east-1",
            state="running",
            pid=4242,
            started_at=1.0,
            restarts=0,
            superseded=False,
        )
        StatusFile(tmp_path, thing_name="dev-1").write([info])

        table_code = main(["status", "--runtime-dir", str(tmp_path)])
        table = capsys.readouterr().out
        json_code = main(["status", "--runtime-dir", str(tmp_path), "--json"])
        document = json.loads(capsys.readouterr().out)

        assert (table_code, json_code) == (0, 0)
        assert "1 active tunnel(s)" in table
        assert "ab12cd34   SSH" in table
        assert document["tunnels"][0]["pid"] == 4242

    def test_runtime_dir_from_config(self, tmp_path, capsys):
        """Without --runtime-dir, the config file's runtime_dir is used."""
        StatusFile(tmp_path / "rt", thing_name="dev-1").write([])
        config = tmp_path / "c.toml"
        config.write_text(f'runtime_dir = "{tmp_path}/rt"\n')

        code = main(["status", "--config", str(config)])

        assert code == 0
        assert "0 active tunnel(s)" in capsys.readouterr().out

    def test_two_agents(self, tmp_path, capsys):
        """Two agents in one runtime directory: each is found by --thing or by its config."""
        StatusFile(tmp_path, thing_name="dev-1").write([])
        StatusFile(tmp_path, thing_name="dev-2").write([])
        config = tmp_path / "two.toml"
        config.write_text(f'thing_name = "dev-2"\nruntime_dir = "{tmp_path}"\n')

        ambiguous = main(["status", "--runtime-dir", str(tmp_path)])
        ambiguous_err = capsys.readouterr().err
        by_thing = main(["status", "--runtime-dir", str(tmp_path), "--thing", "dev-1", "--json"])
        by_thing_doc = json.loads(capsys.readouterr().out)
        by_config = main(["status", "--config", str(config), "--json"])
        by_config_doc = json.loads(capsys.readouterr().out)

        assert ambiguous == 1
        assert "2 agents run here (dev-1, dev-2): choose one with --thing NAME" in ambiguous_err
        assert (by_thing, by_thing_doc["thing_name"]) == (0, "dev-1")
        assert (by_config, by_config_doc["thing_name"]) == (0, "dev-2")

    def test_bad_thing_name(self, tmp_path, capsys):
        """--thing is a thing name, never a path."""
        code = main(["status", "--runtime-dir", str(tmp_path), "--thing", "../etc/passwd"])

        assert code == 1
        assert "must match [a-zA-Z0-9:_-]{1,128}" in capsys.readouterr().err

    def test_not_running(self, tmp_path, capsys):
        """No status file exits 1 with a hint."""
        code = main(["status", "--runtime-dir", str(tmp_path)])

        assert code == 1
        assert "is the agent running?" in capsys.readouterr().err


class TestLazy:
    @pytest.mark.parametrize(
        ("command", "blocked", "extra"),
        [
            ("connect", "boto3", "operator"),
            ("emulator", "aiohttp", "emulator"),
            ("emulator", "cryptography", "emulator"),
        ],
    )
    def test_missing_extra(self, capsys, monkeypatch, command, blocked, extra):
        """Without its extra, a sub-command prints one line naming the extra and exits 1."""
        monkeypatch.setitem(sys.modules, blocked, None)

        code = main([command, "--help"])
        captured = capsys.readouterr()

        assert code == 1
        assert captured.out == ""
        assert captured.err == (
            f"error: tunnel-agent {command} needs the [{extra}] extra: "
            f"pip install 'iot-tunnel-agent[{extra}]'\n"
        )

    def test_missing_module(self, capsys, monkeypatch):
        """A lazy sub-command whose own module is absent is reported the same way."""
        monkeypatch.setitem(sys.modules, "agent.connect.command", None)

        code = main(["connect", "--help"])

        assert code == 1
        assert "tunnel-agent connect needs the [operator] extra" in capsys.readouterr().err

    def test_other_import_error(self, capsys, monkeypatch):
        """An import failure that is not the extra's is shown as it is, not blamed on it."""

        def fail(_name):
            raise ImportError("libfoo.so: cannot open shared object file", name="libfoo")

        monkeypatch.setattr("importlib.import_module", fail)

        code = main(["connect", "--help"])

        assert code == 1
        assert capsys.readouterr().err == (
            "error: tunnel-agent connect: libfoo.so: cannot open shared object file\n"
        )

    def test_present_extra_runs(self, capsys):
        """With the extra installed, the sub-command itself answers."""
        with pytest.raises(SystemExit) as info:
            main(["connect", "--help"])

        assert info.value.code == 0
        assert "--endpoint-url" in capsys.readouterr().out

    def test_dispatch(self, monkeypatch):
        """The remaining argv goes to the module's main()."""
        seen = []
        module = type(sys)("fake_operator")
        module.main = lambda argv: seen.append(argv) or 7
        monkeypatch.setitem(sys.modules, "agent.connect.command", module)

        assert main(["connect", "--thing", "dev-1"]) == 7
        assert seen == [["--thing", "dev-1"]]
