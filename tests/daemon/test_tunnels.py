"""Tests for agent.daemon.tunnels: admission policy, lifetime and restart policy (fake launcher)."""

from __future__ import annotations

import asyncio
import signal

import pytest
from pydantic import SecretStr

from agent.daemon.notification import TunnelRequest
from agent.daemon.tunnels import Limits, Outcome, SpawnConfig, TunnelManager
from agent.logging import secrets
from tests.fakes import MS, FakeProxyLauncher, wait_for


SERVICES = {"SSH": "22", "HTTP": "127.0.0.1:8080", "VNC": "5900"}


def request(
    token: str = "tokenA-0123456789",  # noqa: S107 - a test token
    services=("SSH",),
    region="us-east-1",
) -> TunnelRequest:
    return TunnelRequest(token=SecretStr(token), region=region, services=tuple(services))


@pytest.fixture
def launcher():
    return FakeProxyLauncher()


@pytest.fixture
async def make(launcher):
    managers: list[TunnelManager] = []

    def factory(limits: Limits | None = None, **options) -> TunnelManager:
        opts = {
            "command": ("localproxy",),
            "backoff_initial": 10 * MS,
            "backoff_max": 40 * MS,
        } | options
        manager = TunnelManager(
            launcher=launcher,
            services=SERVICES,
            limits=limits or Limits(),
            options=SpawnConfig(**opts),
        )
        managers.append(manager)
        return manager

    yield factory
    for manager in managers:
        await manager.close(grace=1)


class TestOpen:
    async def test_started(self, make, launcher, capture):
        """An accepted request spawns one proxy: -d for its services, tokens in the env."""
        manager = make()

        outcome = await manager.open(request(services=("HTTP", "SSH")))
        await wait_for(lambda: launcher.proxies)
        (proxy,) = launcher.proxies
        (info,) = manager.tunnels()

        assert outcome is Outcome.STARTED
        assert proxy.spec.argv == (
            "localproxy",
            "-d",
            "HTTP=127.0.0.1:8080,SSH=22",
            "-r",
            "us-east-1",
        )
        assert proxy.spec.env["AWSIOT_TUNNEL_ACCESS_TOKEN"] == "tokenA-0123456789"
        assert len(proxy.spec.env["AWSIOT_TUNNEL_CLIENT_TOKEN"]) == 64
        assert info.services == ("HTTP", "SSH")
        assert info.pid == proxy.pid
        assert info.state == "running"
        assert capture.named("tunnel_started")[0]["tunnel_key"] == info.key

    async def test_endpoint_override(self, make, launcher):
        """With an endpoint override the proxy gets -e (and -c/-k) instead of -r."""
        manager = make(endpoint="127.0.0.1:8443", no_verify=True)

        await manager.open(request())
        await wait_for(lambda: launcher.proxies)

        assert launcher.proxies[0].spec.argv == (
            "localproxy",
            "-d",
            "SSH=22",
            "-e",
            "127.0.0.1:8443",
            "-k",
        )

    async def test_duplicate_token_ignored(self, make, launcher, capture):
        """The same token twice starts one proxy only."""
        manager = make()

        first = await manager.open(request())
        second = await manager.open(request())
        await wait_for(lambda: launcher.proxies)
        await asyncio.sleep(20 * MS)

        assert (first, second) == (Outcome.STARTED, Outcome.DUPLICATE)
        assert len(launcher.proxies) == 1
        assert len(capture.named("notification_duplicate")) == 1

    async def test_duplicate_after_end(self, make, launcher):
        """A token re-delivered after its tunnel ended is still ignored."""
        manager = make()
        await manager.open(request())
        await wait_for(lambda: launcher.proxies)
        launcher.proxies[0].exit(0)
        await wait_for(lambda: not manager.tunnels())

        assert await manager.open(request()) is Outcome.DUPLICATE

    async def test_unknown_service(self, make, launcher, capture):
        """A service missing from the map is refused and named in the log."""
        manager = make()

        outcome = await manager.open(request(services=("SSH", "RDP")))

        assert outcome is Outcome.REFUSED_SERVICE
        assert launcher.proxies == []
        assert capture.named("notification_rejected")[0]["services"] == ["RDP"]

    async def test_tokens_masked_while_running(self, make, launcher, capture):
        """While a tunnel runs its tokens are registered secrets; afterwards not."""
        manager = make()
        await manager.open(request("tokenA-0123456789"))
        await wait_for(lambda: launcher.proxies)
        client = launcher.proxies[0].spec.env["AWSIOT_TUNNEL_CLIENT_TOKEN"]
        during = set(secrets.values)
        launcher.proxies[0].exit(0)
        await wait_for(lambda: not manager.tunnels())

        assert {"tokenA-0123456789", client} <= during
        assert "tokenA-0123456789" not in secrets.values
        assert client not in secrets.values
        assert "tokenA-0123456789" not in capture.text


class TestExit:
    async def test_exit_zero_ends(self, make, launcher, capture):
        """Exit status 0 means the tunnel ended: no restart."""
        manager = make()
        await manager.open(request())
        await wait_for(lambda: launcher.proxies)

        launcher.proxies[0].exit(0)
        await wait_for(lambda: not manager.tunnels())
        await asyncio.sleep(50 * MS)

        assert len(launcher.proxies) == 1
        assert capture.named("tunnel_ended")[0]["reason"] == "ended"

    @pytest.mark.parametrize("returncode", [1, -signal.SIGKILL])
    async def test_failure_restarts_same_tokens(self, make, launcher, capture, returncode):
        """A non-zero exit or a kill restarts the proxy with the same tokens after a backoff."""
        manager = make()
        await manager.open(request())
        await wait_for(lambda: launcher.proxies)

        launcher.proxies[0].exit(returncode)
        await wait_for(lambda: len(launcher.proxies) == 2)
        first, second = launcher.proxies
        (info,) = manager.tunnels()

        assert second.spec.env == first.spec.env
        assert second.spec.argv == first.spec.argv
        assert info.restarts == 1
        assert info.pid == second.pid
        assert capture.named("proxy_exited")[0]["returncode"] == returncode
        assert capture.named("proxy_restart_scheduled")[0]["attempt"] == 1
        assert len(capture.named("proxy_restarted")) == 1

    async def test_restart_bound(self, make, launcher, capture):
        """After max_restarts consecutive failures the tunnel is given up."""
        manager = make(max_restarts=2)
        await manager.open(request())

        for count in (1, 2, 3):
            await wait_for(lambda count=count: len(launcher.proxies) == count)
            launcher.proxies[-1].exit(2)
        await wait_for(lambda: not manager.tunnels())
        await asyncio.sleep(50 * MS)

        assert len(launcher.proxies) == 3
        assert capture.named("tunnel_ended")[0]["reason"] == "restart_limit"
        assert capture.named("tunnel_ended")[0]["restarts"] == 2

    async def test_backoff_grows(self, make, launcher, capture):
        """Restart delays follow the backoff generator (doubling, capped)."""
        manager = make(max_restarts=3, backoff_initial=20 * MS, backoff_max=40 * MS)
        await manager.open(request())
        for count in (1, 2, 3, 4):
            await wait_for(lambda count=count: len(launcher.proxies) == count)
            launcher.proxies[-1].exit(1)
        await wait_for(lambda: not manager.tunnels())
        delays = [e["delay"] for e in capture.named("proxy_restart_scheduled")]

        assert len(delays) == 3
        assert 16 * MS <= delays[0] <= 20 * MS
        assert 32 * MS <= delays[1] <= 40 * MS
        assert 32 * MS <= delays[2] <= 40 * MS

    async def test_start_failure_retried(self, make, launcher, capture):
        """A proxy that cannot start counts as a failure and is retried up to the bound."""
        launcher.fail = True
        manager = make(max_restarts=1)

        await manager.open(request())
        await wait_for(lambda: not manager.tunnels())

        assert len(capture.named("proxy_start_failed")) == 2
        assert capture.named("tunnel_ended")[0]["reason"] == "restart_limit"

    async def test_long_run_resets_count(self, make, launcher):
        """A run longer than restart_reset_after resets the consecutive-failure count."""
        manager = make(max_restarts=1, restart_reset_after=30 * MS)
        await manager.open(request())

        for count in (1, 2, 3):
            await wait_for(lambda count=count: len(launcher.proxies) == count)
            await asyncio.sleep(60 * MS)
            launcher.proxies[-1].exit(1)
        await wait_for(lambda: len(launcher.proxies) == 4)

        assert manager.tunnels()[0].restarts == 3


class TestLimits:
    async def test_refuse_new(self, make, launcher, capture):
        """At the cap with refuse_new, a new tunnel is refused and logged; the old one runs."""
        manager = make(Limits(max_concurrent=1, on_limit="refuse_new"))
        await manager.open(request("tokenA-0123456789", ("SSH",)))

        outcome = await manager.open(request("tokenB-0123456789", ("HTTP",)))
        await wait_for(lambda: launcher.proxies)

        assert outcome is Outcome.REFUSED_LIMIT
        assert len(launcher.running) == 1
        assert capture.named("tunnel_limit_reached")[0]["policy"] == "refuse_new"

    async def test_refused_token_not_remembered(self, make, launcher):
        """A token refused at the cap is not a duplicate once a slot is free."""
        manager = make(Limits(max_concurrent=1))
        await manager.open(request("tokenA-0123456789", ("SSH",)))
        await wait_for(lambda: launcher.proxies)
        refused = await manager.open(request("tokenB-0123456789", ("HTTP",)))
        launcher.proxies[0].exit(0)
        await wait_for(lambda: not manager.tunnels())

        retried = await manager.open(request("tokenB-0123456789", ("HTTP",)))

        assert (refused, retried) == (Outcome.REFUSED_LIMIT, Outcome.STARTED)

    async def test_stop_oldest(self, make, launcher, capture):
        """At the cap with stop_oldest, the oldest proxy is stopped and the new one starts."""
        manager = make(Limits(max_concurrent=1, on_limit="stop_oldest"))
        await manager.open(request("tokenA-0123456789", ("SSH",)))
        await wait_for(lambda: launcher.proxies)
        oldest = manager.tunnels()[0].key

        outcome = await manager.open(request("tokenB-0123456789", ("HTTP",)))
        await wait_for(lambda: len(launcher.proxies) == 2 and launcher.proxies[0].stopped)
        await wait_for(lambda: len(manager.tunnels()) == 1)

        assert outcome is Outcome.STARTED
        assert capture.named("tunnel_limit_reached")[0]["stopping"] == oldest
        assert capture.named("tunnel_ended")[0]["reason"] == "evicted"
        assert manager.tunnels()[0].services == ("HTTP",)

    async def test_rotation_admitted_at_cap(self, make, launcher, capture):
        """A new token for the services of a running tunnel starts a new proxy even at the cap."""
        manager = make(Limits(max_concurrent=1))
        await manager.open(request("tokenA-0123456789", ("SSH", "HTTP")))
        await wait_for(lambda: launcher.proxies)

        outcome = await manager.open(request("tokenB-0123456789", ("HTTP", "SSH")))
        await wait_for(lambda: len(launcher.proxies) == 2)
        old, new = manager.tunnels()

        assert outcome is Outcome.STARTED
        assert old.superseded
        assert not new.superseded
        assert launcher.proxies[1].spec.env["AWSIOT_TUNNEL_ACCESS_TOKEN"] == "tokenB-0123456789"
        assert capture.named("tunnel_superseded")[0]["by"] == new.key
        assert not launcher.proxies[0].stopped

    async def test_rotated_old_ends_by_itself(self, make, launcher):
        """The superseded proxy ends when the service replaces its connection (exit 0)."""
        manager = make(Limits(max_concurrent=1))
        await manager.open(request("tokenA-0123456789"))
        await wait_for(lambda: launcher.proxies)
        await manager.open(request("tokenB-0123456789"))
        await wait_for(lambda: len(launcher.proxies) == 2)

        launcher.proxies[0].exit(0)
        await wait_for(lambda: len(manager.tunnels()) == 1)

        assert manager.tunnels()[0].superseded is False
        assert launcher.proxies[1].returncode is None

    async def test_lifetime(self, make, launcher, capture):
        """A tunnel's proxy is stopped at max_lifetime."""
        manager = make(Limits(max_lifetime=100 * MS))
        await manager.open(request())

        await wait_for(lambda: not manager.tunnels())

        assert launcher.proxies[0].stopped
        assert capture.named("tunnel_ended")[0]["reason"] == "lifetime"
        assert capture.named("tunnel_lifetime_exceeded")

    async def test_lifetime_during_backoff(self, make, launcher, capture):
        """The lifetime also ends a tunnel waiting to restart."""
        manager = make(Limits(max_lifetime=100 * MS), backoff_initial=5.0, backoff_max=5.0)
        await manager.open(request())
        await wait_for(lambda: launcher.proxies)

        launcher.proxies[0].exit(1)
        await wait_for(lambda: not manager.tunnels(), timeout=2000 * MS)

        assert len(launcher.proxies) == 1
        assert capture.named("tunnel_ended")[0]["reason"] == "lifetime"


class TestReconfigure:
    async def test_running_untouched_new_map_on_restart(self, make, launcher, capture):
        """A reload keeps running proxies; the next restart passes only services still mapped."""
        manager = make()
        await manager.open(request(services=("SSH", "HTTP")))
        await wait_for(lambda: launcher.proxies)

        manager.reconfigure(services={"SSH": "2222"}, limits=Limits(max_concurrent=3))
        await asyncio.sleep(20 * MS)
        running = launcher.proxies[0].returncode is None
        launcher.proxies[0].exit(1)
        await wait_for(lambda: len(launcher.proxies) == 2)

        assert running
        assert launcher.proxies[1].spec.argv[1:3] == ("-d", "SSH=2222")
        assert manager.limits.max_concurrent == 3
        assert capture.named("tunnels_reconfigured")[0]["services"] == ["SSH"]

    async def test_all_services_removed(self, make, launcher, capture):
        """If no requested service is mapped any more, the tunnel is not restarted."""
        manager = make()
        await manager.open(request(services=("VNC",)))
        await wait_for(lambda: launcher.proxies)
        manager.reconfigure(services={"SSH": "22"}, limits=Limits())

        launcher.proxies[0].exit(1)
        await wait_for(lambda: not manager.tunnels())

        assert len(launcher.proxies) == 1
        assert capture.named("tunnel_ended")[0]["reason"] == "services_removed"


class TestClose:
    async def test_close_stops_all(self, make, launcher, capture):
        """close() stops every proxy and refuses new requests."""
        manager = make()
        await manager.open(request("tokenA-0123456789", ("SSH",)))
        await manager.open(request("tokenB-0123456789", ("HTTP",)))
        await wait_for(lambda: len(launcher.proxies) == 2)

        await manager.close(grace=1)
        late = await manager.open(request("tokenC-0123456789"))

        assert all(p.stopped for p in launcher.proxies)
        assert manager.tunnels() == []
        assert late is Outcome.CLOSING
        assert {e["reason"] for e in capture.named("tunnel_ended")} == {"shutdown"}

    async def test_on_change(self, launcher):
        """on_change is called when tunnels start, get a pid and end."""
        calls: list[int] = []
        manager = TunnelManager(
            launcher=launcher,
            services=SERVICES,
            limits=Limits(),
            options=SpawnConfig(command=("lp",)),
            on_change=lambda: calls.append(len(manager.tunnels())),
        )
        await manager.open(request())
        await wait_for(lambda: launcher.proxies)
        launcher.proxies[0].exit(0)
        await wait_for(lambda: not manager.tunnels())
        await manager.close()

        assert calls[0] == 1
        assert calls[-1] == 0


class TestConnectionReport:
    async def test_connected_and_last_error_across_restarts(self, make, launcher):
        """The snapshot shows the proxy's connection; an error outlives a restart, not a connect."""
        manager = make(connect_timeout=7.5)
        await manager.open(request())
        await wait_for(lambda: launcher.proxies)
        first = launcher.proxies[0]
        (starting,) = manager.tunnels()
        first.connected, first.last_error = False, "certificate verify failed"
        (overdue,) = manager.tunnels()

        first.exit(1)
        await wait_for(lambda: len(launcher.proxies) == 2)
        second = launcher.proxies[1]
        (restarted,) = manager.tunnels()
        second.connected = True
        (connected,) = manager.tunnels()

        assert first.spec.connect_timeout == 7.5
        assert (starting.connected, starting.last_error) == (None, None)
        assert (overdue.connected, overdue.last_error) == (False, "certificate verify failed")
        assert (restarted.connected, restarted.last_error) == (None, "certificate verify failed")
        assert (connected.connected, connected.last_error) == (True, None)

    async def test_launch_gets_the_change_callback(self, launcher):
        """Changes reported by a proxy (connected, overdue) rewrite the status (on_change)."""
        calls: list[None] = []
        manager = TunnelManager(
            launcher=launcher,
            services=SERVICES,
            limits=Limits(),
            options=SpawnConfig(command=("localproxy",)),
            on_change=lambda: calls.append(None),
        )
        seen: list[object] = []
        original = launcher.launch

        async def launch(spec, *, log, on_change=None):
            seen.append(on_change)
            return await original(spec, log=log, on_change=on_change)

        launcher.launch = launch
        await manager.open(request())
        await wait_for(lambda: launcher.proxies)
        before = len(calls)
        seen[0]()
        await manager.close(grace=1)

        assert len(calls) > before
