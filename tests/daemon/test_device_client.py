"""
Tests for `tunnel-agent import-device-client` on real AWS IoT Device Client configuration files.

The files in tests/data/device-client/ are shaped like the Device Client's own (its
config-template.json keys, the setup script's paths). Each imported configuration is then
given real certificate files where the printed commands would put them, and must pass
`tunnel-agent check-config`.
"""

from __future__ import annotations

import io
import os
import shutil
import tomllib
from pathlib import Path

import pytest

from agent.cli import main
from agent.daemon.device_client import read_device_client_config
from agent.exceptions import EXIT_CONFIG, ConfigError
from tests.certs import write_credentials


DATA = Path(__file__).parent.parent / "data" / "device-client"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TUNNEL_AGENT_"):
            monkeypatch.delenv(name)


def place(source: Path, certs: Path) -> None:
    """Do what the printed commands do, as this user: copy each file with its mode."""
    config = read_device_client_config(source)
    certs.mkdir(parents=True, exist_ok=True)
    for copy in config.copies(certs):
        shutil.copyfile(copy.source, copy.target)
        copy.target.chmod(copy.mode)


def check_config(path: Path, capsys) -> tuple[int, str]:
    code = main(["check-config", "--config", str(path)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


class TestFull:
    def test_imports_and_checks(self, tmp_path, capsys):
        """Every value the agent needs is carried over; the result passes check-config."""
        out, certs = tmp_path / "config.toml", tmp_path / "certs"

        code = main(
            [
                "import-device-client",
                str(DATA / "full.json"),
                "--output",
                str(out),
                "--certs-dir",
                str(certs),
                "--yes",
            ]
        )
        report = capsys.readouterr().out
        written = tomllib.loads(out.read_text())
        write_credentials(
            certs,
            thing="pump-station-7",
            names=("device.pem.crt", "private.pem.key", "AmazonRootCA1.pem"),
        )
        checked, text = check_config(out, capsys)

        assert code == 0
        assert report.startswith(
            f"wrote {out} for thing pump-station-7\nservices: SSH=22, VNC=5900\n"
        )
        assert written == {
            "thing_name": "pump-station-7",
            "notify": "mqtt",
            "services": {"SSH": 22, "VNC": 5900},
            "mqtt": {
                "endpoint": "a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com",
                "cert": f"{certs}/device.pem.crt",
                "key": f"{certs}/private.pem.key",
                "ca": f"{certs}/AmazonRootCA1.pem",
            },
            "proxy": {"endpoint": "data.tunneling.iot.eu-west-1.amazonaws.com"},
            "logging": {"level": "debug"},
        }
        assert out.stat().st_mode & 0o777 == 0o644
        assert (checked, text.splitlines()[0]) == (0, f"configuration ok ({out})"), text
        assert "  services: SSH=22, VNC=5900" in text

    def test_reports_what_stays_behind(self, tmp_path, capsys):
        """Other features, log files and the key's ownership are each spelled out."""
        certs = tmp_path / "certs"

        code = main(["import-device-client", str(DATA / "full.json"), "--certs-dir", str(certs)])
        captured = capsys.readouterr()
        report = captured.err.splitlines()

        assert code == 0
        assert tomllib.loads(captured.out)["services"] == {}
        for line in [
            (
                "  - jobs (enabled): AWS IoT Jobs, not part of this agent; keep the Device Client "
                "for it"
            ),
            (
                "  - device-defender (enabled): Device Defender metrics, not part of this agent; "
                "keep the Device Client for it"
            ),
            "  - fleet-provisioning (disabled): fleet provisioning, not part of this agent",
            "  - clean-session: not read by the Device Client either, ignored",
            f"  sudo install -d -o root -g iot-tunnel-agent -m 0750 {certs}",
            (
                "  sudo install -o root -g iot-tunnel-agent -m 0644 "
                f"/etc/aws-iot-device-client/certs/device.pem.crt {certs}/device.pem.crt"
            ),
            (
                "  sudo install -o iot-tunnel-agent -g iot-tunnel-agent -m 0600 "
                f"/etc/aws-iot-device-client/certs/private.pem.key {certs}/private.pem.key"
            ),
        ]:
            assert line in report, "\n".join(report)
        assert any(line.startswith("  - logging (enable-sdk-logging, file,") for line in report)
        assert any("SSH on port 22 and VNC on port 5900 for any tunnel" in x for x in report)
        assert any("requires its key owned by its own user (iot-tunnel-agent)" in x for x in report)
        # The key is installed last, after the directory and the public files.
        installs = [line for line in report if line.startswith("  sudo install")]
        assert installs[-1].endswith(f"{certs}/private.pem.key")


class TestRelativePaths:
    def test_resolved_against_the_file(self, tmp_path, capsys, monkeypatch):
        """Relative paths are anchored at the file's directory, '~' at this user's home."""
        home, directory = tmp_path / "home", tmp_path / "dc"
        monkeypatch.setenv("HOME", str(home))
        directory.mkdir()
        source = directory / "aws-iot-device-client.conf"
        shutil.copyfile(DATA / "relative-paths.json", source)
        # The Device Client's files, where its configuration says they are.
        write_credentials(
            directory / "certs",
            thing="lab-gateway_02",
            names=("device.pem.crt", "private.pem.key", "unused-ca.pem"),
        )
        write_credentials(
            home / ".aws-iot-device-client" / "certs",
            names=("unused.crt", "unused.key", "AmazonRootCA1.pem"),
        )
        shutil.copyfile(  # the CA that signed the device certificate
            directory / "certs" / "unused-ca.pem",
            home / ".aws-iot-device-client" / "certs" / "AmazonRootCA1.pem",
        )
        out, certs = tmp_path / "config.toml", tmp_path / "agent-certs"

        code = main(
            ["import-device-client", str(source), "--output", str(out), "--certs-dir", str(certs)]
        )
        report = capsys.readouterr().out
        place(source, certs)
        checked, text = check_config(out, capsys)

        assert code == 0
        assert (
            "  - cert: relative path 'certs/device.pem.crt' taken relative to the configuration "
            f"file's directory: {directory}/certs/device.pem.crt (the Device Client resolved it "
            "against its working directory)"
        ) in report.splitlines()
        assert (
            "  - root-ca: '~' in '~/.aws-iot-device-client/certs/AmazonRootCA1.pem' expanded for "
            f"this user to {home}/.aws-iot-device-client/certs/AmazonRootCA1.pem"
        ) in report.splitlines()
        assert (checked, text.splitlines()[0]) == (0, f"configuration ok ({out})"), text
        assert "  services: (none: every notification will be refused)" in text

    def test_unset_variable(self, tmp_path):
        """A $VARIABLE the importer cannot expand is refused, not guessed."""
        source = tmp_path / "dc.json"
        source.write_text(
            (DATA / "full.json").read_text().replace("/etc/aws-iot-device-client", "$DC_NOT_SET")
        )

        with pytest.raises(ConfigError) as info:
            read_device_client_config(source)

        assert str(info.value).splitlines()[1:] == [
            f"  {key} = '$DC_NOT_SET/certs/{name}': uses an environment variable that is not "
            f"set here: '$DC_NOT_SET/certs/{name}'"
            for key, name in (
                ("cert", "device.pem.crt"),
                ("key", "private.pem.key"),
                ("root-ca", "AmazonRootCA1.pem"),
            )
        ]


class TestMissingFields:
    def test_one_line_each_and_exit_78(self, tmp_path, capsys):
        """Each missing value is named with what it is; nothing is written."""
        out = tmp_path / "config.toml"

        code = main(
            ["import-device-client", str(DATA / "missing-fields.json"), "--output", str(out)]
        )
        err = capsys.readouterr().err

        assert code == EXIT_CONFIG
        assert not out.exists()
        assert err.splitlines() == [
            f"tunnel-agent: cannot import {DATA / 'missing-fields.json'}:",
            "  cert: required, not set (the device certificate file; becomes mqtt.cert)",
            "  key: required, not set (the private key file; becomes mqtt.key)",
            "  thing-name: required, not set (the thing this device is; becomes thing_name)",
            (
                "  fleet-provisioning is enabled: the certificate, key and thing name it obtained "
                "are in the Device Client's runtime configuration "
                "(aws-iot-device-client-runtime.conf)"
            ),
        ]

    @pytest.mark.parametrize(
        ("content", "line"),
        [
            ("{", "not JSON: Expecting property name enclosed in double quotes"),
            ("[1, 2]", "not a JSON object"),
        ],
    )
    def test_not_a_configuration(self, tmp_path, capsys, content, line):
        """A file that is not a JSON object is one line and exit 78."""
        source = tmp_path / "dc.json"
        source.write_text(content)

        code = main(["import-device-client", str(source)])

        assert code == EXIT_CONFIG
        assert capsys.readouterr().err.startswith(
            f"tunnel-agent: device client config: {source}: {line}"
        )

    def test_invalid_values(self, tmp_path, capsys):
        """A thing name or endpoint this agent would refuse is refused at import."""
        source = tmp_path / "dc.json"
        source.write_text(
            (DATA / "full.json")
            .read_text()
            .replace('"pump-station-7"', '"pump station 7"')
            .replace('"a1b2c3d4e5f6g7-ats', '"mqtts://a1b2c3d4e5f6g7-ats')
        )

        code = main(["import-device-client", str(source)])

        assert code == EXIT_CONFIG
        assert capsys.readouterr().err.splitlines()[1:] == [
            "  thing-name = 'pump station 7': must match [a-zA-Z0-9:_-]{1,128}",
            (
                "  endpoint = 'mqtts://a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com': must be a "
                "host name, without scheme or port"
            ),
        ]


class TestTunnelingDisabled:
    def test_nothing_implied(self, tmp_path, capsys):
        """With the Device Client's tunneling off, --yes implies no service; it is said."""
        code = main(["import-device-client", str(DATA / "tunneling-disabled.json"), "--yes"])
        captured = capsys.readouterr()

        assert code == 0
        assert tomllib.loads(captured.out)["services"] == {}
        assert (
            "  - tunneling: disabled in the Device Client; this agent serves tunnels, so check "
            "that this is the device you mean to migrate"
        ) in captured.err.splitlines()
        assert not any(line.startswith("services:") for line in captured.err.splitlines())

    def test_explicit_services(self, tmp_path, capsys):
        """--service entries are written as given, ports as numbers."""
        out, certs = tmp_path / "config.toml", tmp_path / "certs"

        code = main(
            [
                "import-device-client",
                str(DATA / "tunneling-disabled.json"),
                "--service",
                "SSH=2222",
                "--service",
                "WEB=127.0.0.1:8080",
                "--output",
                str(out),
                "--certs-dir",
                str(certs),
            ]
        )
        capsys.readouterr()
        write_credentials(
            certs,
            thing="kiosk-114",
            names=("device.pem.crt", "private.pem.key", "AmazonRootCA1.pem"),
        )
        checked, text = check_config(out, capsys)

        assert code == 0
        assert tomllib.loads(out.read_text())["services"] == {"SSH": 2222, "WEB": "127.0.0.1:8080"}
        assert checked == 0, text
        assert "  services: SSH=2222, WEB=127.0.0.1:8080" in text

    def test_bad_service(self, capsys):
        """A service target this agent would refuse is refused at import, exit 78."""
        code = main(
            ["import-device-client", str(DATA / "tunneling-disabled.json"), "--service", "SSH=0"]
        )

        assert code == EXIT_CONFIG
        assert capsys.readouterr().err.splitlines()[1] == (
            "  --service SSH=0: port must be an integer between 1 and 65535"
        )


class TestFleetProvisioned:
    def test_runtime_values(self, capsys):
        """After fleet provisioning, the runtime configuration's identity is the one used."""
        code = main(
            ["import-device-client", str(DATA / "fleet-provisioned.json"), "--certs-dir", "/c"]
        )
        captured = capsys.readouterr()
        written = tomllib.loads(captured.out)

        assert code == 0
        assert written["thing_name"] == "factory-SN-0042"
        assert written["mqtt"]["key"] == "/c/provisioned.pem.key"
        assert (
            "  sudo install -o iot-tunnel-agent -g iot-tunnel-agent -m 0600 "
            "/root/.aws-iot-device-client/keys/provisioned.pem.key /c/provisioned.pem.key"
        ) in captured.err.splitlines()
        assert "runtime-config" not in " ".join(
            line for line in captured.err.splitlines() if line.startswith("  - runtime")
        )


class TestAnswers:
    def test_interactive_confirmation(self, monkeypatch, capsys):
        """On a terminal the implied services are asked for, on stderr; 'y' writes them."""

        class Terminal(io.StringIO):
            def isatty(self):
                return True

        monkeypatch.setattr("sys.stdin", Terminal("y\n"))

        code = main(["import-device-client", str(DATA / "relative-paths.json")])
        captured = capsys.readouterr()

        assert code == 0
        assert tomllib.loads(captured.out)["services"] == {"SSH": 22, "VNC": 5900}
        question = (
            "Allow SSH on port 22 and VNC on port 5900, as the Device Client's tunneling did?"
        )
        assert captured.err.startswith(question + " [y/N] ")

    def test_declined(self, monkeypatch, capsys):
        """Anything but yes leaves the services empty."""

        class Terminal(io.StringIO):
            def isatty(self):
                return True

        monkeypatch.setattr("sys.stdin", Terminal("\n"))

        assert main(["import-device-client", str(DATA / "relative-paths.json")]) == 0
        assert tomllib.loads(capsys.readouterr().out)["services"] == {}

    def test_existing_output_kept(self, tmp_path, capsys):
        """An existing --output file is replaced only with --yes."""
        out = tmp_path / "config.toml"
        out.write_text("# mine\n")

        refused = main(["import-device-client", str(DATA / "full.json"), "--output", str(out)])
        kept = out.read_text()
        replaced = main(
            ["import-device-client", str(DATA / "full.json"), "--output", str(out), "--yes"]
        )

        assert (refused, kept) == (1, "# mine\n")
        assert f"tunnel-agent: {out} exists: pass --yes to replace it" in capsys.readouterr().err
        assert replaced == 0
        assert tomllib.loads(out.read_text())["thing_name"] == "pump-station-7"

    def test_unwritable_output(self, tmp_path, capsys):
        """An --output in a missing directory is one line and exit 1, not a traceback."""
        out = tmp_path / "nowhere" / "config.toml"

        code = main(["import-device-client", str(DATA / "full.json"), "--output", str(out)])

        assert code == 1
        assert capsys.readouterr().err == f"tunnel-agent: {out}: No such file or directory\n"

    def test_key_in_place(self, tmp_path, capsys):
        """With the certificates directory where the files already are, chown/chmod them."""
        code = main(
            [
                "import-device-client",
                str(DATA / "full.json"),
                "--certs-dir",
                "/etc/aws-iot-device-client/certs",
            ]
        )

        assert code == 0
        assert (
            "  sudo chown iot-tunnel-agent:iot-tunnel-agent "
            "/etc/aws-iot-device-client/certs/private.pem.key && sudo chmod 0600 "
            "/etc/aws-iot-device-client/certs/private.pem.key"
        ) in capsys.readouterr().err.splitlines()
