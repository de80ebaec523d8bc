"""
Every shell command in README.md is run, or listed here with the test that covers it.

The README's fenced shell blocks (```sh) are of two kinds. A block preceded by a marker
line runs here, in README order, in a scratch copy of the repository with a scratch
``HOME`` (so ``~/...`` and ``./emu`` land there) and the development ``.venv`` on
``PATH``, as a reader who ran ``make venv`` would have it:

- ``<!-- readme-test: run -->``: the block runs with ``bash -e`` and must exit 0;
- ``<!-- readme-test: start, ready "TEXT" -->``: the block is a terminal left running
  (the emulator, the agent, ``tunnel-agent connect``); it must print TEXT, and at the end
  it gets Ctrl-C (SIGINT to its process group) and must exit 0, as the README says.

Every command of an unmarked block must be in :data:`NOT_RUN` with the reason it cannot
run here (root on this host, an AWS account, an editor) and the tests that cover it
instead; an entry the README no longer has fails the test too, so the list cannot rot.
Inline ``code`` in prose is not a command for this purpose: only fenced blocks are.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

import agent


REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SCALE = float(os.environ.get("TEST_TIME_SCALE", "1.0"))
SHELLS = {"sh", "bash", "shell", "console"}
MARKER = re.compile(r'<!-- readme-test: (run|start)(?:, ready "([^"]+)")? -->')
FENCE = re.compile(r"^```(\S*)")
DEB_TESTS = "tests/packaging/test_deb.py"
GREENGRASS_TESTS = "tests/packaging/test_greengrass_recipe.py"
JOURNAL_TEST = (
    "tests/test_logging.py::TestJournal::test_events_reach_the_socket_with_priority_and_fields"
)
DATAPLANE_TEST = (
    "tests/integration/test_dataplane.py::TestServices::test_http_echo_and_ssh_share_one_tunnel"
)
KSM_TEST = (
    "tests/integration/test_proxy_launcher.py::"
    "test_with_ksmd_proxies_share_identical_pages_and_carry_every_byte"
)
CONNECT_TEST = (
    "tests/connect/test_command.py::TestConnect::test_opens_listens_reports_and_closes_on_ctrl_c"
)

#: command -> (why it does not run here, the tests that run it or its equivalent).
NOT_RUN: dict[str, tuple[str, tuple[str, ...]]] = {
    "tunnel-agent import-device-client /etc/.aws-iot-device-client/aws-iot-device-client.conf "
    "--output config.toml --service SSH=22": (
        "reads a Device Client's file that this machine has not; the test imports written ones",
        ("tests/daemon/test_device_client.py::TestFull::test_imports_and_checks",),
    ),
    "make test": (
        "the whole suite, this test included: it cannot run inside itself (CI runs it)",
        (),
    ),
    "make deb": (
        "needs root and dpkg-dev; the fixture runs the same packaging/debian/build.sh",
        (f"{DEB_TESTS}::deb", f"{DEB_TESTS}::TestBuild::test_file_name_and_control_fields"),
    ),
    "sudo apt install ./dist/iot-tunnel-agent_*.deb": (
        "installs into this machine; the test installs with dpkg -i in a debootstrapped root",
        (f"{DEB_TESTS}::TestInstall::test_install_and_run",),
    ),
    "sudo install -o iot-tunnel-agent -g iot-tunnel-agent -m 0600 private.pem.key "
    "/etc/iot-tunnel-agent/certs/": (
        "writes this machine's /etc; the test installs the files the same way in its root",
        (
            f"{DEB_TESTS}::install_device_files",
            f"{DEB_TESTS}::TestInstall::test_check_config_as_the_service_user",
        ),
    ),
    "sudo install -o root -g iot-tunnel-agent -m 0644 device.pem.crt AmazonRootCA1.pem "
    "/etc/iot-tunnel-agent/certs/": (
        "writes this machine's /etc; the test installs the files the same way in its root",
        (f"{DEB_TESTS}::install_device_files",),
    ),
    "sudoedit /etc/iot-tunnel-agent/config.toml": (
        "an interactive editor; the test writes the configuration for the emulator",
        (
            f"{DEB_TESTS}::configure_for_emulator",
            f"{DEB_TESTS}::TestUnderSystemd::test_serves_a_tunnel_inside_the_sandbox",
        ),
    ),
    "sudo -u iot-tunnel-agent tunnel-agent check-config --config "
    "/etc/iot-tunnel-agent/config.toml": (
        "needs the package installed on this machine",
        (f"{DEB_TESTS}::TestInstall::test_check_config_as_the_service_user",),
    ),
    "sudo systemctl enable --now iot-tunnel-agent": (
        "starts a service on this machine; the test starts it in a booted container",
        (f"{DEB_TESTS}::TestUnderSystemd::test_serves_a_tunnel_inside_the_sandbox",),
    ),
    "aws s3 sync dist/greengrass/artifacts s3://my-bucket": (
        "needs an AWS account and bucket; the test checks the layout matches the recipe's URIs",
        (f"{GREENGRASS_TESTS}::TestArtifacts::test_the_recipe_is_rendered_beside_the_zips",),
    ),
    "aws greengrassv2 create-component-version --inline-recipe "
    "fileb://dist/greengrass/recipes/recipe.yaml": (
        "needs an AWS account; the tests check the recipe and run its Install and Run steps",
        (
            f"{GREENGRASS_TESTS}::TestRecipeFormat::test_is_yaml_with_the_recipe_format_keys",
            f"{GREENGRASS_TESTS}::TestOfflineInstall::test_run_reaches_for_the_nucleus",
        ),
    ),
    "systemctl enable --now iot-tunnel-agent": (
        "starts a service on this machine; the test starts it in a booted container",
        (f"{DEB_TESTS}::TestUnderSystemd::test_serves_a_tunnel_inside_the_sandbox",),
    ),
    "journalctl -u iot-tunnel-agent -f": (
        "follows this machine's journal forever; the tests read the unit's journal",
        (
            f"{DEB_TESTS}::TestUnderSystemd::test_configuration_error_is_not_restarted",
            JOURNAL_TEST,
        ),
    ),
    "journalctl -u iot-tunnel-agent -p warning": (
        "reads this machine's journal; the test checks each event's PRIORITY",
        (JOURNAL_TEST,),
    ),
    "journalctl -u iot-tunnel-agent TUNNEL_KEY=3f9c1a": (
        "reads this machine's journal; the test checks each key becomes a journal field",
        (JOURNAL_TEST,),
    ),
    "systemctl reload iot-tunnel-agent": (
        "reloads a service on this machine; the test reloads it in a booted container",
        (f"{DEB_TESTS}::TestUnderSystemd::test_reload_stop_and_restart_after_a_crash",),
    ),
    "tunnel-agent status": (
        "reads the status file of an agent run by systemd on this machine",
        (
            f"{DEB_TESTS}::TestUnderSystemd::test_serves_a_tunnel_inside_the_sandbox",
            "tests/daemon/test_status.py",
        ),
    ),
    "echo 1 | sudo tee /sys/kernel/mm/ksm/run": (
        "starts ksmd for the whole machine; the test starts it (root) and puts it back after",
        (KSM_TEST,),
    ),
    "echo 'w /sys/kernel/mm/ksm/run - - - - 1' | sudo tee /etc/tmpfiles.d/ksm.conf": (
        "writes this machine's /etc for its next boots, where it sets run = 1 as the test does",
        (KSM_TEST,),
    ),
    "tunnel-agent connect my-device --service SSH=2222 --service HTTP": (
        "needs AWS credentials and a real device; the emulator section runs connect here",
        (CONNECT_TEST,),
    ),
    "export AWSIOT_TUNNEL_ACCESS_TOKEN=...": (
        "a placeholder for a token from OpenTunnel",
        (DATAPLANE_TEST,),
    ),
    "tunnel-localproxy -r us-east-1 -d SSH=22,HTTP=127.0.0.1:8080": (
        "connects to AWS's data plane with a real token; the tests use the emulator's relay",
        (DATAPLANE_TEST,),
    ),
    "tunnel-localproxy -r us-east-1 -s SSH=2222,HTTP=0": (
        "connects to AWS's data plane with a real token; the tests use the emulator's relay",
        (DATAPLANE_TEST,),
    ),
}

#: What a block's output must contain, by its first command (beyond exiting 0).
EXPECTED_OUTPUT = {
    "make demo": "all 11 steps passed",
    "make wheel": f"tunnel-agent {agent.__version__}",
}


@dataclass(frozen=True)
class Block:
    """A fenced block of the README."""

    line: int
    language: str
    lines: tuple[str, ...]
    mode: str | None = None
    ready: str | None = None

    @property
    def commands(self) -> list[str]:
        """The block's commands: continuation lines joined, comments dropped."""
        joined: list[str] = []
        pending = ""
        for raw in self.lines:
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1].strip() + " "
                continue
            line = (pending + raw.strip()).strip()
            pending = ""
            line = re.sub(r"\s+#\s.*$", "", line)
            if line and not line.startswith("#"):
                joined.append(line)
        return joined

    @property
    def script(self) -> str:
        return "\n".join(self.lines) + "\n"


def parse(text: str) -> tuple[list[Block], list[int]]:
    """The README's fenced blocks, and the lines of markers that precede no shell block."""
    blocks: list[Block] = []
    stray: list[int] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            if MARKER.fullmatch(lines[index].strip()) and not (
                index + 1 < len(lines)
                and (fence := FENCE.match(lines[index + 1]))
                and fence.group(1) in SHELLS
            ):
                stray.append(index + 1)
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        marker = MARKER.fullmatch(lines[index - 1].strip()) if index else None
        blocks.append(
            Block(
                line=index + 1,
                language=opening.group(1),
                lines=tuple(lines[index + 1 : end]),
                mode=marker.group(1) if marker else None,
                ready=marker.group(2) if marker else None,
            )
        )
        index = end + 1
    return blocks, stray


def shell_blocks() -> list[Block]:
    return [b for b in parse(README.read_text())[0] if b.language in SHELLS]


class TestTheList:
    def test_markers_precede_shell_blocks_and_start_blocks_say_when_ready(self):
        """A marker sits right above a shell block; a block left running names its ready text."""
        blocks, stray = parse(README.read_text())
        marked = [b for b in blocks if b.mode]

        assert stray == []
        assert all(b.language in SHELLS for b in marked)
        assert all((b.mode == "start") == (b.ready is not None) for b in marked)
        assert {b.mode for b in marked} == {"run", "start"}

    def test_every_command_is_run_or_listed(self):
        """Unmarked blocks' commands are exactly NOT_RUN's keys: none missing, none stale."""
        unmarked = [c for b in shell_blocks() if b.mode is None for c in b.commands]
        run = {c for b in shell_blocks() if b.mode for c in b.commands}

        assert sorted(set(unmarked) - NOT_RUN.keys()) == []
        assert sorted(NOT_RUN.keys() - set(unmarked)) == []
        assert not run & NOT_RUN.keys()
        assert len(unmarked) == len(set(unmarked))

    def test_every_listed_command_names_a_reason_and_tests_that_exist(self):
        """Each covering test named in NOT_RUN is a file with that class and function."""
        missing = []
        for command, (why, covering) in NOT_RUN.items():
            assert why, command
            for reference in covering:
                path, *names = reference.split("::")
                source = (REPO / path).read_text() if (REPO / path).is_file() else ""
                if not source or any(
                    not re.search(rf"^\s*(def|class) {re.escape(name)}\b", source, re.MULTILINE)
                    for name in names
                ):
                    missing.append(reference)

        assert missing == []
        assert [c for c, (_, covering) in NOT_RUN.items() if not covering] == ["make test"]

    def test_the_parser_reads_markers_and_continuations(self):
        """The extraction itself: markers, ready texts, continuations, comments."""
        text = (
            '<!-- readme-test: start, ready "up" -->\n```sh\nserve \\\n  --port 1   # why\n'
            "# a comment\n```\n\n```sh\nls\n```\n<!-- readme-test: run -->\n\n```sh\nx\n```\n"
        )

        blocks, stray = parse(text)

        assert [(b.mode, b.ready, b.commands) for b in blocks] == [
            ("start", "up", ["serve --port 1"]),
            (None, None, ["ls"]),
            (None, None, ["x"]),
        ]
        assert stray == [11]


def test_the_greengrass_configuration_example_passes_check_config(tmp_path):
    """The README's deployment configuration renders (render_config.py) to a valid agent config."""
    path = REPO / "packaging" / "greengrass" / "render_config.py"
    spec = importlib.util.spec_from_file_location("readme_render_config", path)
    assert spec is not None
    assert spec.loader is not None
    render_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_config)
    (example,) = [
        json.loads("\n".join(b.lines))
        for b in parse(README.read_text())[0]
        if b.language == "json" and '"agent"' in "\n".join(b.lines)
    ]
    config = tmp_path / "config.toml"
    config.write_text(render_config.render(render_config.apply_aliases(example)))
    env = {
        **reader_environment(tmp_path),
        "TUNNEL_AGENT_NOTIFY": "greengrass",
        "TUNNEL_AGENT_THING_NAME": "gg-core-7",
        "TUNNEL_AGENT_RUNTIME_DIR": str(tmp_path / "run"),
    }

    result = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )

    assert result.returncode == 0, result.stderr
    assert tomllib.loads(config.read_text())["limits"] == {
        "max_concurrent_tunnels": example["maxConcurrentTunnels"],
        "max_tunnel_lifetime": example["tunnelTimeoutSeconds"],
    }


# -- running the marked blocks -------------------------------------------------------------------


def scratch_copy(root: Path) -> Path:
    """The repository's files (tracked and new, not ignored) copied with their times."""
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    copy = root / "repo"
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    # The reader's `make venv`: the development venv, which make must find up to date.
    (copy / ".venv").symlink_to(REPO / ".venv")
    return copy


def reader_environment(home: Path) -> dict[str, str]:
    """The environment minus AWS and agent settings, a scratch HOME, the .venv first on PATH."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AWS_", "TUNNEL_AGENT_", "AWSIOT_", "VIRTUAL_ENV", "PYTEST_"))
    }
    real_cache = Path.home() / ".cache"
    env.update(
        HOME=str(home),
        PATH=f"{REPO / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
        # Downloads are cached where they were before (pip, make greengrass's wheels).
        PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR", str(real_cache / "pip")),
        IOT_TUNNEL_AGENT_CACHE=os.environ.get(
            "IOT_TUNNEL_AGENT_CACHE", str(real_cache / "iot-tunnel-agent")
        ),
    )
    return env


@dataclass
class Terminal:
    """A `start` block running in its own process group, as in a terminal of its own."""

    block: Block
    process: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout * SCALE
        while self.block.ready not in self.output():
            if self.process.poll() is not None:
                pytest.fail(
                    f"README line {self.block.line}: exited {self.process.returncode} before "
                    f"printing {self.block.ready!r}:\n{self.output()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"README line {self.block.line}: no {self.block.ready!r} within "
                    f"{timeout * SCALE:.0f} s:\n{self.output()[-3000:]}"
                )
            time.sleep(0.1)

    def interrupt(self, timeout: float) -> int | None:
        """Ctrl-C: SIGINT to the whole process group; None if it did not end."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout * SCALE)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            return None
        finally:
            self.handle.close()


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300 * SCALE,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"README line {block.line}: exited {result.returncode}:\n{output[-4000:]}")
    return output


def start_block(block: Block, cwd: Path, env: dict[str, str], logs: Path) -> Terminal:
    log = logs / f"line-{block.line}.log"
    handle = log.open("wb")
    process = subprocess.Popen(
        ["bash", "-e", "-c", block.script],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Terminal(block, process, log, handle)


class TestTheRunner:
    def test_a_command_failing_midway_fails_the_block(self, tmp_path):
        """A command failing in the middle of a block (bash -e) is reported with its line."""
        block = Block(line=7, language="sh", lines=("true", "false", "echo reached"))

        with pytest.raises(pytest.fail.Exception, match="README line 7: exited 1") as failure:
            run_block(block, tmp_path, dict(os.environ))

        assert "reached" not in str(failure.value)

    def test_a_terminal_that_ends_before_ready_fails(self, tmp_path):
        """A `start` block that exits without its ready text is a failure, not a wait."""
        block = Block(line=9, language="sh", lines=("echo starting",), mode="start", ready="up")
        terminal = start_block(block, tmp_path, dict(os.environ), tmp_path)

        with pytest.raises(pytest.fail.Exception, match="README line 9: exited 0 before"):
            terminal.wait_ready(10)
        assert terminal.interrupt(5) == 0


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_every_marked_block_runs(tmp_path):
    """In README order: `run` blocks exit 0, `start` blocks get ready and end 0 on Ctrl-C."""
    copy = scratch_copy(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    env = reader_environment(home)
    up_to_date = subprocess.run(
        ["make", "-q", ".venv/.installed"],
        cwd=copy,
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    if up_to_date.returncode != 0:
        pytest.fail("the .venv is older than pyproject.toml: run `make venv` first")
    terminals: list[Terminal] = []
    ran: list[int] = []
    try:
        for block in shell_blocks():
            if block.mode == "run":
                output = run_block(block, copy, env)
                expected = EXPECTED_OUTPUT.get(block.commands[0])
                assert expected is None or expected in output, (block.line, output[-3000:])
                ran.append(block.line)
            elif block.mode == "start":
                terminal = start_block(block, copy, env, tmp_path)
                terminals.append(terminal)
                terminal.wait_ready(60)
                ran.append(block.line)
    finally:
        # The last terminal opened is the first closed, as a reader would.
        endings = [(t, t.interrupt(30)) for t in reversed(terminals)]
    recipe = copy / "dist" / "greengrass" / "recipes" / "recipe.yaml"

    assert [(t.block.line, status) for t, status in endings] == [
        (t.block.line, 0) for t, _ in endings
    ], "\n\n".join(t.output()[-2000:] for t, _ in endings)
    assert len(ran) == len([b for b in shell_blocks() if b.mode])
    assert "s3://my-bucket/com.example.IoTTunnelAgent/" in recipe.read_text()
    assert re.search(r"^tunnel \S+ closed$", endings[0][0].output(), re.MULTILINE)
