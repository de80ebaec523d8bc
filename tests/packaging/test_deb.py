"""
The Debian package: build, lintian, then install / upgrade / purge in a fresh root.

The .deb is built by packaging/debian/build.sh (``make deb``) into dist/ and reused
while its inputs are unchanged (a digest stamp beside it). The fresh root is a
``debootstrap --variant=minbase`` of the build machine's Debian release with
python3 and adduser, made once and cached (``$IOT_TUNNEL_AGENT_CACHE``, default
``~/.cache/iot-tunnel-agent``); every test gets its own overlay on it and works in it
through chroot, so tests do not depend on each other. Measured here: build ~30 s,
lintian ~6 s, debootstrap ~80 s (once), each install test ~5 s.

Needs root (debootstrap, chroot), dpkg-dev, lintian and debootstrap; a missing piece
fails the test with what to install rather than skipping it.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import gzip
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import agent


pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEBIAN = REPO / "packaging" / "debian"
DIST = REPO / "dist"
PKG = "iot-tunnel-agent"
USER = "iot-tunnel-agent"
PREFIX = Path("/opt") / PKG
CONFIG_EXAMPLE = REPO / "config" / "config.example.toml"
CACHE = Path(os.environ.get("IOT_TUNNEL_AGENT_CACHE", Path.home() / ".cache" / PKG))
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
SCALE = float(os.environ.get("TEST_TIME_SCALE", "1.0"))
# The package's dependencies, and systemd so that the same root can boot (TestUnderSystemd).
BOOTSTRAP_PACKAGES = "python3,adduser,procps,systemd,systemd-sysv,dbus"
CHROOT_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "HOME=/"]
# Every distribution in the venv is pinned here (the build is repeatable).
CONSTRAINTS = DEBIAN / "constraints.txt"
# What must never ship: the extras (emulator, operator, test tooling).
FORBIDDEN_DISTRIBUTIONS = {
    "aiohttp",
    "boto3",
    "botocore",
    "cryptography",
    "regex",
    "pytest",
    "awscli",
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def pinned() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith("#"):
            pins[normalize(name)] = version.strip()
    return pins


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} not found: apt-get install {package} (Makefile APT_PACKAGES)")
    return path


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the .deb install tests need root (debootstrap, chroot): run make test as root")


def run(
    *argv: str | Path, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} exited {result.returncode}:\n{result.stderr}")
    return result


def architecture() -> str:
    return run(need("dpkg", "dpkg"), "--print-architecture").stdout.strip()


def inputs_digest() -> str:
    """Hash everything build.sh reads, so an unchanged tree reuses the built .deb."""
    digest = hashlib.sha256()
    files = [
        *sorted(DEBIAN.iterdir()),
        REPO / "systemd" / f"{PKG}.service",
        REPO / "packaging" / "manpages.py",
        REPO / "pyproject.toml",
        REPO / "README.md",
        REPO / "LICENSE",
        CONFIG_EXAMPLE,
        *sorted(
            path
            for path in (REPO / "agent").rglob("*")
            if path.is_file()
            and "__pycache__" not in path.parts
            and "emulator" not in path.relative_to(REPO / "agent").parts[:1]
        ),
    ]
    for path in files:
        if path.is_file():
            digest.update(
                str(path.relative_to(REPO) if path.is_relative_to(REPO) else path).encode()
            )
            digest.update(b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def build_deb(version: str = agent.__version__) -> Path:
    """Build (or reuse) the .deb of ``version``; another than agent.__version__ is patched in."""
    need("dpkg-deb", "dpkg-dev")
    path = DIST / f"{PKG}_{version}_{architecture()}.deb"
    stamp = path.with_name(path.name + ".inputs")
    digest = inputs_digest()
    if path.is_file() and stamp.is_file() and stamp.read_text() == digest:
        return path
    stamp.unlink(missing_ok=True)
    env = {**os.environ, "DIST": str(DIST)}
    env.pop("CONFIG_EXAMPLE", None)
    env.pop("PACKAGE_VERSION", None)
    if version != agent.__version__:
        env["PACKAGE_VERSION"] = version
    result = subprocess.run(
        ["bash", str(DEBIAN / "build.sh")],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        env=env,
        cwd=REPO,
    )
    if result.returncode != 0:
        pytest.fail(f"build.sh failed ({result.returncode}):\n{result.stderr[-4000:]}")
    assert result.stdout.strip() == str(path)
    stamp.write_text(digest)
    return path


@pytest.fixture(scope="module")
def deb() -> Path:
    return build_deb()


#: The next release, for upgrade tests: the same tree with a higher version.
NEXT_VERSION = f"{agent.__version__}.1"


@pytest.fixture(scope="module")
def deb_next(deb: Path) -> Path:
    del deb  # built first: both builds share dist/
    return build_deb(NEXT_VERSION)


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("unpacked")
    run("dpkg-deb", "--raw-extract", deb, target)
    return target


def codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.partition("=")[2].strip('"')
    pytest.fail("/etc/os-release has no VERSION_CODENAME: cannot pick the release to bootstrap")


@pytest.fixture(scope="session")
def base_root() -> Path:
    """Return a cached minbase root of this machine's release, bootstrapping it once."""
    need_root()
    tag = hashlib.sha256(BOOTSTRAP_PACKAGES.encode()).hexdigest()[:8]
    base = CACHE / f"debootstrap-{codename()}-minbase-{architecture()}-{tag}"
    if (base / "usr/bin/python3").exists():
        return base
    debootstrap = need("debootstrap", "debootstrap")
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = base.with_name(base.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    run(
        debootstrap, "--variant=minbase", f"--include={BOOTSTRAP_PACKAGES}",
        codename(), partial, MIRROR,
        timeout=1200,
    )  # fmt: skip
    partial.rename(base)
    return base


class Root:
    """A fresh Debian root and helpers to run commands inside it with chroot."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(self, *argv: str, user: str | None = None, check: bool = True):
        spec = []
        if user is not None:
            uid, gid = self.ids(user)
            spec = [f"--userspec={uid}:{gid}"]
        return run("chroot", *spec, self.path, *CHROOT_ENV, *argv, check=check)

    def install(self, deb: Path) -> subprocess.CompletedProcess[str]:
        shutil.copy2(deb, self.path / "tmp" / deb.name)
        return self.run("dpkg", "-i", f"/tmp/{deb.name}")

    def ids(self, user: str) -> tuple[int, int]:
        for line in (self.path / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user:
                return int(fields[2]), int(fields[3])
        raise KeyError(user)

    def passwd(self, user: str) -> list[str] | None:
        for line in (self.path / "etc/passwd").read_text().splitlines():
            if line.split(":")[0] == user:
                return line.split(":")
        return None

    def group(self, name: str) -> list[str] | None:
        for line in (self.path / "etc/group").read_text().splitlines():
            if line.split(":")[0] == name:
                return line.split(":")
        return None

    def files(self) -> set[str]:
        return {
            "/" + str(path.relative_to(self.path))
            for path in self.path.rglob("*")
        }  # fmt: skip

    def __truediv__(self, relative: str) -> Path:
        return self.path / relative.lstrip("/")


@pytest.fixture
def root(base_root: Path, tmp_path: Path):
    """Give each test a fresh root: an overlay on the cached one (a copy if overlayfs fails)."""
    merged, upper, work = tmp_path / "root", tmp_path / "upper", tmp_path / "work"
    for path in (merged, upper, work):
        path.mkdir()
    options = f"lowerdir={base_root},upperdir={upper},workdir={work}"
    mounted = run("mount", "-t", "overlay", "overlay", "-o", options, merged, check=False)
    if mounted.returncode != 0:
        merged.rmdir()
        run("cp", "-a", base_root, merged)
    try:
        yield Root(merged)
    finally:
        if mounted.returncode == 0:
            run("umount", merged, check=False)
        shutil.rmtree(tmp_path, ignore_errors=True)


def install_device_files(root: Root) -> None:
    """Put the certificate, key and CA where the shipped example expects them, as README says."""
    from tests.certs import write_credentials

    uid, gid = root.ids(USER)
    certs = root / "etc/iot-tunnel-agent/certs"
    # Real PEM files: check-config parses them (and matches the key to the certificate).
    write_credentials(
        certs, thing="my-device", names=("device.pem.crt", "private.pem.key", "AmazonRootCA1.pem")
    )
    for name, mode in (
        ("device.pem.crt", 0o644),
        ("private.pem.key", 0o600),
        ("AmazonRootCA1.pem", 0o644),
    ):
        os.chown(certs / name, uid, gid)
        (certs / name).chmod(mode)


class TestBuild:
    def test_file_name_and_control_fields(self, deb):
        """The .deb is named <pkg>_<version>_<arch> and depends on Python 3.11, not mosquitto."""
        fields = dict(
            line.split(": ", 1)
            for line in run("dpkg-deb", "--field", deb).stdout.splitlines()
            if ": " in line and not line.startswith(" ")
        )
        depends = [d.strip() for d in fields["Depends"].split(",")]

        assert deb.name == f"{PKG}_{agent.__version__}_{architecture()}.deb"
        assert (fields["Package"], fields["Version"], fields["Architecture"]) == (
            PKG,
            agent.__version__,
            architecture(),
        )
        assert {"python3 (>= 3.11)", "python3.11", "adduser", "procps"} <= set(depends)
        assert not [d for d in depends if "mosquitto" in d]

    def test_layout(self, unpacked):
        """Commands, unit and conffile are where Debian and systemd expect them."""
        tunnel_agent = unpacked / "usr/bin/tunnel-agent"
        localproxy = unpacked / "usr/bin/tunnel-localproxy"
        conffiles = (unpacked / "DEBIAN/conffiles").read_text().split()

        assert tunnel_agent.readlink() == PREFIX / "bin/tunnel-agent"
        assert localproxy.readlink() == PREFIX / "bin/tunnel-localproxy"
        assert conffiles == ["/etc/iot-tunnel-agent/config.toml"]
        assert (unpacked / "lib/systemd/system/iot-tunnel-agent.service").read_bytes() == (
            REPO / "systemd/iot-tunnel-agent.service"
        ).read_bytes()
        assert (unpacked / "etc/iot-tunnel-agent/config.toml").read_bytes() == (
            CONFIG_EXAMPLE.read_bytes()
        )
        assert (unpacked / "opt/iot-tunnel-agent/bin/python").readlink() == Path(
            "/usr/bin/python3.11"
        )

    def test_man_pages(self, unpacked):
        """Both commands have a gzipped section-1 page, generated from their parsers."""
        pages = sorted((unpacked / "usr/share/man/man1").iterdir())
        headers = [gzip.decompress(page.read_bytes()).decode().splitlines()[1] for page in pages]

        assert [page.name for page in pages] == ["tunnel-agent.1.gz", "tunnel-localproxy.1.gz"]
        assert [header.split()[:3] for header in headers] == [
            [".TH", "TUNNEL\\-AGENT", "1"],
            [".TH", "TUNNEL\\-LOCALPROXY", "1"],
        ]

    def test_venv_holds_the_pinned_runtime_closure_only(self, unpacked):
        """The venv has the project and pinned runtime deps: no extras, no emulator, no .pyc."""
        site = next((unpacked / "opt/iot-tunnel-agent/lib").glob("python3.*/site-packages"))
        installed = dict(
            p.name.removesuffix(".dist-info").rsplit("-", 1) for p in site.glob("*.dist-info")
        )
        installed = {normalize(name): version for name, version in installed.items()}
        ours = installed.pop("iot_tunnel_agent")
        compiled = [p for p in unpacked.rglob("*") if p.suffix == ".pyc" or p.name == "__pycache__"]

        assert ours == agent.__version__
        assert installed == {name: pinned().get(name, "not pinned") for name in installed}
        assert {"awsiotsdk", "awscrt", "pydantic", "structlog", "websockets"} <= set(installed)
        assert not {normalize(n) for n in FORBIDDEN_DISTRIBUTIONS} & set(installed)
        assert (site / "agent/cli.py").is_file()
        assert not (site / "agent/emulator").exists()
        assert compiled == []
        assert sorted(p.name for p in (unpacked / "opt/iot-tunnel-agent/bin").iterdir()) == [
            "activate", "python", "python3", "python3.11", "tunnel-agent", "tunnel-localproxy",
        ]  # fmt: skip

    def test_no_build_machine_paths(self, unpacked):
        """No file refers to the staging directory the venv was built in."""
        leaks = [
            str(path.relative_to(unpacked))
            for path in unpacked.rglob("*")
            if path.is_file()
            and not path.is_symlink()
            and re.search(rb"iot-tunnel-agent-build\.\w+", path.read_bytes())
        ]
        shebang = (unpacked / "opt/iot-tunnel-agent/bin/tunnel-agent").read_text().splitlines()[0]

        assert leaks == []
        assert shebang == f"#!{PREFIX}/bin/python"

    def test_records_match_the_files(self, unpacked):
        """Every RECORD lists existing files with their true hashes (the build is repeatable)."""
        site = next((unpacked / "opt/iot-tunnel-agent/lib").glob("python3.*/site-packages"))
        wrong = []
        for record in site.glob("*.dist-info/RECORD"):
            for name, digest, _size in csv.reader(record.read_text().splitlines()):
                if not digest:
                    continue
                path = (site / name).resolve()
                actual = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest())
                if digest != "sha256=" + actual.rstrip(b"=").decode():
                    wrong.append(name)

        assert wrong == []


@pytest.fixture(scope="module")
def lintian(deb: Path) -> subprocess.CompletedProcess[str]:
    """One lintian run over the package, informational tags included."""
    return run(need("lintian", "lintian"), "--display-info", "--fail-on", "error", deb, check=False)


class TestLintian:
    def test_no_errors(self, lintian):
        """Lintian reports no error-level tag (overrides are justified in lintian-overrides)."""
        errors = [line for line in lintian.stdout.splitlines() if line.startswith("E:")]

        assert errors == []
        assert lintian.returncode == 0, lintian.stdout + lintian.stderr

    def test_every_command_has_a_man_page(self, lintian):
        """No no-manual-page, and no tag about the pages shipped (they pass man --warnings)."""
        tags = [line for line in lintian.stdout.splitlines() if "manual-page" in line]
        pages = [line for line in lintian.stdout.splitlines() if " manpage-" in line]

        assert tags == []
        assert pages == []
        assert "no-manual-page" not in (DEBIAN / "lintian-overrides").read_text()

    def test_every_override_is_justified(self):
        """Each lintian override line directly follows a comment saying why."""
        lines = (DEBIAN / "lintian-overrides").read_text().splitlines()
        unjustified = [
            line
            for index, line in enumerate(lines)
            if line.strip()
            and not line.startswith("#")
            and (index == 0 or not lines[index - 1].startswith("#"))
        ]

        assert unjustified == []


class TestInstall:
    def test_install_and_run(self, deb, root):
        """The package installs in a fresh root; tunnel-agent and tunnel-localproxy run there."""
        root.install(deb)
        version = root.run("tunnel-agent", "--version")
        localproxy = root.run("tunnel-localproxy", "--help")
        sources = list((root / "opt/iot-tunnel-agent/lib").rglob("*.py"))
        compiled = list((root / "opt/iot-tunnel-agent/lib").rglob("__pycache__/*.pyc"))

        assert version.stdout.strip() == f"tunnel-agent {agent.__version__}"
        assert localproxy.returncode == 0
        assert len(compiled) >= len(sources) * 0.9

    def test_system_user_and_permissions(self, deb, root):
        """Postinst adds a no-login system user; the config is root's, readable by its group."""
        root.install(deb)
        entry = root.passwd(USER)
        uid, gid = root.ids(USER)
        conf_dir = (root / "etc/iot-tunnel-agent").stat()
        certs = (root / "etc/iot-tunnel-agent/certs").stat()
        conf = (root / "etc/iot-tunnel-agent/config.toml").stat()

        assert entry is not None
        assert uid < 1000
        assert entry[5:] == ["/var/lib/iot-tunnel-agent", "/usr/sbin/nologin"]
        assert root.group(USER) is not None
        assert (conf_dir.st_uid, conf_dir.st_gid, conf_dir.st_mode & 0o7777) == (0, gid, 0o750)
        assert (certs.st_uid, certs.st_gid, certs.st_mode & 0o7777) == (0, gid, 0o750)
        assert (conf.st_uid, conf.st_gid, conf.st_mode & 0o7777) == (0, gid, 0o640)

    def test_environment_file_is_roots_alone(self, deb, root):
        """Postinst creates the unit's EnvironmentFile= root:root 0600, only comments in it."""
        root.install(deb)
        path = root / "etc/iot-tunnel-agent/environment"
        info = path.stat()
        lines = path.read_text().splitlines()

        assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (0, 0, 0o600)
        assert lines
        assert all(line.startswith("#") for line in lines)
        assert "# TUNNEL_AGENT_MQTT__HTTP_PROXY=http://user:password@" in path.read_text()

    def test_check_config_as_the_service_user(self, deb, root):
        """check-config passes as iot-tunnel-agent with its own 0600 key, fails for others."""
        root.install(deb)
        install_device_files(root)
        # --config as in the unit's ExecStart=.
        check = ("tunnel-agent", "check-config", "--config", "/etc/iot-tunnel-agent/config.toml")
        as_agent = root.run(*check, user=USER, check=False)
        as_nobody = root.run(*check, user="nobody", check=False)

        assert as_agent.returncode == 0, as_agent.stderr
        assert as_nobody.returncode == 78
        assert "not readable" in as_nobody.stderr

    def test_check_config_on_the_shipped_example(self, deb, root):
        """On the untouched conffile check-config exits 78 naming each missing device file."""
        root.install(deb)
        result = root.run("tunnel-agent", "check-config", check=False)
        problems = sorted(line.strip() for line in result.stderr.splitlines()[1:])

        assert result.returncode == 78
        assert problems == [
            "mqtt.ca = '/etc/iot-tunnel-agent/certs/AmazonRootCA1.pem': file does not exist",
            "mqtt.cert = '/etc/iot-tunnel-agent/certs/device.pem.crt': file does not exist",
            "mqtt.key = '/etc/iot-tunnel-agent/certs/private.pem.key': file does not exist",
        ]

    def test_upgrade_keeps_the_administrators_edits(self, deb, root):
        """Re-installing over an edited config.toml keeps the edit (it is a conffile)."""
        root.install(deb)
        config = root / "etc/iot-tunnel-agent/config.toml"
        config.write_text(config.read_text().replace('"my-device"', '"pi-42"'))
        edited = config.read_text()
        environment = root / "etc/iot-tunnel-agent/environment"
        environment.write_text("TUNNEL_AGENT_MQTT__HTTP_PROXY=http://u:p@proxy:3128\n")
        root.install(deb)
        version = root.run("tunnel-agent", "--version")

        assert (root / "etc/iot-tunnel-agent/config.toml").read_text() == edited
        assert environment.read_text() == "TUNNEL_AGENT_MQTT__HTTP_PROXY=http://u:p@proxy:3128\n"
        assert environment.stat().st_mode & 0o7777 == 0o600
        assert version.returncode == 0

    def test_purge_removes_what_install_added(self, deb, root):
        """After purge nothing of the package, its user or its directories is left."""
        before = root.files()
        root.install(deb)
        state = root / "var/lib/iot-tunnel-agent"
        state.mkdir()
        (state / "status.json").write_text("{}")
        root.run("dpkg", "--purge", PKG)
        added = {
            path
            for path in root.files() - before
            if not path.startswith(("/var/lib/dpkg/", "/var/log/", "/tmp/"))
            # Backups adduser/deluser keep of the account files, and adduser's lock
            # (on a running system /run is a tmpfs).
            and path not in {"/etc/passwd-", "/etc/group-", "/etc/shadow-", "/etc/gshadow-"}
            and path != "/run/adduser"
        }

        assert added == set()
        assert root.passwd(USER) is None
        assert root.group(USER) is None

    def test_purge_keeps_files_the_administrator_added(self, deb, root):
        """A device key left in /etc/iot-tunnel-agent survives purge, with its owner account."""
        root.install(deb)
        install_device_files(root)
        result = root.run("dpkg", "--purge", PKG)

        assert (root / "etc/iot-tunnel-agent/certs/private.pem.key").is_file()
        assert not (root / "etc/iot-tunnel-agent/config.toml").exists()
        assert not (root / "opt/iot-tunnel-agent").exists()
        assert root.passwd(USER) is not None
        assert "keeping /etc/iot-tunnel-agent" in result.stderr


# -- the unit under a real systemd -----------------------------------------------------------
# The fresh root boots with systemd-nspawn (sharing this machine's network, as a device
# shares its LAN), the .deb installed in it, and the agent started by `systemctl start`
# against the emulator on loopback: the unit's whole sandbox is applied by systemd itself.

UNIT = f"{PKG}.service"
PAGE = b"<html><body>through the hardened unit</body></html>"


class Container:
    """A root booted with systemd-nspawn; commands enter it with nsenter."""

    def __init__(self, root: Root, log: Path) -> None:
        self.root = root
        self._log = log.open("wb")
        self.process = subprocess.Popen(
            [
                need("systemd-nspawn", "systemd-container"), "--quiet", "-D", str(root.path),
                "--boot", "--register=no", "--keep-unit", "--console=pipe",
                f"--machine=tunnel-agent-test-{os.getpid()}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            self.leader = self._wait_for(self._find_leader, "the container's systemd")
            self._wait_for(
                self._booted, "the container to finish booting", report=self._boot_report
            )
        except BaseException:
            self.close()  # a container that never booted must not outlive the test
            raise

    def _wait_for(self, probe, what: str, timeout: float = 60, report=None):
        deadline = time.monotonic() + timeout * SCALE
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"systemd-nspawn exited {self.process.returncode} waiting for {what}")
            found = probe()
            if found:
                return found
            time.sleep(0.1)
        pytest.fail(f"timed out waiting for {what}" + (f"\n{report()}" if report else ""))

    def _boot_report(self) -> str:
        """What a boot that did not finish was still doing: its state, its jobs, its failures."""
        parts = [
            self.run(*argv, check=False).stdout
            for argv in (
                ("systemctl", "is-system-running"),
                ("systemctl", "list-jobs", "--no-pager"),
                ("systemctl", "--failed", "--no-pager"),
            )
        ]
        self._log.flush()
        parts.append(Path(self._log.name).read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def _find_leader(self) -> int | None:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError):
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    if int(fields[1]) == self.process.pid:
                        return int(entry.name)
        return None

    def _booted(self) -> bool:
        state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
        return state in {"running", "degraded"}

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("nsenter", "-t", str(self.leader), "-a", *argv, check=check, timeout=120)

    def show(self, *properties: str) -> dict[str, str]:
        names = ",".join(properties)
        output = self.run("systemctl", "show", UNIT, f"--property={names}").stdout
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)

    def wait_state(self, predicate, what: str, timeout: float = 30) -> dict[str, str]:
        properties = ("ActiveState", "SubState", "MainPID", "NRestarts", "ExecMainStatus", "Result")

        def probe() -> dict[str, str] | None:
            state = self.show(*properties)
            return state if predicate(state) else None

        return self._wait_for(probe, what, timeout)

    def wait_for(self, probe, what: str, timeout: float = 30):
        return self._wait_for(probe, what, timeout)

    def process_status(self, pid: str) -> dict[str, str]:
        text = self.run("cat", f"/proc/{pid}/status").stdout
        return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}

    def close(self) -> None:
        if self.process.poll() is None:
            # SIGTERM asks nspawn for an orderly shutdown of the container.
            self.process.terminate()
            try:
                self.process.wait(30 * SCALE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args):
        pass


@pytest.fixture
def web_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def world(tmp_path, web_server):
    from tests.integration.test_agent_e2e import World

    made = World(tmp_path / "world", {"HTTP": f"127.0.0.1:{web_server}"})
    try:
        yield made
    finally:
        made.close()


def configure_for_emulator(root: Root, world) -> None:
    """Install the emulator thing's credentials and configuration as README tells an admin to."""
    uid, gid = root.ids(USER)
    certs = root / "etc/iot-tunnel-agent/certs"
    config = world.bundle.config.read_text()
    for source, mode in (
        (world.bundle.cert, 0o644),
        (world.bundle.key, 0o600),
        (world.bundle.ca, 0o644),
    ):
        target = certs / source.name
        shutil.copy2(source, target)
        os.chown(target, uid, gid)
        target.chmod(mode)
        config = config.replace(str(source), f"/etc/iot-tunnel-agent/certs/{source.name}")
    # The bundle keeps tunnel records beside itself; the unit has its StateDirectory=.
    config = re.sub(r"\[tunnels\]\nstate_dir = .*\n", "", config)
    (root / "etc/iot-tunnel-agent/config.toml").write_text(config)


@pytest.fixture
def container(deb, root, tmp_path):
    root.install(deb)
    booted = Container(root, tmp_path / "nspawn.log")
    try:
        yield booted
    finally:
        booted.close()


def journal(container: Container) -> str:
    return container.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat").stdout


def http_get(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10 * SCALE) as response:
        return response.read()


class TestUnderSystemd:
    def test_serves_a_tunnel_inside_the_sandbox(self, container, world):
        """Start returns on READY=1; the sandboxed agent and its proxy carry a tunnel."""
        configure_for_emulator(container.root, world)

        container.run("systemctl", "start", UNIT)
        started = container.show("ActiveState", "SubState", "MainPID")
        agent_status = container.process_status(started["MainPID"])
        tunnel = world.open(["HTTP"])
        world.wait_connected(tunnel["tunnelId"])
        main = started["MainPID"]
        source = world.source(tunnel["sourceAccessToken"], ["HTTP"])
        body = http_get(source.port("HTTP"))
        uid = str(container.root.ids(USER)[0])
        # What an administrator runs (as root): the unit's RuntimeDirectory= status file.
        status = json.loads(container.run("tunnel-agent", "status", "--json").stdout)
        [(services, proxy_pid)] = [(t["services"], t["pid"]) for t in status["tunnels"]]
        proxy_status = container.process_status(str(proxy_pid))
        # The agent's own child, or forked by its proxy launcher (the agent's child).
        children = container.run("cat", f"/proc/{main}/task/{main}/children").stdout.split()

        assert (started["ActiveState"], started["SubState"]) == ("active", "running")
        assert body == PAGE
        assert status["pid"] == int(main)
        assert services == ["HTTP"]
        assert proxy_status["PPid"] in [main, *children]
        for status in (agent_status, proxy_status):
            assert status["Uid"].split() == [uid] * 4
            assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2")
            assert status["CapEff"] == status["CapBnd"] == "0000000000000000"

    def test_environment_file_reaches_the_agent(self, container, world):
        """A variable in /etc/iot-tunnel-agent/environment is in the running agent's environment."""
        configure_for_emulator(container.root, world)
        environment = container.root / "etc/iot-tunnel-agent/environment"
        environment.write_text(environment.read_text() + "TUNNEL_AGENT_LOGGING__LEVEL=debug\n")

        container.run("systemctl", "start", UNIT)
        pid = container.show("MainPID")["MainPID"]
        variables = container.run("cat", f"/proc/{pid}/environ").stdout.split("\0")

        assert "TUNNEL_AGENT_LOGGING__LEVEL=debug" in variables
        assert container.show("ActiveState")["ActiveState"] == "active"

    def test_reload_stop_and_restart_after_a_crash(self, container, world):
        """SIGHUP keeps the process, a SIGKILL is restarted, stop ends it cleanly."""
        configure_for_emulator(container.root, world)
        container.run("systemctl", "start", UNIT)
        first = container.show("MainPID")["MainPID"]

        container.run("systemctl", "reload", UNIT)
        # The agent re-executes itself: its second agent_started is the new image, READY.
        container.wait_for(lambda: journal(container).count("agent_started") == 2, "the reload")
        reloaded = container.show("ActiveState", "MainPID")
        container.run("systemctl", "kill", "--signal=KILL", UNIT)
        restarted = container.wait_state(
            lambda s: s["ActiveState"] == "active" and s["MainPID"] not in {"0", first},
            "the restart after SIGKILL",
        )
        container.run("systemctl", "stop", UNIT)
        stopped = container.show("ActiveState", "Result", "ExecMainStatus")

        assert reloaded == {"ActiveState": "active", "MainPID": first}
        assert restarted["NRestarts"] == "1"
        assert stopped == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}

    def test_watchdog_is_fed_and_a_frozen_agent_is_restarted(self, container, world):
        """With WatchdogSec=2 the agent keeps pinging; SIGSTOP makes systemd restart it."""
        configure_for_emulator(container.root, world)
        dropin = container.root / f"etc/systemd/system/{UNIT}.d/test-watchdog.conf"
        dropin.parent.mkdir(parents=True)
        # Short enough to test quickly; RestartSec/TimeoutAbortSec keep the restart brisk.
        dropin.write_text("[Service]\nWatchdogSec=2\nTimeoutAbortSec=2\nRestartSec=1\n")
        container.run("systemctl", "daemon-reload")
        container.run("systemctl", "start", UNIT)
        first = container.show("MainPID")["MainPID"]

        time.sleep(6 * SCALE)  # three watchdog periods: a silent agent would have been killed
        alive = container.show("ActiveState", "MainPID", "NRestarts")
        container.run("systemctl", "kill", "--signal=STOP", UNIT)
        restarted = container.wait_state(
            lambda s: s["ActiveState"] == "active" and s["MainPID"] not in {"0", first},
            "the watchdog restart",
        )
        journal = container.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat").stdout

        assert alive == {"ActiveState": "active", "MainPID": first, "NRestarts": "0"}
        assert restarted["NRestarts"] == "1"
        assert "Watchdog timeout" in journal

    def test_configuration_error_is_not_restarted(self, container):
        """With the untouched example config the agent exits 78 and systemd does not retry."""
        start = container.run("systemctl", "start", UNIT, check=False)
        # RestartSec=5: wait past it to see that no restart was scheduled.
        time.sleep(6 * SCALE)
        state = container.show("ActiveState", "Result", "ExecMainStatus", "NRestarts")
        journal = container.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat").stdout

        assert start.returncode != 0
        assert state == {
            "ActiveState": "failed",
            "Result": "exit-code",
            "ExecMainStatus": "78",
            "NRestarts": "0",
        }
        assert (
            "mqtt.cert = '/etc/iot-tunnel-agent/certs/device.pem.crt': file does not exist"
            in journal
        )

    def test_live_security_analysis(self, container):
        """The running systemd rates the installed unit's exposure <= 2.0 too."""
        output = container.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
        match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", output)

        assert match is not None, output
        assert float(match.group(1)) <= 2.0, output


class TestUpgradeUnderSystemd:
    def test_upgrade_reloads_and_the_session_survives(self, deb_next, container, tmp_path):
        """Install N, open a session through it, install N+1: the session lives on N+1."""
        from tests.integration.dataplane import ThreadedServer, connect, echo
        from tests.integration.test_agent_e2e import World
        from tests.integration.test_agent_restart import exchange

        server = ThreadedServer(echo)
        world = World(tmp_path / "world", {"ECHO": f"127.0.0.1:{server.port}"})
        try:
            configure_for_emulator(container.root, world)
            container.run("systemctl", "start", UNIT)
            main = container.show("MainPID")["MainPID"]
            tunnel = world.open(["ECHO"])
            world.wait_connected(tunnel["tunnelId"])
            [proxy] = [
                t["pid"]
                for t in json.loads(container.run("tunnel-agent", "status", "--json").stdout)[
                    "tunnels"
                ]
            ]
            source = world.source(tunnel["sourceAccessToken"], ["ECHO"])
            session = connect(source.port("ECHO"))
            before = exchange(session, 256 * 1024, seed=1)
            shutil.copy2(deb_next, container.root / "root" / deb_next.name)

            container.run("dpkg", "-i", f"/root/{deb_next.name}")
            container.wait_for(
                lambda: container.run("tunnel-agent", "status", "--json").stdout.count(
                    f'"agent_version": "{NEXT_VERSION}"'
                ),
                "the agent to run the new version",
            )
            after = exchange(session, 256 * 1024, seed=2)
            # RELOADING=1 until the new image is subscribed and says READY=1.
            state = container.wait_state(lambda s: s["ActiveState"] != "reloading", "READY=1")
            state = {k: state[k] for k in ("ActiveState", "MainPID", "NRestarts")}
            alive = container.run("test", "-d", f"/proc/{proxy}", check=False).returncode == 0
            status = json.loads(container.run("tunnel-agent", "status", "--json").stdout)
            logged = journal(container)
            session.close()
        finally:
            world.close()
            server.close()

        assert before[0] == before[1]
        assert after[0] == after[1]
        assert state == {"ActiveState": "active", "MainPID": main, "NRestarts": "0"}
        assert alive
        assert [t["pid"] for t in status["tunnels"]] == [proxy]
        assert "agent_reexecuting" in logged
        assert "tunnel_adopted" in logged
        assert tunnel["destinationAccessToken"] not in logged
