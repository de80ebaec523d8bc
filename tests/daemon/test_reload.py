"""Reload by re-exec, in process: what happens when the exec does not (real proxy children).

The successful exec is covered by tests/integration/test_agent_restart.py (a real agent
process re-executing itself); here the exec is made to fail, or a stop request overtakes it,
and the daemon must carry on supervising its proxies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from typing import Self

import pytest

from agent.daemon import reexec
from agent.daemon.lifecycle import Daemon
from agent.daemon.reexec import ReexecPlan
from agent.daemon.supervisor import SubprocessLauncher
from agent.daemon.tunnels import Limits, SpawnConfig, TunnelManager
from tests.fakes import FakeNotificationSource, notification, read_runs, wait_for, write_fake_proxy


TOKEN = "AQGAAXiSecretReloadToken_0123456789"


class ReenterableSource(FakeNotificationSource):
    """A fake source that can be connected again after a disconnect (as MQTT can)."""

    async def __aenter__(self) -> Self:
        self._queue = asyncio.Queue()
        return await super().__aenter__()


@pytest.fixture
def proxy_dir(tmp_path):
    directory = tmp_path / "proxy"
    write_fake_proxy(directory)
    yield directory
    for run in read_runs(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(run["pid"], signal.SIGKILL)


def make_daemon(tmp_path, proxy_dir, executable: str) -> tuple[Daemon, ReenterableSource]:
    source = ReenterableSource()
    manager = TunnelManager(
        launcher=SubprocessLauncher(),
        services={"SSH": "22"},
        limits=Limits(),
        options=SpawnConfig(
            command=(str(proxy_dir / "fake-localproxy"),),
            extra_env={"FAKE_PROXY_DIR": str(proxy_dir)},
            backoff_initial=0.01,
            backoff_max=0.05,
        ),
    )
    plan = ReexecPlan(
        executable=executable,
        argv=(executable,),
        preflight=(sys.executable, "-c", "pass"),
        runtime_dir=tmp_path,
    )
    return Daemon(source=source, manager=manager, reexec_plan=plan), source


async def running_pid(daemon: Daemon, proxy_dir) -> int:
    """The running proxy's pid, once it has set up its signal handlers."""
    await wait_for(lambda: daemon._manager.tunnels() and daemon._manager.tunnels()[0].pid)
    pid = daemon._manager.tunnels()[0].pid
    assert pid is not None
    await wait_for((proxy_dir / f"ready-{pid}").exists)
    return pid


async def test_failed_exec_keeps_supervising(tmp_path, proxy_dir, capture):
    """Execv fails: the same proxy is adopted back, watched (a kill restarts it), MQTT back."""
    daemon, source = make_daemon(tmp_path, proxy_dir, "/nonexistent/tunnel-agent")
    task = asyncio.create_task(daemon.run())
    await wait_for(lambda: source.entered)
    source.publish(notification(TOKEN))
    pid = await running_pid(daemon, proxy_dir)

    daemon.request_reload()
    await wait_for(lambda: source.entered == 2 and len(capture.named("agent_started")) == 2)
    adopted = daemon._manager.tunnels()[0].pid
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: capture.named("proxy_restarted"))
    daemon.request_stop()
    code = await asyncio.wait_for(task, 10)

    assert adopted == pid
    assert capture.named("agent_reload_failed")[0]["stage"] == "exec"
    assert capture.named("agent_reload_failed")[0]["error"] == "No such file or directory"
    assert capture.named("tunnel_adopted")[0]["pid"] == pid
    assert capture.named("proxy_exited")[0]["returncode"] == -signal.SIGKILL
    assert source.exited == 2
    assert not mask & reexec.HELD_SIGNALS
    assert reexec.HANDOFF_ENV not in os.environ
    assert code == 0


async def test_stop_overtakes_the_exec(tmp_path, proxy_dir, capture, monkeypatch):
    """A stop request after the proxies were detached cancels the exec; the agent stops."""
    daemon, source = make_daemon(tmp_path, proxy_dir, "/nonexistent/tunnel-agent")
    executed: list[int] = []
    monkeypatch.setattr(reexec, "execute", lambda _plan, fd: executed.append(fd))
    detach = daemon._manager.detach

    async def detach_then_stop():
        handoff = await detach()
        daemon.request_stop()
        return handoff

    monkeypatch.setattr(daemon._manager, "detach", detach_then_stop)
    task = asyncio.create_task(daemon.run())
    await wait_for(lambda: source.entered)
    source.publish(notification(TOKEN))
    pid = await running_pid(daemon, proxy_dir)

    daemon.request_reload()
    code = await asyncio.wait_for(task, 10)
    (run,) = read_runs(proxy_dir)

    assert executed == []
    assert capture.named("agent_reload_cancelled")
    assert capture.named("tunnel_ended")[0]["reason"] == "shutdown"
    assert (proxy_dir / f"term-{pid}").exists()  # stopped with SIGTERM, as at any shutdown
    assert run["pid"] == pid
    assert code == 0
