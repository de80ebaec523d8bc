"""Tests for ``tunnel-agent emulator`` (agent/emulator/cli.py), mostly as real subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
from pathlib import Path

import pytest

from agent.daemon.settings import load_settings
from agent.emulator.cli import main
from tests.emulator.fixtures import SCALE, alive, refused


READY = "Ctrl-C to stop."
TUNNEL_AGENT = Path(sys.executable).with_name("tunnel-agent")


def _has_mosquitto_user() -> bool:
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return False
    return True


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


def _traversable_dir() -> Path:
    """A new directory under /tmp that the mosquitto account can reach (pytest's cannot)."""
    base = Path(tempfile.mkdtemp(prefix="emu-kill-", dir="/tmp"))
    base.chmod(0o755)
    (base / "emu").mkdir(mode=0o755)
    return base


def _owner(pid: int) -> int:
    return Path(f"/proc/{pid}").stat().st_uid


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen()
        except OSError:
            return False
    return True


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _is_dir(path: Path) -> bool:
    return path.is_dir()


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).parents[2],
    )


async def _read_until_ready(process: asyncio.subprocess.Process) -> list[str]:
    assert process.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(30 * SCALE):
        while True:
            raw = await process.stdout.readline()
            if not raw:
                stderr = await process.stderr.read() if process.stderr else b""
                pytest.fail(f"emulator exited before ready: {stderr.decode()[-2000:]}")
            lines.append(raw.decode().rstrip("\n"))
            if lines[-1] == READY:
                return lines


async def _stop(
    process: asyncio.subprocess.Process, signum: int | None = None
) -> tuple[int, str, str]:
    """Send ``signum`` (if any), wait for the exit, and return (status, stdout, stderr)."""
    if signum is not None and process.returncode is None:
        process.send_signal(signum)
    async with asyncio.timeout(30 * SCALE):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class TestForeground:
    async def test_prints_endpoints_writes_bundle_and_stops_on_sigterm(self, tmp_path):
        """The emulator prints its endpoints, writes 0600 secrets, and SIGTERM stops it cleanly."""
        directory = tmp_path / "emu"
        process = await _spawn("-m", "agent.emulator", "--dir", str(directory), "--thing", "dev1")
        try:
            lines = await _read_until_ready(process)
            running = json.loads((directory / "emulator.json").read_text())
            api = re.search(r"control plane  http://127\.0\.0\.1:(\d+)", "\n".join(lines))
            mqtt = re.search(r"mqtt           127\.0\.0\.1:(\d+) \(mutual TLS\)", "\n".join(lines))
            listening = api is not None and not await refused("127.0.0.1", int(api.group(1)))
        finally:
            code, out, err = await _stop(process, signal.SIGTERM)

        bundle = directory / "things" / "dev1"
        settings = load_settings(bundle / "config.toml")
        assert code == 0
        assert lines[0] == f"tunnel emulator running in {directory}"
        assert listening
        assert mqtt is not None
        assert int(mqtt.group(1)) == running["mqtt"][1] == settings.mqtt.port
        assert f"  thing dev1     {bundle / 'config.toml'}" in lines
        assert out.strip() == "tunnel emulator stopped"
        assert '"event": "emulator_stopped"' in err
        assert _mode(bundle / "key.pem") == 0o600
        assert _mode(directory / "operator.env") == 0o600
        assert _mode(directory / "credentials.json") == 0o600
        assert _mode(directory / "pki" / "ca.key") == 0o600
        assert _mode(directory) == 0o700
        assert not (directory / "emulator.json").exists()
        assert not alive(running["broker_pid"])

    async def test_sigint_and_temporary_directory(self, tmp_path):
        """Ctrl-C (SIGINT) stops cleanly, and the default temporary directory is removed."""
        process = await _spawn("-m", "agent.emulator", "--no-relay")
        try:
            lines = await _read_until_ready(process)
            directory = Path(lines[0].removeprefix("tunnel emulator running in "))
            existed = _is_dir(directory)
            relay_lines = [line for line in lines if "data plane" in line]
        finally:
            code, _out, _err = await _stop(process, signal.SIGINT)

        assert code == 0
        assert existed
        assert relay_lines == []
        assert not _is_dir(directory)

    @pytest.mark.parametrize(
        "broker_user",
        [
            None,
            pytest.param(
                "mosquitto",
                marks=pytest.mark.skipif(
                    os.geteuid() != 0 or not _has_mosquitto_user(),
                    reason="needs root and a mosquitto account",
                ),
            ),
        ],
    )
    async def test_kill_9_takes_the_broker_along(self, broker_user):
        """SIGKILL of the emulator ends its mosquitto at once and frees the MQTT port."""
        base = _traversable_dir()
        directory = base / "emu"
        extra = ["--broker-user", broker_user] if broker_user else []
        process = await asyncio.create_subprocess_exec(
            str(TUNNEL_AGENT),
            "emulator",
            "--dir",
            str(directory),
            "--thing",
            "dev1",
            *extra,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        broker_pid = None
        try:
            await _read_until_ready(process)
            running = json.loads((directory / "emulator.json").read_text())
            broker_pid = running["broker_pid"]
            host, port = running["mqtt"]
            backend_host, backend_port = running["mqtt_backend"]
            served = not await refused(host, port) and not await refused(backend_host, backend_port)
            broker_uid = _owner(broker_pid)
            process.kill()
            await _stop(process)
            waited = 0.0
            while not _gone(broker_pid) and waited < 5 * SCALE:
                await asyncio.sleep(0.05)
                waited += 0.05
        finally:
            if process.returncode is None:
                process.kill()
                await _stop(process)
            if broker_pid is not None and not _gone(broker_pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(broker_pid, signal.SIGKILL)
            shutil.rmtree(base, ignore_errors=True)

        assert process.returncode == -signal.SIGKILL
        assert served
        assert broker_uid == (pwd.getpwnam(broker_user).pw_uid if broker_user else os.geteuid())
        assert _gone(broker_pid)
        assert waited < 5 * SCALE
        assert _port_free(host, port)
        assert _port_free(backend_host, backend_port)

    async def test_startup_failure_exit_code(self, tmp_path):
        """A port already in use makes the emulator exit 1 with a message, leaving nothing."""
        blocker = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
        port = blocker.sockets[0].getsockname()[1]
        try:
            process = await _spawn(
                "-m", "agent.emulator", "--dir", str(tmp_path / "e"), "--api-port", str(port)
            )
            code, out, err = await _stop(process)
        finally:
            blocker.close()
            await blocker.wait_closed()

        assert code == 1
        assert "tunnel-agent emulator: cannot start:" in err
        assert "address already in use" in err
        assert READY not in out

    async def test_via_tunnel_agent(self, tmp_path):
        """`python -m agent emulator add-thing` reaches this CLI through the main dispatcher."""
        process = await _spawn("-m", "agent", "emulator", "add-thing", "t1", "--dir", str(tmp_path))
        code, out, _err = await _stop(process)

        assert code == 0
        assert out.splitlines()[0] == "thing t1"
        assert (tmp_path / "things" / "t1" / "cert.pem").is_file()


class TestAddThing:
    def test_offline(self, tmp_path, capsys):
        """Without a running emulator the bundle is written; config.toml waits for a start."""
        code = main(["add-thing", "dev2", "--dir", str(tmp_path), "--service", "WEB=8080"])
        out = capsys.readouterr().out

        bundle = tmp_path / "things" / "dev2"
        assert code == 0
        assert f"  key          {bundle / 'key.pem'}" in out
        assert f"  config       {bundle / 'config.toml'} (written when the emulator starts)" in out
        assert _mode(bundle / "key.pem") == 0o600
        assert json.loads((bundle / "services.json").read_text()) == {"WEB": "8080"}

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["add-thing", "a/b", "--dir", "{d}"], "invalid thing name"),
            (["add-thing", "x", "--dir", "{d}", "--service", "nope"], "expected NAME=TARGET"),
            (["add-thing", "x"], "--dir"),
            (["--api-port", "70000"], "must be 0..65535"),
            (["--bogus"], "unrecognized arguments"),
        ],
    )
    def test_usage_errors(self, tmp_path, capsys, argv, message):
        """Bad arguments exit with status 2 and say what is wrong."""
        code = main([arg.format(d=tmp_path) for arg in argv])
        err = capsys.readouterr().err

        assert code == 2
        assert message in err

    def test_help(self, capsys):
        """--help prints usage and exits 0."""
        code = main(["--help"])

        assert code == 0
        assert "add-thing" in capsys.readouterr().out
