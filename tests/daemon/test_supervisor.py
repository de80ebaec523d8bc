"""Tests for agent.daemon.supervisor: argv/env building and a real proxy child process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog

from agent.daemon.supervisor import (
    ProxySpec,
    SubprocessLauncher,
    build_argv,
    build_env,
    new_client_token,
    proxy_command,
)
from agent.exceptions import ProxyStartError
from agent.logging import secrets
from tests.fakes import MS, read_runs, wait_for, write_fake_proxy


TOKEN = "AQGAAXiSecretTunnelAccessToken_0123456789"
CLIENT = "Cl1entT0ken-abcdefghijklmnopqrstuvwxyz0123456789"


def alive(pid: int) -> bool:
    """Tell whether pid exists and is not a zombie (init may be slow to reap in containers)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def read_cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.fixture
def proxy_dir(tmp_path):
    directory = tmp_path / "proxy"
    write_fake_proxy(directory)
    yield directory
    for pid in [run["pid"] for run in read_runs(directory)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def spec_for(directory: Path, *, grace: float = 2.0, echo: bool = False, base=None) -> ProxySpec:
    argv = build_argv(
        [str(directory / "fake-localproxy")],
        services={"SSH": "22", "HTTP": "127.0.0.1:8080"},
        region="us-east-1",
    )
    extra = {"FAKE_PROXY_DIR": str(directory)} | ({"FAKE_PROXY_ECHO_TOKEN": "1"} if echo else {})
    env = build_env(token=TOKEN, client_token=CLIENT, extra_env=extra, base=base)
    return ProxySpec(argv=tuple(argv), env=env, stop_grace=grace)


class TestCommandLine:
    def test_region_form(self):
        """The argv is binary, -d map in order, -r region; nothing else by default."""
        argv = build_argv(
            ["lp"], services={"SSH": "22", "HTTP": "127.0.0.1:8080"}, region="eu-west-1"
        )

        assert argv == ["lp", "-d", "SSH=22,HTTP=127.0.0.1:8080", "-r", "eu-west-1"]

    def test_endpoint_form(self, tmp_path):
        """An endpoint override replaces -r; -c, -k and extra args follow."""
        argv = build_argv(
            ["lp"],
            services={"DB": "/run/db.sock"},
            region="eu-west-1",
            endpoint="127.0.0.1:8443",
            ca=tmp_path / "ca.pem",
            no_verify=True,
            extra_args=("-v", "5"),
        )

        assert argv == [
            "lp",
            "-d",
            "DB=/run/db.sock",
            "-e",
            "127.0.0.1:8443",
            "-c",
            f"{tmp_path}/ca.pem",
            "-k",
            "-v",
            "5",
        ]

    def test_bundled_command(self, tmp_path):
        """The bundled proxy runs as this interpreter's -m agent.proxy; a path runs as is."""
        assert proxy_command("bundled") == [sys.executable, "-m", "agent.proxy"]
        assert proxy_command(tmp_path / "localproxy") == [f"{tmp_path}/localproxy"]


class TestEnvironment:
    def test_tokens_and_allow_list(self):
        """The child gets both tokens, an allow-list, extra env and HTTPS_PROXY; nothing else."""
        base = {
            "PATH": "/usr/bin",
            "LC_ALL": "C",
            "TUNNEL_AGENT_MQTT__KEY": "/k",
            "NOTIFY_SOCKET": "/run/systemd/notify",
            "AWS_SECRET_ACCESS_KEY": "nope",
        }

        env = build_env(
            token=TOKEN,
            client_token=CLIENT,
            extra_env={"X": "1"},
            http_proxy="http://p:3128",
            base=base,
        )

        assert env == {
            "PATH": "/usr/bin",
            "LC_ALL": "C",
            "X": "1",
            "HTTPS_PROXY": "http://p:3128",
            "AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN,
            "AWSIOT_TUNNEL_CLIENT_TOKEN": CLIENT,
            "AWSIOT_CLIENT_TOKEN": CLIENT,  # the name the AWS localproxy reads
        }

    def test_extra_env_cannot_override_tokens(self):
        """Tokens are set last, so no other source can replace them."""
        env = build_env(
            token=TOKEN, client_token=CLIENT, extra_env={"AWSIOT_TUNNEL_ACCESS_TOKEN": "x"}, base={}
        )

        assert env["AWSIOT_TUNNEL_ACCESS_TOKEN"] == TOKEN

    def test_spec_repr_hides_env(self, tmp_path):
        """A ProxySpec's repr never shows the environment."""
        assert TOKEN not in repr(spec_for(tmp_path))


class TestClientToken:
    def test_shape(self):
        """Client tokens are 64 characters of [a-zA-Z0-9-] by default, and fresh each time."""
        tokens = {new_client_token() for _ in range(200)}

        assert len(tokens) == 200
        assert all(len(t) == 64 for t in tokens)
        assert set("".join(tokens)) <= set(
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-"
        )

    @pytest.mark.parametrize(("length", "ok"), [(31, False), (32, True), (128, True), (129, False)])
    def test_length_bounds(self, length, ok):
        """Lengths outside 32..128 are refused (docs/protocol.md §3.1)."""
        if ok:
            assert len(new_client_token(length)) == length
        else:
            with pytest.raises(ValueError, match="32 to 128"):
                new_client_token(length)


class TestProcess:
    async def test_argv_env_and_cmdline(self, proxy_dir, capture):
        """The child gets the argv and tokens; /proc/PID/cmdline never contains a token."""
        handle = await SubprocessLauncher().launch(spec_for(proxy_dir), log=structlog.get_logger())
        await wait_for((proxy_dir / f"ready-{handle.pid}").exists)
        cmdline = read_cmdline(handle.pid)
        await handle.stop()
        (run,) = read_runs(proxy_dir)

        assert run["argv"][1:] == ["-d", "SSH=22,HTTP=127.0.0.1:8080", "-r", "us-east-1"]
        assert run["env"]["AWSIOT_TUNNEL_ACCESS_TOKEN"] == TOKEN
        assert run["env"]["AWSIOT_TUNNEL_CLIENT_TOKEN"] == CLIENT
        assert run["mode"] == 0o600
        assert TOKEN.encode() not in cmdline
        assert CLIENT.encode() not in cmdline
        assert TOKEN not in capture.text

    async def test_own_process_group(self, proxy_dir):
        """Each proxy leads its own process group (Ctrl-C reaches only the agent)."""
        handle = await SubprocessLauncher().launch(spec_for(proxy_dir), log=structlog.get_logger())
        await wait_for((proxy_dir / f"ready-{handle.pid}").exists)
        await handle.stop()
        (run,) = read_runs(proxy_dir)

        assert run["pgid"] == run["pid"] == handle.pid
        assert run["ppid"] == os.getpid()

    async def test_output_logged_with_context(self, proxy_dir, capture):
        """Child output lines are logged with the bound tunnel context and the pid."""
        secrets.register(TOKEN)
        try:
            with structlog.contextvars.bound_contextvars(tunnel_key="ab12cd34"):
                handle = await SubprocessLauncher().launch(
                    spec_for(proxy_dir, echo=True),
                    log=structlog.get_logger().bind(services=["SSH"]),
                )
                await wait_for(lambda: len(capture.named("proxy_output")) >= 2)
                await handle.stop()
        finally:
            secrets.unregister(TOKEN)
        lines = {e["stream"]: e for e in capture.named("proxy_output")}

        assert lines["stdout"]["line"] == "fake proxy up wait"
        assert lines["stdout"]["tunnel_key"] == "ab12cd34"
        assert lines["stdout"]["services"] == ["SSH"]
        assert lines["stdout"]["pid"] == handle.pid
        assert lines["stderr"]["line"] == "token is **********"
        assert TOKEN not in capture.text

    async def test_exit_status(self, proxy_dir):
        """wait() returns the child's exit status, to several concurrent waiters."""
        (proxy_dir / "plan").write_text("exit:3")
        handle = await SubprocessLauncher().launch(spec_for(proxy_dir), log=structlog.get_logger())

        results = await asyncio.gather(handle.wait(), handle.wait())

        assert results == [3, 3]
        assert handle.returncode == 3

    async def test_stop_sigterm(self, proxy_dir):
        """stop() sends SIGTERM and reaps a proxy that honours it."""
        handle = await SubprocessLauncher().launch(spec_for(proxy_dir), log=structlog.get_logger())
        await wait_for((proxy_dir / f"ready-{handle.pid}").exists)

        returncode = await handle.stop()

        assert returncode == 0
        assert (proxy_dir / f"term-{handle.pid}").exists()
        assert not alive(handle.pid)

    async def test_stop_sigkill_after_grace(self, proxy_dir, capture):
        """A proxy ignoring SIGTERM is killed after the grace period."""
        (proxy_dir / "plan").write_text("ignore-term")
        grace = 300 * MS
        handle = await SubprocessLauncher().launch(
            spec_for(proxy_dir, grace=grace), log=structlog.get_logger()
        )
        await wait_for(lambda: capture.named("proxy_output"))
        started = time.monotonic()

        returncode = await handle.stop()
        elapsed = time.monotonic() - started

        assert returncode == -signal.SIGKILL
        assert grace <= elapsed < grace + 2
        assert capture.named("proxy_kill")[0]["reason"] == "grace_expired"

    async def test_missing_binary(self, tmp_path):
        """A binary that does not exist raises ProxyStartError naming only the binary."""
        spec = ProxySpec(
            argv=(str(tmp_path / "nope"), "-r", "us-east-1"),
            env={"AWSIOT_TUNNEL_ACCESS_TOKEN": TOKEN},
        )

        with pytest.raises(ProxyStartError) as info:
            await SubprocessLauncher().launch(spec, log=structlog.get_logger())

        assert str(info.value) == f"cannot start {tmp_path}/nope: No such file or directory"


ORPHAN_PARENT = """
import asyncio, sys
import structlog
from pathlib import Path
from agent.daemon.supervisor import ProxySpec, SubprocessLauncher, build_env

async def main():
    directory = Path(sys.argv[1])
    extra = {"FAKE_PROXY_DIR": str(directory)}
    env = build_env(token="t" * 40, client_token="c" * 40, extra_env=extra)
    spec = ProxySpec(argv=(str(directory / "fake-localproxy"), "-r", "us-east-1"), env=env)
    handle = await SubprocessLauncher().launch(spec, log=structlog.get_logger())
    print(handle.pid, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


class TestParentDeath:
    def test_no_orphan_after_kill_9(self, proxy_dir):
        """SIGKILL of the agent makes the kernel SIGTERM its proxy (PR_SET_PDEATHSIG)."""
        parent = subprocess.Popen(
            [sys.executable, "-c", ORPHAN_PARENT, str(proxy_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert parent.stdout is not None
            pid = int(parent.stdout.readline())
            deadline = time.monotonic() + 5000 * MS
            # Ready = its SIGTERM handler is installed (it then records the signal).
            while not (proxy_dir / f"ready-{pid}").exists() and time.monotonic() < deadline:
                time.sleep(10 * MS)
            parent.kill()
            parent.wait()
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(10 * MS)

            assert not alive(pid)
            assert (proxy_dir / f"term-{pid}").exists()
        finally:
            parent.kill()
            parent.wait()
            if parent.stdout is not None:
                parent.stdout.close()
