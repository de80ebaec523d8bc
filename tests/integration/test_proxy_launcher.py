"""The proxy launcher (proxy.launcher = true): forked proxies, real processes end to end.

The emulator runs in a thread; `tunnel-agent run` is a child process; the operator side is a
real source `tunnel-localproxy`; the device's service is a TCP echo server. Bytes are hashed.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.integration.dataplane import connect
from tests.integration.test_agent_e2e import alive, children, wait_until
from tests.integration.test_agent_restart import exchange, roundtrip


pytestmark = pytest.mark.integration


def launcher_pid(agent) -> int:
    """The agent's only child: the launcher (its proxies are the launcher's children)."""
    (pid,) = wait_until(lambda: children(agent.pid), 10, "the launcher")
    assert b"agent.proxy.launcher" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return pid


def ours() -> list[int]:
    """Every live launcher or forked proxy on the machine that belongs to this test run.

    Other checkouts' test runs on the same machine have launchers too: only those started
    in this run's working directory count.
    """
    here = Path.cwd()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
                cwd = (entry / "cwd").readlink()
            except OSError:
                continue
            if b"agent.proxy.launcher" in cmdline and cwd == here and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def one_tunnel(world, *flags: str) -> tuple[Any, int, int, dict[str, Any]]:
    """An agent with one connected ECHO tunnel: the agent, launcher pid, proxy pid, tunnel."""
    agent = world.agent(*flags)
    launcher = launcher_pid(agent)
    tunnel = world.open(["ECHO"])
    world.wait_connected(tunnel["tunnelId"])
    (proxy,) = agent.proxy_pids()
    return agent, launcher, proxy, tunnel


def test_proxies_are_forked_by_the_launcher(world):
    _, launcher, proxy, tunnel = one_tunnel(world)
    source = world.source(tunnel["sourceAccessToken"], ["ECHO"])

    sent, received = roundtrip(source.port("ECHO"), seed=1)

    assert sent == received
    stat = Path(f"/proc/{proxy}/stat").read_text().rsplit(")", 1)[1].split()
    assert int(stat[1]) == launcher  # parent: the launcher
    assert int(stat[2]) == proxy  # leads its own process group


def test_launcher_killed_is_restarted_and_running_tunnels_are_unaffected(world):
    agent, launcher, proxy, tunnel = one_tunnel(world)
    source = world.source(tunnel["sourceAccessToken"], ["ECHO"])
    with connect(source.port("ECHO")) as sock:
        before = exchange(sock, 128 * 1024, seed=2)

        os.kill(launcher, signal.SIGKILL)
        agent.wait_event("proxy_launcher_exited")
        agent.wait_event("proxy_launcher_started", 2)
        during = exchange(sock, 256 * 1024, seed=3)  # same connection, same proxy
    after = roundtrip(source.port("ECHO"), seed=4)
    second = world.open(["ECHO"])
    world.wait_connected(second["tunnelId"])
    new_launcher = launcher_pid(agent)

    assert before[0] == before[1]
    assert during[0] == during[1]
    assert after[0] == after[1]
    assert agent.proxy_pids()[0] == proxy
    assert alive(proxy)
    assert new_launcher != launcher
    assert agent.status()["tunnels"][0]["restarts"] == 0


def test_forked_proxy_crash_is_restarted_with_its_client_token(world):
    agent = world.agent()
    tunnel = world.open(["ECHO"])
    world.wait_connected(tunnel["tunnelId"])
    (proxy,) = agent.proxy_pids()
    bound = world.emulator.store.get(tunnel["tunnelId"]).destination.client_token
    source = world.source(tunnel["sourceAccessToken"], ["ECHO"])

    os.kill(proxy, signal.SIGKILL)
    (exited,) = agent.wait_event("proxy_exited")
    agent.wait_event("proxy_restarted")
    wait_until(lambda: agent.proxy_pids() and agent.proxy_pids()[0] != proxy, what="new pid")
    world.wait_connected(tunnel["tunnelId"])
    after = wait_until(lambda: (r := roundtrip(source.port("ECHO"), seed=5)) and r, 20, "echo")

    assert exited["returncode"] == -signal.SIGKILL  # the status came from the launcher
    assert after[0] == after[1]
    # The relay accepted the restarted proxy: it presented the bound client token.
    assert world.emulator.store.get(tunnel["tunnelId"]).destination.client_token == bound
    assert not alive(proxy)


@pytest.mark.parametrize("victim", ["agent", "launcher_then_agent"])
def test_agent_kill_9_leaves_no_process(world, victim):
    agent = world.agent()
    launcher = launcher_pid(agent)
    tunnels = [world.open(["ECHO"]) for _ in range(2)]
    for tunnel in tunnels:
        world.wait_connected(tunnel["tunnelId"])
    proxies = agent.proxy_pids()
    if victim == "launcher_then_agent":
        os.kill(launcher, signal.SIGKILL)
        agent.wait_event("proxy_launcher_started", 2)

    agent.process.kill()
    agent.process.wait()
    wait_until(lambda: not any(alive(pid) for pid in proxies), 5, "the proxies gone")
    wait_until(lambda: not alive(launcher), 5, "the launcher gone")
    wait_until(lambda: not ours(), 5, "no launcher or proxy left")

    assert len(proxies) == 2


def test_fifty_tunnels_opened_and_closed_keep_the_launcher_flat(world):
    agent = world.agent()
    launcher = launcher_pid(agent)
    readings = []
    for round_ in range(50):
        tunnel = world.open(["ECHO"])
        world.wait_connected(tunnel["tunnelId"])
        world.client.close_tunnel(tunnelId=tunnel["tunnelId"])
        agent.wait_event("tunnel_ended", round_ + 1, timeout=20)
        if round_ in {9, 49}:
            readings.append(rss_kib(launcher))

    assert launcher_pid(agent) == launcher
    assert len(agent.events("proxy_exited")) == 50
    assert readings[1] - readings[0] < 1024, readings  # under 1 MiB over 40 tunnels
    assert not [p for p in ours() if p != launcher]  # every forked proxy reaped


def test_launcher_off_spawns_plain_processes(world):
    agent = world.agent("--no-proxy-launcher")
    tunnel = world.open(["ECHO"])
    world.wait_connected(tunnel["tunnelId"])
    (proxy,) = agent.proxy_pids()
    source = world.source(tunnel["sourceAccessToken"], ["ECHO"])

    sent, received = roundtrip(source.port("ECHO"), seed=7)

    assert sent == received
    assert children(agent.pid) == [proxy]
    assert b"agent.proxy" in Path(f"/proc/{proxy}/cmdline").read_bytes()
    assert b"agent.proxy.launcher" not in Path(f"/proc/{proxy}/cmdline").read_bytes()
    assert b"--token-fd" in Path(f"/proc/{proxy}/cmdline").read_bytes()


KSM = Path("/sys/kernel/mm/ksm")


def ksm_stat(pid: int) -> dict[str, str]:
    """``/proc/PID/ksm_stat`` as name -> value."""
    lines = Path(f"/proc/{pid}/ksm_stat").read_text().splitlines()
    return {name.rstrip(":"): value for name, value in (line.split() for line in lines)}


@pytest.fixture
def ksmd_running():
    """The kernel's ksmd on and scanning fast for one test; its settings restored after."""
    names = ("run", "pages_to_scan", "sleep_millisecs")
    assert KSM.is_dir(), "this kernel has no KSM (CONFIG_KSM): the merging test needs it"
    before = {name: (KSM / name).read_text().strip() for name in names}
    (KSM / "pages_to_scan").write_text("2000")
    (KSM / "sleep_millisecs").write_text("20")
    (KSM / "run").write_text("1")
    yield
    for name in names:
        (KSM / name).write_text(before[name])


def test_launcher_and_its_proxies_offer_their_pages_to_ksm(world):
    """proxy.merge_pages (default): the launcher opts in and its forked proxies inherit it."""
    agent, launcher, proxy, _ = one_tunnel(world)

    assert ksm_stat(launcher)["ksm_merge_any"] == "yes"
    assert ksm_stat(proxy)["ksm_merge_any"] == "yes"
    (started,) = agent.events("proxy_launcher_started")
    assert started["ksm"] == ("running" if (KSM / "run").read_text().strip() == "1" else "stopped")


def test_merge_pages_off_offers_nothing(world):
    agent, launcher, proxy, _ = one_tunnel(world, "--no-proxy-merge-pages")

    assert ksm_stat(launcher)["ksm_merge_any"] == "no"
    assert ksm_stat(proxy)["ksm_merge_any"] == "no"
    assert "ksm" not in agent.events("proxy_launcher_started")[0]


@pytest.mark.usefixtures("ksmd_running")
def test_with_ksmd_proxies_share_identical_pages_and_carry_every_byte(world):
    """Merged pages are copy-on-write again: a proxy that writes to one gets its own copy."""
    agent = world.agent()
    tunnels = [world.open(["ECHO"]) for _ in range(4)]
    for tunnel in tunnels:
        world.wait_connected(tunnel["tunnelId"])
    proxies = agent.proxy_pids()
    assert len(proxies) == 4

    # At least 1 MiB of each proxy is mapped from a shared copy (the bench: about 4 MiB).
    wait_until(
        lambda: all(int(ksm_stat(pid)["ksm_merging_pages"]) >= 256 for pid in proxies),
        60,
        "pages merged in every proxy",
        lambda: {pid: ksm_stat(pid) for pid in proxies},
    )
    digests = [
        roundtrip(world.source(t["sourceAccessToken"], ["ECHO"]).port("ECHO"), 1 << 20, seed=i)
        for i, t in enumerate(tunnels)
    ]

    assert all(sent == received for sent, received in digests)
    assert agent.proxy_pids() == proxies
    assert all(alive(pid) for pid in proxies)
