"""Tests for agent.daemon.handoff and the adoption of real child processes."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import time

import pytest
import structlog
from pydantic import SecretStr

from agent.daemon.children import Child, ChildExit, is_our_child, spawn
from agent.daemon.handoff import HANDOFF_ENV, Handoff, HandoffTunnel, read_handoff, write_handoff
from agent.daemon.records import TunnelRecord
from agent.daemon.supervisor import ProxySpec, SubprocessLauncher
from tests.fakes import MS, wait_for


TOKEN = "AQGAAXiSecretHandoffToken_0123456789"
CLIENT = "Cl1entT0ken-handoffhandoffhandoffhandoff0123456789"

# A stand-in proxy: a line on SIGUSR1, exit 3 on SIGUSR2, exit 0 on SIGTERM.
CHILD = """
import signal, sys, time
signal.signal(signal.SIGUSR1, lambda *_: print("ping", flush=True))
signal.signal(signal.SIGUSR2, lambda *_: sys.exit(3))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("up", flush=True)
while True:
    time.sleep(60)
"""


def record() -> TunnelRecord:
    return TunnelRecord(
        key="0123abcd",
        services=("SSH",),
        region="us-east-1",
        endpoint=None,
        token=SecretStr(TOKEN),
        client_token=CLIENT,
        started_at=time.time(),
        expires_at=time.time() + 60,
        generation=1,
    )


class TestFile:
    def test_round_trip(self, tmp_path):
        """Written to an anonymous 0600 file; read back once through the variable, then gone."""
        handoff = Handoff(
            (HandoffTunnel(record(), Child(4242, 7, 8), 2), HandoffTunnel(record(), None, 0)),
            recent=("digest-1", "digest-2"),
        )
        fd = write_handoff(handoff, tmp_path)
        info = os.fstat(fd)
        inheritable = os.get_inheritable(fd)
        environ = {HANDOFF_ENV: str(fd)}

        read = read_handoff(environ)

        assert read == handoff
        assert read.intact
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_nlink == 0  # no name in the runtime directory
        assert list(tmp_path.iterdir()) == []
        assert inheritable
        assert environ == {}
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)

    def test_none_without_variable(self):
        assert read_handoff({}) is None

    @pytest.mark.parametrize("value", ["x", "999"])
    def test_unusable_is_reported(self, value, capture):
        """A hand-off that cannot be read: reported, and not intact (its children are strays)."""
        handoff = read_handoff({HANDOFF_ENV: value})

        assert handoff is not None
        assert not handoff.intact
        assert handoff.tunnels == ()
        assert capture.named("handoff_unreadable")[0]["level"] == "error"

    def test_foreign_content_is_reported(self, tmp_path, capture):
        path = tmp_path / "f"
        path.write_text('{"magic": "something else", "token": "' + TOKEN + '"}')
        path.chmod(0o600)
        fd = os.open(path, os.O_RDONLY)

        handoff = read_handoff({HANDOFF_ENV: str(fd)})

        assert handoff is not None
        assert not handoff.intact
        assert capture.named("handoff_unreadable")[0]["reason"] == "not a hand-off"
        assert TOKEN not in capture.text


@pytest.fixture
async def launched():
    """A real child started by the SubprocessLauncher; killed at the end whatever happens."""
    pids: list[int] = []

    async def factory():
        spec = ProxySpec(argv=(sys.executable, "-c", CHILD), env=dict(os.environ), stop_grace=1.0)
        handle = await SubprocessLauncher().launch(spec, log=structlog.get_logger())
        pids.append(handle.pid)
        return handle

    yield factory
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # noqa: ASYNC222 - cleanup of a killed child: instant
        except (ProcessLookupError, ChildProcessError):
            pass


def lines(capture, pid: int) -> list[str]:
    return [e["line"] for e in capture.named("proxy_output") if e["pid"] == pid]


class TestAdoption:
    async def test_detach_then_adopt_a_real_process(self, launched, capture):
        """Detached: still running, pipes handed on. Adopted: output logged, exit status seen."""
        handle = await launched()
        await wait_for(lambda: lines(capture, handle.pid) == ["up"])

        child = await handle.detach()
        assert child is not None
        os.kill(child.pid, signal.SIGUSR1)  # written while nobody reads: waits in the pipe
        await asyncio.sleep(50 * MS)
        unread = lines(capture, child.pid)
        adopted = await SubprocessLauncher().adopt(
            child, log=structlog.get_logger(), stop_grace=1.0
        )
        assert adopted is not None
        inheritable = os.get_inheritable(child.stdout)
        await wait_for(lambda: lines(capture, child.pid) == ["up", "ping"])
        os.kill(child.pid, signal.SIGUSR1)
        await wait_for(lambda: lines(capture, child.pid) == ["up", "ping", "ping"])
        os.kill(child.pid, signal.SIGUSR2)
        code = await asyncio.wait_for(adopted.wait(), 5)

        assert unread == ["up"]
        assert child.pid == handle.pid
        assert not inheritable
        assert code == 3
        assert adopted.returncode == 3
        assert not is_our_child(child.pid)

    async def test_stop_an_adopted_process(self, launched, capture):
        """stop() works on an adopted proxy as on a launched one (SIGTERM to its group)."""
        handle = await launched()
        await wait_for(lambda: lines(capture, handle.pid) == ["up"])
        child = await handle.detach()
        assert child is not None
        adopted = await SubprocessLauncher().adopt(
            child, log=structlog.get_logger(), stop_grace=1.0
        )
        assert adopted is not None

        code = await asyncio.wait_for(adopted.stop(), 5)

        assert code == 0

    async def test_detach_after_exit(self, launched):
        """A proxy that has exited cannot be handed on."""
        handle = await launched()
        os.kill(handle.pid, signal.SIGUSR2)
        await asyncio.wait_for(handle.wait(), 5)

        assert await handle.detach() is None

    async def test_not_our_child(self):
        """A pid that is not our child is refused, and the pipes given with it are closed."""
        read_end, write_end = os.pipe()
        os.close(write_end)

        adopted = await SubprocessLauncher().adopt(
            Child(1, read_end, read_end), log=structlog.get_logger(), stop_grace=1.0
        )

        assert adopted is None
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(read_end)


class TestChildExit:
    async def test_status(self):
        """The exit status of a child, from its pidfd; negative for a signal."""
        first = spawn([sys.executable, "-c", "raise SystemExit(7)"], env=os.environ)
        second = spawn([sys.executable, "-c", "import time; time.sleep(60)"], env=os.environ)
        for fd in (first.stdout, first.stderr, second.stdout, second.stderr):
            os.close(fd)
        exits = ChildExit(first.pid), ChildExit(second.pid)
        os.kill(second.pid, signal.SIGKILL)

        codes = await asyncio.wait_for(asyncio.gather(*(e.status for e in exits)), 5)

        assert codes == [7, -signal.SIGKILL]

    async def test_reaped_elsewhere(self):
        """A child reaped behind our back reports 255 (status lost) rather than hanging."""
        child = spawn([sys.executable, "-c", "pass"], env=os.environ)
        for fd in (child.stdout, child.stderr):
            os.close(fd)
        os.waitpid(child.pid, 0)  # noqa: ASYNC222 - the child exits at once

        code = await asyncio.wait_for(ChildExit(child.pid).status, 5)

        assert code == 255
