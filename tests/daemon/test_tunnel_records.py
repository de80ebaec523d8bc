"""TunnelManager with real record files: what is kept, what is dropped, restore, hand-off."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from pydantic import SecretStr

from agent.daemon.lifecycle import build_daemon
from agent.daemon.notification import TunnelRequest
from agent.daemon.records import RecordStore, TunnelRecord
from agent.daemon.settings import load_settings
from agent.daemon.tunnels import Limits, Outcome, SpawnConfig, TunnelManager
from tests.fakes import MS, FakeNotificationSource, FakeProxyLauncher, wait_for


SERVICES = {"SSH": "22", "HTTP": "127.0.0.1:8080", "VNC": "5900"}
TOKEN_A = "tokenA-0123456789"
TOKEN_B = "tokenB-0123456789"


def request(token: str = TOKEN_A, services=("SSH",)) -> TunnelRequest:
    return TunnelRequest(token=SecretStr(token), region="us-east-1", services=tuple(services))


def saved(key: str, *, services=("SSH",), generation: int = 0, **changes) -> TunnelRecord:
    values = {
        "key": key,
        "services": tuple(services),
        "region": "us-east-1",
        "endpoint": None,
        "token": SecretStr(f"tok-{key}"),
        "client_token": f"client-{key}-" + "x" * 40,
        "started_at": time.time() - 60,
        "expires_at": time.time() + 3600,
        "generation": generation,
    } | changes
    return TunnelRecord(**values)


@pytest.fixture
def store(tmp_path):
    made = RecordStore(tmp_path / "state")
    made.prepare()
    return made


@pytest.fixture
async def make(store):
    managers: list[TunnelManager] = []

    def factory(launcher, limits: Limits | None = None, **options) -> TunnelManager:
        opts = {"command": ("localproxy",), "backoff_initial": 10 * MS, "backoff_max": 40 * MS}
        manager = TunnelManager(
            launcher=launcher,
            services=SERVICES,
            limits=limits or Limits(),
            options=SpawnConfig(**(opts | options)),
            records=store,
        )
        managers.append(manager)
        return manager

    yield factory
    for manager in managers:
        await manager.close(grace=1)


def on_disk(store: RecordStore) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in store.directory.glob("tunnel-*.json")}


class TestKept:
    async def test_written_then_removed_at_tunnel_end(self, make, store):
        """Open writes the record (what the proxy got); exit 0 (tunnel closed) deletes it."""
        launcher = FakeProxyLauncher()
        manager = make(launcher, Limits(max_lifetime=600))
        before = time.time()
        await manager.open(request())
        await wait_for(lambda: launcher.proxies)
        (info,) = manager.tunnels()
        written = on_disk(store)[f"tunnel-{info.key}"]
        env = launcher.proxies[0].spec.env

        launcher.proxies[0].exit(0)
        await wait_for(lambda: not manager.tunnels())

        assert written["token"] == env["AWSIOT_TUNNEL_ACCESS_TOKEN"] == TOKEN_A
        assert written["client_token"] == env["AWSIOT_TUNNEL_CLIENT_TOKEN"]
        assert written["services"] == ["SSH"]
        assert written["generation"] == 0
        assert before + 600 <= written["expires_at"] <= time.time() + 600
        assert on_disk(store) == {}

    async def test_kept_at_shutdown(self, make, store):
        """Stopping the agent stops the proxy but keeps the record for the next start."""
        launcher = FakeProxyLauncher()
        manager = make(launcher)
        await manager.open(request())
        await wait_for(lambda: launcher.proxies)

        await manager.close(grace=1)

        assert launcher.proxies[0].stopped
        assert len(on_disk(store)) == 1

    async def test_removed_at_lifetime(self, make, store):
        launcher = FakeProxyLauncher()
        manager = make(launcher, Limits(max_lifetime=100 * MS))
        await manager.open(request())

        await wait_for(lambda: launcher.proxies and not manager.tunnels())

        assert on_disk(store) == {}

    async def test_removed_at_restart_limit(self, make, store):
        launcher = FakeProxyLauncher()
        manager = make(launcher, max_restarts=0)
        await manager.open(request())
        await wait_for(lambda: launcher.proxies)

        launcher.proxies[0].exit(1)
        await wait_for(lambda: not manager.tunnels())

        assert on_disk(store) == {}

    async def test_rotation_replaces_the_record(self, make, store):
        """A rotation deletes the superseded record at once; the new one is generation 1."""
        launcher = FakeProxyLauncher()
        manager = make(launcher)
        await manager.open(request(TOKEN_A))
        await wait_for(lambda: launcher.proxies)
        await manager.open(request(TOKEN_B))
        await wait_for(lambda: len(launcher.proxies) == 2)

        (record,) = on_disk(store).values()

        assert record["token"] == TOKEN_B
        assert record["generation"] == 1
        assert launcher.proxies[0].returncode is None  # the old proxy ends by itself


class TestRestore:
    async def test_same_tokens_and_key(self, make, store, capture):
        """The next process starts a proxy with the recorded token and client token."""
        first = FakeProxyLauncher()
        manager = make(first)
        await manager.open(request())
        await wait_for(lambda: first.proxies)
        key = manager.tunnels()[0].key
        await manager.close(grace=1)

        second = FakeProxyLauncher()
        restarted = make(second)
        count = restarted.restore(store.load())
        await wait_for(lambda: second.proxies)
        duplicate = await restarted.open(request())

        assert count == 1
        assert second.proxies[0].spec.env == first.proxies[0].spec.env
        assert second.proxies[0].spec.argv == first.proxies[0].spec.argv
        assert restarted.tunnels()[0].key == key
        assert capture.named("tunnel_restored")[0]["tunnel_key"] == key
        assert duplicate is Outcome.DUPLICATE

    async def test_refused_token_drops_the_record(self, make, store):
        """A restored proxy that exits 0 (tunnel closed meanwhile) ends it and its record."""
        store.save(saved("0000aaaa"))
        launcher = FakeProxyLauncher()
        manager = make(launcher)
        manager.restore(store.load())
        await wait_for(lambda: launcher.proxies)

        launcher.proxies[0].exit(0)
        await wait_for(lambda: not manager.tunnels())

        assert on_disk(store) == {}

    async def test_expired_and_superseded_dropped(self, make, store, capture):
        """Expired records and older generations of the same services are deleted, not run."""
        store.save(saved("0000aaaa", expires_at=time.time() - 1, services=("VNC",)))
        store.save(saved("1111bbbb", generation=0))
        store.save(saved("2222cccc", generation=1))
        launcher = FakeProxyLauncher()
        manager = make(launcher)

        count = manager.restore(store.load())
        await wait_for(lambda: launcher.proxies)
        dropped = {e["tunnel_key"]: e["reason"] for e in capture.named("tunnel_record_dropped")}

        assert count == 1
        assert launcher.proxies[0].spec.env["AWSIOT_TUNNEL_ACCESS_TOKEN"] == "tok-2222cccc"
        assert dropped == {"0000aaaa": "expired", "1111bbbb": "superseded"}
        assert set(on_disk(store)) == {"tunnel-2222cccc"}

    async def test_cap(self, make, store, capture):
        """Beyond max_concurrent the newest records are dropped; the oldest come back."""
        for index, services in enumerate((("SSH",), ("HTTP",), ("VNC",))):
            store.save(saved(f"{index}000aaaa"[:8], services=services, started_at=100.0 + index))
        launcher = FakeProxyLauncher()
        manager = make(launcher, Limits(max_concurrent=2))

        count = manager.restore(store.load())
        await wait_for(lambda: len(launcher.proxies) == 2)

        assert count == 2
        assert capture.named("tunnel_record_dropped")[0]["tunnel_key"] == "2000aaaa"
        assert capture.named("tunnel_record_dropped")[0]["reason"] == "limit"

    async def test_deadline_from_the_record(self, make, store):
        """The recorded expiry still applies: a record close to it is stopped soon after."""
        store.save(saved("0000aaaa", expires_at=time.time() + 0.2))
        launcher = FakeProxyLauncher()
        manager = make(launcher)

        manager.restore(store.load())
        await wait_for(lambda: launcher.proxies and not manager.tunnels(), timeout=2000 * MS)

        assert launcher.proxies[0].stopped
        assert on_disk(store) == {}


class TestHandOff:
    async def test_detach_then_adopt(self, make, store, capture):
        """detach() leaves proxies running and describes them; adopt() supervises them again."""
        first = FakeProxyLauncher()
        manager = make(first, backoff_initial=5.0, backoff_max=5.0)
        await manager.open(request(TOKEN_A, ("SSH",)))
        await manager.open(request(TOKEN_B, ("HTTP",)))
        await wait_for(lambda: len(first.proxies) == 2)
        first.proxies[1].exit(1)  # now waiting 5 s to restart
        await wait_for(lambda: manager.tunnels()[1].state == "restarting")

        handoff = await manager.detach()
        running, waiting = sorted(handoff.tunnels, key=lambda t: t.child is None)
        second = FakeProxyLauncher()
        successor = make(second)
        successor.adopt(handoff)
        await wait_for(lambda: second.adopted and second.proxies)
        duplicate = await successor.open(request(TOKEN_A, ("SSH",)))

        assert not first.proxies[0].stopped
        assert first.proxies[0].detached
        assert running.child is not None
        assert running.child.pid == first.proxies[0].pid
        assert running.record.token.get_secret_value() == TOKEN_A
        assert waiting.child is None
        assert waiting.restarts == 0
        assert [p.pid for p in second.adopted] == [first.proxies[0].pid]
        assert second.proxies[0].spec.env == first.proxies[1].spec.env
        assert len(on_disk(store)) == 2
        assert {e["pid"] for e in capture.named("tunnel_handed_on")} == {first.proxies[0].pid, None}
        assert capture.named("tunnel_ended") == []
        assert {e["tunnel_key"] for e in capture.named("tunnel_adopted")} == {
            t.key for t in successor.tunnels()
        }
        assert duplicate is Outcome.DUPLICATE

    async def test_adopted_proxy_exit_handled(self, make, store):
        """An adopted proxy's exit 0 ends its tunnel and deletes the record, as a launched one."""
        first = FakeProxyLauncher()
        manager = make(first)
        await manager.open(request())
        await wait_for(lambda: first.proxies)
        handoff = await manager.detach()
        second = FakeProxyLauncher()
        successor = make(second)
        successor.adopt(handoff)
        await wait_for(lambda: second.adopted)

        second.adopted[0].exit(0)
        await wait_for(lambda: not successor.tunnels())

        assert on_disk(store) == {}
        assert second.proxies == []

    async def test_not_our_child_starts_a_new_proxy(self, make, store, capture):
        """A proxy that cannot be adopted is replaced by a new one with the same tokens."""
        first = FakeProxyLauncher()
        manager = make(first)
        await manager.open(request())
        await wait_for(lambda: first.proxies)
        handoff = await manager.detach()
        second = FakeProxyLauncher()
        second.refuse_adoption = True
        successor = make(second)

        successor.adopt(handoff)
        await wait_for(lambda: second.proxies)

        assert second.proxies[0].spec.env == first.proxies[0].spec.env
        assert capture.named("proxy_adoption_failed")[0]["pid"] == first.proxies[0].pid

    async def test_superseded_not_handed_on(self, make, store):
        """A proxy whose token was rotated away is stopped, not handed on."""
        launcher = FakeProxyLauncher()
        manager = make(launcher)
        await manager.open(request(TOKEN_A))
        await manager.open(request(TOKEN_B))
        await wait_for(lambda: len(launcher.proxies) == 2)

        handoff = await manager.detach()

        assert [t.record.token.get_secret_value() for t in handoff.tunnels] == [TOKEN_B]
        assert launcher.proxies[0].stopped

    async def test_ended_during_detach_not_handed_on(self, make, store):
        """A proxy that exits 0 while being handed on: its tunnel ended, its record goes."""
        launcher = FakeProxyLauncher()
        manager = make(launcher)
        await manager.open(request())
        await wait_for(lambda: launcher.proxies)
        proxy = launcher.proxies[0]
        original = proxy.detach

        async def exits_first():
            proxy.exit(0)
            return await original()

        proxy.detach = exits_first  # type: ignore[method-assign]

        handoff = await manager.detach()
        await asyncio.sleep(0)

        assert handoff.tunnels == ()
        assert on_disk(store) == {}


class TestSetting:
    def settings(self, tmp_path, persist: bool):
        path = tmp_path / "c.toml"
        path.write_text(
            f'thing_name = "dev-1"\nnotify = "greengrass"\nruntime_dir = "{tmp_path / "run"}"\n'
            f'[tunnels]\npersist = {str(persist).lower()}\nstate_dir = "{tmp_path / "state"}"\n'
        )
        return load_settings(path)

    def test_persist_off_purges_and_keeps_nothing(self, tmp_path, store, capture):
        """With persistence off, records an earlier run left are deleted; none are kept."""
        store.save(saved("0000aaaa"))

        daemon = build_daemon(
            self.settings(tmp_path, persist=False),
            source=FakeNotificationSource(),
            launcher=FakeProxyLauncher(),
        )

        assert on_disk(store) == {}
        assert daemon._records is None
        assert daemon._manager._records is None
        assert capture.named("tunnel_records_purged")[0]["count"] == 1

    def test_persist_on_uses_the_directory(self, tmp_path, store):
        daemon = build_daemon(
            self.settings(tmp_path, persist=True),
            source=FakeNotificationSource(),
            launcher=FakeProxyLauncher(),
        )

        assert daemon._records is not None
        assert daemon._records.directory == store.directory
