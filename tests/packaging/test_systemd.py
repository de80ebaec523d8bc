"""
The systemd unit: it verifies, its hardening scores <= 2.0, and the agent runs under it.

There is no systemd PID 1 in CI, so the checks are the offline ones
(``systemd-analyze verify --root`` on a scratch root, ``systemd-analyze security
--offline=yes``), plus the one sandboxing restriction a plain process can impose on
itself exactly as the unit does: no writable+executable memory (PR_SET_MDWE, the
kernel twin of MemoryDenyWriteExecute=). A missing ``systemd-analyze`` fails loudly:
the Makefile installs the ``systemd`` package.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.daemon import settings
from agent.exceptions import EXIT_CONFIG
from tests.certs import write_credentials


REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "iot-tunnel-agent.service"
TARGET_EXPOSURE = 2.0
# The only items the security check may report as open, each argued in the unit's
# comments: the agent needs the network (AF_INET*, no PrivateNetwork, no IP allow
# list for AWS endpoints), AF_UNIX for sd_notify and the Greengrass IPC socket,
# ProtectClock's implicit char-rtc read, and it runs in the host's root directory.
ACCEPTED_OPEN_ITEMS = {
    "RootDirectory=/RootImage=",
    "RestrictAddressFamilies=~AF_UNIX",
    "RestrictAddressFamilies=~AF_(INET|INET6)",
    "PrivateNetwork=",
    "DeviceAllow=",
    "IPAddressDeny=",
}
PR_SET_MDWE = 65
PR_GET_MDWE = 66
PR_MDWE_REFUSE_EXEC_GAIN = 1


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze not found: install the 'systemd' Debian package (make deps)")
    return path


def parse_unit(text: str) -> dict[str, list[str]]:
    """Parse a unit into section.key -> values (keys may repeat, as in systemd)."""
    result: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        result.setdefault(f"{section}.{key}", []).append(value)
    return result


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())


@pytest.fixture
def scratch_root(tmp_path: Path) -> Path:
    """Build a root with systemd's own units, /bin/kill and a stub /usr/bin/tunnel-agent."""
    root = tmp_path / "root"
    host_units = Path("/usr/lib/systemd/system")
    if not (host_units / "sysinit.target").is_file():
        pytest.fail(f"{host_units} lacks systemd's units: install the 'systemd' package")
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "bin").mkdir()
    shutil.copy2("/bin/kill", root / "bin/kill")
    stub = root / "usr/bin/tunnel-agent"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    return root


def verify(root: Path, unit_text: str) -> subprocess.CompletedProcess[str]:
    (root / "etc/systemd/system/iot-tunnel-agent.service").write_text(unit_text)
    return subprocess.run(
        [systemd_analyze(), "verify", f"--root={root}", "--man=no", "iot-tunnel-agent.service"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class TestVerify:
    def test_unit_verifies_without_any_message(self, scratch_root):
        """systemd-analyze verify accepts the unit and prints nothing (warnings count too)."""
        result = verify(scratch_root, UNIT.read_text())

        assert (result.returncode, result.stderr, result.stdout) == (0, "", "")

    def test_verify_catches_a_typo(self, scratch_root):
        """The same check reports a misspelt directive, so a clean run means something."""
        broken = UNIT.read_text().replace("LockPersonality=", "LockPersonalty=")

        result = verify(scratch_root, broken)

        assert "Unknown key" in result.stderr
        assert "LockPersonalty" in result.stderr

    def test_verify_catches_a_missing_executable(self, scratch_root):
        """Without the stub /usr/bin/tunnel-agent verify fails: ExecStart= is checked."""
        (scratch_root / "usr/bin/tunnel-agent").unlink()

        result = verify(scratch_root, UNIT.read_text())

        assert result.returncode != 0
        assert "/usr/bin/tunnel-agent is not executable" in result.stderr


class TestSecurity:
    def run_security(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [systemd_analyze(), "security", "--offline=yes", "--no-pager", *extra, str(UNIT)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def test_overall_exposure_is_at_most_two(self):
        """The offline security analysis rates the unit's exposure <= 2.0."""
        result = self.run_security()
        match = re.search(
            r"Overall exposure level for iot-tunnel-agent\.service: (\d+\.\d+)", result.stdout
        )
        if match is None:
            pytest.fail(f"no exposure figure in systemd-analyze output:\n{result.stdout}")
        exposure = float(match.group(1))

        assert result.returncode == 0, result.stderr
        assert exposure <= TARGET_EXPOSURE, result.stdout

    def test_threshold_flag_agrees(self):
        """systemd-analyze's own --threshold (exposure x 10) passes at 20 and fails at 5."""
        passing = self.run_security("--threshold=20")
        failing = self.run_security("--threshold=5")

        assert passing.returncode == 0
        assert failing.returncode != 0

    def test_only_the_argued_items_are_open(self):
        """Every directive the analysis marks as open is one the unit's comments justify."""
        result = self.run_security()
        open_items = {
            line.split()[1] for line in result.stdout.splitlines() if line.startswith("✗")
        }

        assert open_items == ACCEPTED_OPEN_ITEMS


class TestDirectives:
    def test_service_lifecycle(self, unit):
        """Type=notify, main-only notify access, watchdog, restart policy and SIGHUP reload."""
        expected = {
            "Service.Type": ["notify"],
            "Service.NotifyAccess": ["main"],
            "Service.WatchdogSec": ["30"],
            "Service.Restart": ["on-failure"],
            "Service.RestartPreventExitStatus": [str(EXIT_CONFIG)],
            "Service.ExecReload": ["/bin/kill -HUP $MAINPID"],
            "Service.ExecStart": [
                f"/usr/bin/tunnel-agent run --config {settings.DEFAULT_CONFIG_PATH}"
            ],
        }

        assert {key: unit.get(key) for key in expected} == expected

    def test_identity_and_directories(self, unit):
        """A static unprivileged user and the three directories, private by default."""
        runtime = settings.DEFAULT_RUNTIME_DIR.name
        config = settings.DEFAULT_CONFIG_PATH.parent.name
        expected = {
            "Service.User": ["iot-tunnel-agent"],
            "Service.Group": ["iot-tunnel-agent"],
            "Service.DynamicUser": None,
            "Service.RuntimeDirectory": [runtime],
            "Service.StateDirectory": ["iot-tunnel-agent"],
            "Service.ConfigurationDirectory": [config],
            "Service.UMask": ["0077"],
        }

        assert {key: unit.get(key) for key in expected} == expected

    def test_environment_file_beside_the_configuration(self, unit):
        """One optional EnvironmentFile= in the configuration directory (secrets, README)."""
        (entry,) = unit["Service.EnvironmentFile"]

        assert entry.startswith("-")
        assert Path(entry[1:]) == settings.DEFAULT_CONFIG_PATH.parent / "environment"

    def test_sandbox(self, unit):
        """No capabilities, native syscalls from @system-service only, inet+unix sockets."""
        expected = {
            "Service.CapabilityBoundingSet": [""],
            "Service.AmbientCapabilities": [""],
            "Service.NoNewPrivileges": ["yes"],
            "Service.MemoryDenyWriteExecute": ["yes"],
            "Service.RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
            "Service.SystemCallFilter": ["@system-service", "~@privileged @resources"],
            "Service.SystemCallArchitectures": ["native"],
            "Service.ProtectSystem": ["strict"],
            "Service.ProtectProc": ["invisible"],
            "Service.ProcSubset": ["pid"],
        }

        assert {key: unit.get(key) for key in expected} == expected


# Runs in the child after PR_SET_MDWE: everything the daemon and the bundled proxy load,
# a real TLS context and MQTT5 client from awscrt, then proof the restriction is active.
MDWE_PROBE = textwrap.dedent(
    """
    import ctypes, mmap, sys
    import agent.cli, agent.daemon.lifecycle, agent.daemon.supervisor, agent.daemon.tunnels
    import agent.notify.mqtt, agent.notify.greengrass, agent.proxy.cli
    from awscrt import io, mqtt5
    elg = io.EventLoopGroup(1)
    bootstrap = io.ClientBootstrap(elg, io.DefaultHostResolver(elg))
    tls = io.ClientTlsContext(io.TlsContextOptions())
    client = mqtt5.Client(mqtt5.ClientOptions(
        host_name="127.0.0.1", port=1, bootstrap=bootstrap, tls_ctx=tls))
    import agent.common.loop, asyncio
    agent.common.loop.run(asyncio.sleep(0))  # uvloop where installed, as the daemon runs
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(66, 0, 0, 0, 0) == 1, "MDWE not inherited"
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except PermissionError:
        print("refused-wx")
    """
)

MDWE_WRAPPER = textwrap.dedent(
    """
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, as NoNewPrivileges=yes
        sys.exit("PR_SET_NO_NEW_PRIVS failed")
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        sys.exit(f"PR_SET_MDWE failed: errno {ctypes.get_errno()}")
    os.execv(sys.argv[1], sys.argv[1:])
    """
)


def run_without_wx(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", MDWE_WRAPPER, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )


class TestMemoryDenyWriteExecute:
    @pytest.fixture(autouse=True)
    def _kernel_supports_mdwe(self):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) < 0:
            pytest.fail(
                "this kernel lacks PR_SET_MDWE (Linux >= 6.3): MemoryDenyWriteExecute= "
                "compatibility cannot be checked here"
            )

    def test_agent_and_awscrt_load_without_wx_memory(self):
        """Every runtime module, an awscrt TLS context and MQTT5 client work under MDWE."""
        result = run_without_wx(sys.executable, "-c", MDWE_PROBE)

        assert (result.returncode, result.stdout.strip()) == (0, "refused-wx"), result.stderr

    def test_check_config_runs_without_wx_memory(self, tmp_path):
        """tunnel-agent check-config passes under MDWE with a complete configuration."""
        files = write_credentials(
            tmp_path, names=("device.pem.crt", "private.pem.key", "AmazonRootCA1.pem")
        )
        cert, key = files.cert, files.key
        config = tmp_path / "config.toml"
        config.write_text(
            textwrap.dedent(
                f"""
                thing_name = "dev-1"
                notify = "mqtt"
                [mqtt]
                endpoint = "example-ats.iot.us-east-1.amazonaws.com"
                cert = "{cert}"
                key = "{key}"
                [services]
                SSH = 22
                """
            )
        )

        result = run_without_wx(
            sys.executable, "-m", "agent", "check-config", "--config", str(config)
        )

        assert result.returncode == 0, result.stderr

    def test_bundled_proxy_starts_without_wx_memory(self):
        """The bundled local proxy the agent spawns parses its flags under MDWE."""
        result = run_without_wx(sys.executable, "-m", "agent.proxy", "--help")

        assert result.returncode == 0, result.stderr
        assert "-d" in result.stdout
