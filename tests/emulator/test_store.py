"""Tests for agent.emulator.store: tunnel records, tokens, bindings, lifecycle, persistence."""

from __future__ import annotations

import json
import stat

import pytest

from agent.emulator.store import (
    REJECT_CAT_INVALID,
    REJECT_CAT_USED,
    REJECT_CLIENT_ID_FORMAT,
    REJECT_CLIENT_ID_IN_USE,
    REJECT_CLIENT_ID_MISMATCH,
    REJECT_EXPIRED,
    REJECT_MODE_MISMATCH,
    HandshakeRejected,
    LimitExceeded,
    ResourceNotFound,
    StoreError,
    StoreEvent,
    TunnelStore,
    ValidationFailed,
)
from agent.exceptions import AgentError, ConfigError
from tests.fakes import FakeClock


T0 = 1_700_000_000.0
CLIENT_A = "a" * 32
CLIENT_B = "b-" * 20


@pytest.fixture
def clock():
    return FakeClock(T0)


@pytest.fixture
def store(clock):
    return TunnelStore(clock=clock)


@pytest.fixture
def events(store):
    recorded: list[StoreEvent] = []
    store.listeners.append(recorded.append)
    return recorded


class TestErrors:
    def test_codes_and_statuses(self):
        """Each store error carries the AWS code and HTTP status of docs/protocol.md §13.2."""
        errors = [ResourceNotFound("x"), LimitExceeded("x"), ValidationFailed("x")]
        rejected = HandshakeRejected(400, "why")

        assert [(e.code, e.status) for e in errors] == [
            ("ResourceNotFoundException", 400),
            ("LimitExceededException", 400),
            ("ValidationException", 400),
        ]
        assert all(isinstance(e, StoreError) and isinstance(e, AgentError) for e in errors)
        assert (rejected.status, rejected.message) == (400, "why")
        assert HandshakeRejected(503, "busy").status == 503


class TestOpen:
    def test_defaults(self, store, events):
        """A tunnel with no input is OPEN, 720 min, disconnected, with two distinct tokens."""
        t = store.open_tunnel()

        assert t.status == "OPEN"
        assert t.arn == f"arn:aws:iot:us-east-1:123456789012:tunnel/{t.tunnel_id}"
        assert t.region == "us-east-1"
        assert t.max_lifetime_minutes == 720
        assert (t.created_at, t.last_updated_at, t.expires_at) == (T0, T0, T0 + 720 * 60)
        assert t.closed_at is None
        assert (t.thing_name, t.services, t.has_destination_config) == (None, (), False)
        assert t.tags == {}
        assert t.source.token != t.destination.token
        assert len(t.source.token) == 64
        for ep in (t.source, t.destination):
            assert (ep.connected, ep.used, ep.client_token, ep.last_updated_at) == (
                False,
                False,
                None,
                T0,
            )
        assert [(e.kind, e.tunnel, e.destination_config) for e in events] == [("opened", t, False)]

    def test_destination_config_and_lifetime(self, store, events):
        """The destination config, tags and lifetime are stored as given."""
        t = store.open_tunnel(
            description="d",
            tags={"k": "v"},
            thing_name="dev1",
            services=["SSH", "VNC"],
            max_lifetime_minutes=5,
        )

        assert (t.description, t.tags, t.thing_name, t.services) == (
            "d",
            {"k": "v"},
            "dev1",
            ("SSH", "VNC"),
        )
        assert t.has_destination_config
        assert t.expires_at == T0 + 300
        assert events[0].destination_config

    def test_region_override_and_china_partition(self, store):
        """A region from the credential scope lands in the ARN, with aws-cn for China."""
        t = store.open_tunnel(region="cn-north-1")

        assert t.arn.startswith("arn:aws-cn:iot:cn-north-1:123456789012:tunnel/")
        assert t.region == "cn-north-1"

    def test_services_limit(self, store):
        """More services than the cap raise LimitExceeded and create nothing."""
        with pytest.raises(LimitExceeded):
            store.open_tunnel(services=["A", "B", "C", "D"])

        assert store.list_tunnels() == []

    def test_open_cap(self, clock):
        """The open-tunnel cap counts OPEN tunnels only."""
        store = TunnelStore(clock=clock, max_open_tunnels=2)
        a = store.open_tunnel()
        store.open_tunnel()
        with pytest.raises(LimitExceeded, match="Tunnel limit exceeded"):
            store.open_tunnel()
        store.close_tunnel(a.tunnel_id)
        store.open_tunnel()

        assert store.open_count() == 2
        assert len(store.list_tunnels()) == 3


class TestQueries:
    def test_get_and_get_by_arn(self, store):
        """Tunnels are found by id and by ARN; unknown ones raise ResourceNotFound."""
        t = store.open_tunnel()

        assert store.get(t.tunnel_id) is t
        assert store.get_by_arn(t.arn) is t
        with pytest.raises(ResourceNotFound):
            store.get("nope")
        with pytest.raises(ResourceNotFound):
            store.get_by_arn(t.arn + "x")

    def test_list_newest_first_and_filter(self, store, clock):
        """Listing is newest first and filters on the exact thing name."""
        made = []
        for i, thing in enumerate(["a", "b", "a", None]):
            clock.now = T0 + i
            made.append(store.open_tunnel(thing_name=thing, services=["SSH"] if thing else None))

        assert [t.tunnel_id for t in store.list_tunnels()] == [t.tunnel_id for t in reversed(made)]
        assert [t.tunnel_id for t in store.list_tunnels(thing_name="a")] == [
            made[2].tunnel_id,
            made[0].tunnel_id,
        ]
        assert store.list_tunnels(thing_name="A") == []

    def test_endpoint_by_mode(self, store):
        """Tunnel.endpoint maps the two modes and rejects anything else."""
        t = store.open_tunnel()

        assert t.endpoint("source") is t.source
        assert t.endpoint("destination") is t.destination
        with pytest.raises(ValueError):
            t.endpoint("SOURCE")

    def test_repr_hides_tokens(self, store):
        """Neither the CAT nor the client token shows in a repr (docs/architecture.md §7.4)."""
        t = store.open_tunnel()
        store.authenticate(mode="source", token=t.source.token, client_token=CLIENT_A)

        assert t.source.token not in repr(t)
        assert t.destination.token not in repr(t)
        assert CLIENT_A not in repr(t)


class TestClose:
    def test_close_revokes_and_disconnects(self, store, clock, events):
        """Closing sets CLOSED, revokes both tokens and disconnects both modes."""
        t = store.open_tunnel()
        store.authenticate(mode="source", token=t.source.token, client_token=CLIENT_A)
        store.set_connected(t.tunnel_id, "source", connected=True)
        clock.now = T0 + 10
        store.close_tunnel(t.tunnel_id)

        assert (t.status, t.last_updated_at, t.closed_at) == ("CLOSED", T0 + 10, T0 + 10)
        assert (t.source.connected, t.source.last_updated_at) == (False, T0 + 10)
        assert t.destination.last_updated_at == T0
        assert [e.kind for e in events] == ["opened", "connection", "closed"]
        for ep in (t.source, t.destination):
            mode = "source" if ep is t.source else "destination"
            with pytest.raises(HandshakeRejected) as info:
                store.authenticate(mode=mode, token=ep.token, client_token=CLIENT_A)
            assert info.value.message == REJECT_CAT_INVALID

    def test_close_delete(self, store, events):
        """delete=true removes the record at once."""
        t = store.open_tunnel()
        store.close_tunnel(t.tunnel_id, delete=True)

        assert store.list_tunnels() == []
        assert [e.kind for e in events] == ["opened", "closed"]
        with pytest.raises(ResourceNotFound):
            store.get(t.tunnel_id)
        with pytest.raises(ResourceNotFound):
            store.get_by_arn(t.arn)

    def test_close_closed_is_noop_or_purge(self, store, clock, events):
        """Closing a CLOSED tunnel is a no-op, or purges it with delete (docs/protocol.md §15.2)."""
        t = store.open_tunnel()
        store.close_tunnel(t.tunnel_id)
        clock.now = T0 + 50
        store.close_tunnel(t.tunnel_id)

        assert (t.status, t.closed_at, t.last_updated_at) == ("CLOSED", T0, T0)
        store.close_tunnel(t.tunnel_id, delete=True)
        assert store.list_tunnels() == []
        assert [e.kind for e in events] == ["opened", "closed"]

    def test_close_unknown(self, store):
        """Closing an unknown id raises ResourceNotFound."""
        with pytest.raises(ResourceNotFound):
            store.close_tunnel("nope")


class TestRotate:
    def test_rotate_source_only(self, store, clock, events):
        """Rotating SOURCE re-mints only the source token and keeps the expiry."""
        t = store.open_tunnel(max_lifetime_minutes=60)
        old_src, old_dst = t.source.token, t.destination.token
        store.authenticate(mode="source", token=old_src, client_token=CLIENT_A)
        clock.now = T0 + 600
        store.rotate(t.tunnel_id, ["source"])

        assert t.source.token != old_src
        assert t.destination.token == old_dst
        assert (t.source.used, t.source.client_token) == (False, None)
        assert t.expires_at == T0 + 3600
        assert t.last_updated_at == T0 + 600
        assert (events[-1].kind, events[-1].modes, events[-1].destination_config) == (
            "rotated",
            ("source",),
            False,
        )
        with pytest.raises(HandshakeRejected) as info:
            store.authenticate(mode="source", token=old_src, client_token=CLIENT_A)
        assert (info.value.status, info.value.message) == (400, REJECT_CAT_INVALID)
        assert store.authenticate(mode="source", token=t.source.token, client_token=CLIENT_A) is t

    def test_rotate_all_with_destination_config(self, store, events):
        """ALL with a destinationConfig re-mints both tokens and replaces the config."""
        t = store.open_tunnel(thing_name="old", services=["SSH"])
        old = (t.source.token, t.destination.token)
        store.rotate(
            t.tunnel_id, ["destination", "source"], thing_name="new", services=["HTTP", "SSH"]
        )

        assert t.source.token != old[0]
        assert t.destination.token != old[1]
        assert (t.thing_name, t.services) == ("new", ("HTTP", "SSH"))
        assert (events[-1].modes, events[-1].destination_config) == (
            ("source", "destination"),
            True,
        )

    def test_rotate_rules(self, store):
        """Unknown id, closed tunnel, bad mode, config with SOURCE and too many services fail."""
        t = store.open_tunnel()
        before = t.source.token

        with pytest.raises(ResourceNotFound):
            store.rotate("nope", ["source"])
        with pytest.raises(ValidationFailed, match="DestinationConfig with source"):
            store.rotate(t.tunnel_id, ["source"], services=["SSH"])
        with pytest.raises(ValidationFailed):
            store.rotate(t.tunnel_id, ["SOURCE"])
        with pytest.raises(ValidationFailed):
            store.rotate(t.tunnel_id, [])
        with pytest.raises(LimitExceeded):
            store.rotate(t.tunnel_id, ["destination"], services=["A", "B", "C", "D"])
        assert t.source.token == before
        store.close_tunnel(t.tunnel_id)
        with pytest.raises(ValidationFailed, match="closed"):
            store.rotate(t.tunnel_id, ["source"])


class TestAuthenticate:
    def test_single_use_without_client_token(self, store):
        """A CAT without a client token works once, then is refused as used."""
        t = store.open_tunnel()
        store.authenticate(mode="destination", token=t.destination.token, client_token=None)

        assert t.destination.used
        with pytest.raises(HandshakeRejected) as info:
            store.authenticate(mode="destination", token=t.destination.token, client_token=None)
        assert info.value.message == REJECT_CAT_USED
        with pytest.raises(HandshakeRejected) as info:
            store.authenticate(mode="destination", token=t.destination.token, client_token=CLIENT_A)
        assert info.value.message == REJECT_CAT_USED

    def test_client_token_binding(self, store):
        """A bound client token allows reconnects with the same value only."""
        t = store.open_tunnel()
        store.authenticate(mode="source", token=t.source.token, client_token=CLIENT_A)
        store.authenticate(mode="source", token=t.source.token, client_token=CLIENT_A)

        assert t.source.client_token == CLIENT_A
        for other in (CLIENT_B, None):
            with pytest.raises(HandshakeRejected) as info:
                store.authenticate(mode="source", token=t.source.token, client_token=other)
            assert (info.value.status, info.value.message) == (400, REJECT_CLIENT_ID_MISMATCH)

    def test_client_token_unique_across_open_tunnels(self, store):
        """A client token bound in one open tunnel cannot bind in another until it closes."""
        a = store.open_tunnel()
        b = store.open_tunnel()
        store.authenticate(mode="destination", token=a.destination.token, client_token=CLIENT_A)

        with pytest.raises(HandshakeRejected) as info:
            store.authenticate(mode="destination", token=b.destination.token, client_token=CLIENT_A)
        assert info.value.message == REJECT_CLIENT_ID_IN_USE
        assert not b.destination.used
        store.close_tunnel(a.tunnel_id)
        store.authenticate(mode="destination", token=b.destination.token, client_token=CLIENT_A)
        assert b.destination.client_token == CLIENT_A

    @pytest.mark.parametrize(
        ("mode", "token_of", "client_token", "reason"),
        [
            ("source", None, None, REJECT_CAT_INVALID),
            ("source", "destination", None, REJECT_MODE_MISMATCH),
            ("destination", "source", None, REJECT_MODE_MISMATCH),
            ("source", "source", "short", REJECT_CLIENT_ID_FORMAT),
            ("source", "source", "x" * 129, REJECT_CLIENT_ID_FORMAT),
            ("source", "source", "_" * 40, REJECT_CLIENT_ID_FORMAT),
        ],
    )
    def test_rejections(self, store, mode, token_of, client_token, reason):
        """Unknown tokens, wrong modes and malformed client tokens get their 400 reason."""
        t = store.open_tunnel()
        token = "not-a-token" if token_of is None else t.endpoint(token_of).token

        with pytest.raises(HandshakeRejected) as info:
            store.authenticate(mode=mode, token=token, client_token=client_token)

        assert (info.value.status, info.value.message) == (400, reason)
        assert not t.source.used
        assert not t.destination.used

    def test_expired_but_not_yet_closed(self, store, clock):
        """A token of a tunnel past its lifetime is refused even before the timer runs."""
        t = store.open_tunnel(max_lifetime_minutes=1)
        clock.now = T0 + 60

        with pytest.raises(HandshakeRejected) as info:
            store.authenticate(mode="source", token=t.source.token, client_token=None)

        assert info.value.message == REJECT_EXPIRED
        assert t.status == "OPEN"


class TestConnection:
    def test_set_connected(self, store, clock, events):
        """Connection changes update the mode's state and time and emit one event each."""
        t = store.open_tunnel()
        clock.now = T0 + 5
        store.set_connected(t.tunnel_id, "destination", connected=True)
        store.set_connected(t.tunnel_id, "destination", connected=True)
        clock.now = T0 + 9
        store.set_connected(t.tunnel_id, "destination", connected=False)

        assert (t.destination.connected, t.destination.last_updated_at) == (False, T0 + 9)
        assert t.last_updated_at == T0
        assert [(e.kind, e.modes) for e in events[1:]] == [
            ("connection", ("destination",)),
            ("connection", ("destination",)),
        ]

    def test_set_connected_ignores_gone_and_closed(self, store, events):
        """Reports about deleted or CLOSED tunnels change nothing."""
        t = store.open_tunnel()
        store.close_tunnel(t.tunnel_id)
        store.set_connected(t.tunnel_id, "source", connected=True)
        store.set_connected("gone", "source", connected=True)

        assert not t.source.connected
        assert [e.kind for e in events] == ["opened", "closed"]
        with pytest.raises(ValueError):
            store.set_connected(t.tunnel_id, "both", connected=True)


class TestLifecycle:
    def test_expire_due_and_next_expiry(self, store, clock, events):
        """Tunnels close at their lifetime; next_expiry names the earliest open one."""
        a = store.open_tunnel(max_lifetime_minutes=1)
        b = store.open_tunnel(max_lifetime_minutes=2)

        assert store.next_expiry() == T0 + 60
        clock.now = T0 + 59.9
        assert store.expire_due() == []
        clock.now = T0 + 60
        assert store.expire_due() == [a]
        assert (a.status, a.closed_at) == ("CLOSED", T0 + 60)
        assert b.status == "OPEN"
        assert store.next_expiry() == T0 + 120
        assert events[-1].kind == "closed"
        assert events[-1].tunnel is a
        clock.now = T0 + 120
        assert store.expire_due() == [b]
        assert store.next_expiry() is None

    def test_retention_purge(self, clock):
        """CLOSED tunnels are listed until the retention period ends, then purged."""
        store = TunnelStore(clock=clock, retention_seconds=100)
        t = store.open_tunnel()
        store.close_tunnel(t.tunnel_id)
        clock.now = T0 + 99
        store.expire_due()

        assert store.list_tunnels() == [t]
        clock.now = T0 + 100
        assert store.expire_due() == []
        assert store.list_tunnels() == []

    def test_listener_errors_do_not_break_the_store(self, store):
        """A failing listener is logged and the change still happens."""

        def boom(_event: StoreEvent) -> None:
            raise RuntimeError("listener bug")

        seen: list[str] = []
        store.listeners[:] = [boom, lambda e: seen.append(e.kind)]
        t = store.open_tunnel()

        assert seen == ["opened"]
        assert store.get(t.tunnel_id) is t


class TestTags:
    def test_tag_untag(self, store):
        """Tags insert/overwrite by key; untag ignores absent keys."""
        t = store.open_tunnel(tags={"a": "1", "b": "2"})
        store.tag(t.arn, {"b": "3", "c": ""})
        store.untag(t.arn, ["a", "zz"])

        assert t.tags == {"b": "3", "c": ""}
        with pytest.raises(ResourceNotFound):
            store.tag("arn:nope", {"a": "1"})
        with pytest.raises(ResourceNotFound):
            store.untag("arn:nope", [])

    def test_tag_limit_counts_existing_tags(self, tmp_path, clock):
        """A tunnel holds at most 200 tags; an overflowing TagResource changes nothing."""
        state = tmp_path / "state.json"
        store = TunnelStore(clock=clock, state_file=state)
        t = store.open_tunnel(tags={f"k{i}": "v" for i in range(150)})
        store.tag(t.arn, {f"k{i}": "w" for i in range(100, 200)})  # 50 overwrites, 50 new: 200
        saved = state.read_text()

        with pytest.raises(ValidationFailed, match="would have 201 tags, the limit is 200"):
            store.tag(t.arn, {"k0": "x", "extra": "v"})

        assert len(t.tags) == 200
        assert (t.tags["k0"], t.tags["k199"]) == ("v", "w")
        assert "extra" not in t.tags
        assert state.read_text() == saved


class TestPersistence:
    def test_round_trip(self, tmp_path, clock):
        """A restarted store keeps tunnels, tokens, bindings and tags; sockets are gone."""
        path = tmp_path / "state" / "store.json"
        first = TunnelStore(clock=clock, state_file=path)
        a = first.open_tunnel(description="é", tags={"k": "v"}, thing_name="dev", services=["SSH"])
        b = first.open_tunnel()
        first.authenticate(mode="destination", token=a.destination.token, client_token=CLIENT_A)
        first.set_connected(a.tunnel_id, "destination", connected=True)
        first.close_tunnel(b.tunnel_id)
        clock.now = T0 + 30
        second = TunnelStore(clock=clock, state_file=path)
        a2 = second.get(a.tunnel_id)

        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert [t.tunnel_id for t in second.list_tunnels()] == [b.tunnel_id, a.tunnel_id]
        assert second.get(b.tunnel_id).status == "CLOSED"
        assert (a2.description, a2.tags, a2.thing_name, a2.services) == (
            "é",
            {"k": "v"},
            "dev",
            ("SSH",),
        )
        assert (a2.destination.connected, a2.destination.last_updated_at) == (False, T0 + 30)
        assert a2.expires_at == a.expires_at
        assert second.get_by_arn(a.arn) is a2
        assert (
            second.authenticate(
                mode="destination", token=a.destination.token, client_token=CLIENT_A
            )
            is a2
        )
        with pytest.raises(HandshakeRejected):
            second.authenticate(mode="source", token=b.source.token, client_token=None)
        assert second.authenticate(mode="source", token=a.source.token, client_token=None) is a2
        assert sorted(p.name for p in path.parent.iterdir()) == ["store.json"]

    def test_timestamps_to_the_millisecond(self, tmp_path, clock):
        """Stored and saved timestamps are cut to milliseconds, also those of older files."""
        state = tmp_path / "state.json"
        clock.now = T0 + 0.1234567
        store = TunnelStore(clock=clock, state_file=state)
        t = store.open_tunnel(max_lifetime_minutes=1)
        clock.now = T0 + 5.0006
        store.set_connected(t.tunnel_id, "destination", connected=True)
        saved = json.loads(state.read_text())["tunnels"][0]
        # A file from before the cut, with a float clock's full digits.
        saved["created_at"] = saved["last_updated_at"] = T0 + 0.1234567
        saved["source"]["last_updated_at"] = T0 + 0.9999
        state.write_text(json.dumps({"version": 1, "tunnels": [saved]}))
        loaded = TunnelStore(clock=clock, state_file=state).get(t.tunnel_id)

        assert (t.created_at, t.last_updated_at, t.expires_at) == (
            T0 + 0.123,
            T0 + 0.123,
            T0 + 60.123,
        )
        assert t.destination.last_updated_at == T0 + 5.001
        assert (saved["expires_at"], saved["destination"]["last_updated_at"]) == (
            T0 + 60.123,
            T0 + 5.001,
        )
        assert (loaded.created_at, loaded.last_updated_at) == (T0 + 0.123, T0 + 0.123)
        assert loaded.source.last_updated_at == T0 + 1.0
        assert loaded.destination.last_updated_at == T0 + 5.001  # disconnected by the restart

    def test_every_change_is_saved(self, tmp_path, clock):
        """Rotation, tags, deletes and purges reach the file without any explicit flush."""
        path = tmp_path / "store.json"
        store = TunnelStore(clock=clock, state_file=path, retention_seconds=10)
        a = store.open_tunnel()
        b = store.open_tunnel()
        store.rotate(a.tunnel_id, ["source"])
        store.tag(a.arn, {"x": "y"})
        store.close_tunnel(b.tunnel_id)
        clock.now = T0 + 10
        store.expire_due()
        saved = json.loads(path.read_text())

        assert [t["tunnel_id"] for t in saved["tunnels"]] == [a.tunnel_id]
        assert saved["tunnels"][0]["source"]["token"] == a.source.token
        assert saved["tunnels"][0]["tags"] == {"x": "y"}
        store.untag(a.arn, ["x"])
        store.close_tunnel(a.tunnel_id)
        store.close_tunnel(a.tunnel_id, delete=True)
        assert json.loads(path.read_text())["tunnels"] == []

    @pytest.mark.parametrize(
        "content", ["{", "[]", '{"version": 2, "tunnels": []}', '{"version": 1}']
    )
    def test_corrupt_file(self, tmp_path, content):
        """An unreadable state file is a ConfigError, not a silent empty store."""
        path = tmp_path / "store.json"
        path.write_text(content)

        with pytest.raises(ConfigError, match="cannot load emulator state"):
            TunnelStore(state_file=path)
