"""Tests for agent.cli: sub-commands, flags mirroring settings, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent import __version__
from agent.cli import main
from agent.daemon.status import StatusFile
from agent.daemon.tunnels import TunnelInfo
from agent.exceptions import EXIT_CONFIG


ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TUNNEL_AGENT_") or name == "RUNTIME_DIRECTORY":
            monkeypatch.delenv(name)


@pytest.fixture
def config(tmp_path):
    for name in ("cert.pem", "ca.pem", "key.pem"):
        (tmp_path / name).write_text("pem\n")
    (tmp_path / "key.pem").chmod(0o600)
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
        assert result.stderr == f"tunnel-agent: config file {tmp_path}/nope.toml: not found\n"

    def test_bad_service_flag(self, config, capsys):
        """A --service without '=' is a config error."""
        assert main(["check-config", "--config", str(config), "--service", "SSH"]) == EXIT_CONFIG
        assert "--service 'SSH': expected NAME=TARGET" in capsys.readouterr().err

    def test_run_refuses_bad_config(self, tmp_path):
        """`run` with an invalid configuration exits 78 before starting anything."""
        result = run_cli("run", "--config", str(tmp_path / "nope.toml"))

        assert result.returncode == 78


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

    def test_not_running(self, tmp_path, capsys):
        """No status file exits 1 with a hint."""
        code = main(["status", "--runtime-dir", str(tmp_path)])

        assert code == 1
        assert "is the agent running?" in capsys.readouterr().err


class TestLazy:
    def test_missing_module(self, capsys, monkeypatch):
        """A lazy sub-command whose module is absent exits 1 with a message, not a traceback."""
        monkeypatch.setitem(sys.modules, "agent.connect.command", None)

        code = main(["connect", "--help"])

        assert code == 1
        assert "'connect' is not available in this installation" in capsys.readouterr().err

    def test_dispatch(self, monkeypatch):
        """The remaining argv goes to the module's main()."""
        seen = []
        module = type(sys)("fake_operator")
        module.main = lambda argv: seen.append(argv) or 7
        monkeypatch.setitem(sys.modules, "agent.connect.command", module)

        assert main(["connect", "--thing", "dev-1"]) == 7
        assert seen == [["--thing", "dev-1"]]
