"""Tests for agent.emulator.shadows: merge, delta, metadata, versions, errors, persistence."""

from __future__ import annotations

import json
import stat

import pytest
from hypothesis import given, settings, strategies as st
from structlog.testing import capture_logs

from agent.emulator.shadows import (
    MAX_REQUEST_BYTES,
    ShadowEvent,
    ShadowRejected,
    ShadowStore,
    compute_delta,
    json_equal,
    merge_state,
    request_client_token,
    stamp,
)
from agent.emulator.store import StoreError
from agent.exceptions import ConfigError
from tests.fakes import FakeClock


T0 = 1_700_000_000


@pytest.fixture
def clock():
    return FakeClock(T0)


@pytest.fixture
def store(clock):
    return ShadowStore(clock=clock)


@pytest.fixture
def events(store):
    recorded: list[ShadowEvent] = []
    store.listeners.append(recorded.append)
    return recorded


def update(store, document, *, thing="dev1", name="tunnel-agent"):
    """Send ``document`` (a dict, or raw bytes) as an update request."""
    payload = document if isinstance(document, bytes) else json.dumps(document).encode()
    return store.update(thing, name, payload)


def rejected(store, document, **where):
    """Return the ShadowRejected an update raises."""
    with pytest.raises(ShadowRejected) as caught:
        update(store, document, **where)
    return caught.value


def _ts(t=T0):
    return {"timestamp": t}


class TestMerge:
    def test_null_deletes_and_objects_merge(self):
        """A null deletes its key, objects merge key by key, other keys stay."""
        section = {"a": 1, "b": {"x": 1, "y": 2}, "c": "keep"}
        meta = stamp(section, 1)

        merged, merged_meta = merge_state(section, meta, {"a": None, "b": {"y": None, "z": 3}}, 2)

        assert merged == {"b": {"x": 1, "z": 3}, "c": "keep"}
        assert merged_meta == {"b": {"x": _ts(1), "z": _ts(2)}, "c": _ts(1)}

    def test_arrays_replace_whole(self):
        """An array replaces the stored array; its metadata has one entry per element."""
        section = {"colors": ["RED", "GREEN", "BLUE"]}

        merged, meta = merge_state(section, stamp(section, 1), {"colors": ["RED"]}, 2)

        assert merged == {"colors": ["RED"]}
        assert meta == {"colors": [_ts(2)]}

    def test_object_replaces_scalar_and_back(self):
        """An object replaces a scalar (its nulls dropped), and a scalar replaces an object."""
        first, meta = merge_state({"a": 1}, {"a": _ts(1)}, {"a": {"b": 2, "c": None}}, 2)
        second, meta2 = merge_state(first, meta, {"a": 5}, 3)

        assert (first, meta) == ({"a": {"b": 2}}, {"a": {"b": _ts(2)}})
        assert (second, meta2) == ({"a": 5}, {"a": _ts(3)})

    def test_field_named_timestamp(self):
        """A state field called "timestamp" merges like any other (metadata leaves are objects)."""
        section, meta = merge_state(None, None, {"a": {"timestamp": 5}}, 1)

        merged, merged_meta = merge_state(section, meta, {"a": {"other": 6}}, 2)

        assert merged == {"a": {"timestamp": 5, "other": 6}}
        assert merged_meta == {"a": {"timestamp": _ts(1), "other": _ts(2)}}

    def test_inputs_unchanged(self):
        """merge_state returns new objects and leaves its arguments alone."""
        section = {"a": {"b": 1}}
        meta = stamp(section, 1)

        merge_state(section, meta, {"a": {"b": None, "c": 2}}, 2)

        assert section == {"a": {"b": 1}}
        assert meta == {"a": {"b": _ts(1)}}


class TestDelta:
    def test_aws_example(self):
        """Desired-only and differing keys are in the delta; reported-only keys are not."""
        desired = {"color": "RED", "state": "STOP"}
        reported = {"color": "GREEN", "engine": "ON"}

        delta, meta = compute_delta(desired, reported, stamp(desired, 7))

        assert delta == {"color": "RED", "state": "STOP"}
        assert meta == {"color": _ts(7), "state": _ts(7)}

    def test_nested_keeps_path_to_root(self):
        """Only the differing leaf of a nested object is in the delta, with its whole path."""
        desired = {"lights": {"color": {"r": 255, "g": 255, "b": 255}}}
        reported = {"lights": {"color": {"r": 255, "g": 0, "b": 255}}}

        delta, meta = compute_delta(desired, reported, stamp(desired, 7))

        assert delta == {"lights": {"color": {"g": 255}}}
        assert meta == {"lights": {"color": {"g": _ts(7)}}}

    def test_arrays_compared_whole(self):
        """A differing array is copied whole into the delta; an equal one is not."""
        delta, _ = compute_delta({"l": [1, 2, 3], "m": [1]}, {"l": [1, 2], "m": [1]})

        assert delta == {"l": [1, 2, 3]}

    @pytest.mark.parametrize(
        ("want", "have", "differs"),
        [(True, 1, True), (1, 1.0, False), (0, False, True), ("1", 1, True), ([True], [1], True)],
    )
    def test_json_types(self, want, have, differs):
        """Values compare as JSON: a boolean never equals a number; 1 equals 1.0."""
        delta, _ = compute_delta({"k": want}, {"k": have})

        assert (delta != {}) is differs
        assert json_equal(want, have) is not differs

    def test_nothing_differs(self):
        """Equal or absent sections give an empty delta."""
        assert compute_delta({"a": {"b": 1}}, {"a": {"b": 1}, "c": 2}) == ({}, {})
        assert compute_delta(None, {"a": 1}) == ({}, {})


class TestUpdate:
    def test_first_update(self, store):
        """The first update creates version 1; accepted echoes the request with its metadata."""
        accepted = update(
            store, {"state": {"reported": {"a": 1, "b": [1, 2]}}, "clientToken": "c1"}
        )

        assert accepted == {
            "state": {"reported": {"a": 1, "b": [1, 2]}},
            "metadata": {"reported": {"a": _ts(), "b": [_ts(), _ts()]}},
            "version": 1,
            "timestamp": T0,
            "clientToken": "c1",
        }

    def test_versions_increment(self, store, clock):
        """Each accepted update, even an empty one, adds one to the version."""
        versions = []
        for state in ({"desired": {"a": 1}}, {}, {"reported": {"a": 1}}):
            clock.now += 1
            versions.append(update(store, {"state": state})["version"])

        assert versions == [1, 2, 3]
        assert store.get("dev1", "tunnel-agent")["version"] == 3

    def test_version_precondition(self, store):
        """A matching version is accepted; any other is a 409 that changes nothing."""
        update(store, {"state": {"desired": {"a": 1}}})
        update(store, {"state": {"desired": {"a": 2}}, "version": 1})

        conflict = rejected(
            store, {"state": {"desired": {"a": 3}}, "version": 1, "clientToken": "x"}
        )

        assert (conflict.status, conflict.code, conflict.message) == (
            409,
            "ConflictException",
            "Version conflict",
        )
        assert conflict.client_token == "x"
        assert store.get("dev1", "tunnel-agent")["state"]["desired"] == {"a": 2}

    def test_version_on_missing_shadow(self, store):
        """A version precondition on a shadow that does not exist is a conflict."""
        conflict = rejected(store, {"state": {"desired": {"a": 1}}, "version": 0})

        assert conflict.status == 409
        assert store.shadow("dev1", "tunnel-agent") is None

    def test_section_null_and_state_null(self, store):
        """A null desired removes the section, a null state clears both; neither deletes."""
        update(store, {"state": {"desired": {"a": 1}, "reported": {"b": 2}}})
        update(store, {"state": {"desired": None}})
        after_desired = store.get("dev1", "tunnel-agent")
        update(store, {"state": None})
        after_state = store.get("dev1", "tunnel-agent")

        assert after_desired["state"] == {"reported": {"b": 2}}
        assert after_desired["metadata"] == {"reported": {"b": _ts()}}
        assert (after_state["state"], after_state["metadata"], after_state["version"]) == (
            {},
            {},
            3,
        )

    def test_emptied_section_dropped(self, store):
        """A section whose last key is deleted disappears from the document."""
        update(store, {"state": {"desired": {"a": 1}, "reported": {"a": 1}}})
        update(store, {"state": {"reported": {"a": None}}})

        document = store.get("dev1", "tunnel-agent")

        assert document["state"] == {"desired": {"a": 1}, "delta": {"a": 1}}
        assert "reported" not in document["metadata"]

    @pytest.mark.parametrize(
        ("payload", "status", "message"),
        [
            (b"\xff\xfe", 415, "Unsupported documented encoding; supported encoding is UTF-8"),
            (b"{not json", 400, "Invalid JSON"),
            (b"[1]", 400, "Invalid JSON"),
            (b'{"state": {"desired": {"a": NaN}}}', 400, "Invalid JSON"),
            (b'{"state": {"desired": {"a": 1e400}}}', 400, "Invalid JSON"),
            (b"{}", 400, "Missing required node: state"),
            (b'{"state": 1}', 400, "State node must be an object"),
            (b'{"state": {"delta": {}}}', 400, "State contains an invalid node: 'delta'"),
            (b'{"state": {"desired": [1]}}', 400, "Desired node must be an object"),
            (b'{"state": {"reported": "x"}}', 400, "Reported node must be an object"),
            (b'{"state": {"desired": {"a": [1, null]}}}', 400, "Invalid JSON"),
            (b'{"state": {"desired": {"a": [{"b": null}]}}}', 400, "Invalid JSON"),
            (b'{"state": {}, "version": "1"}', 400, "Invalid version"),
            (b'{"state": {}, "version": true}', 400, "Invalid version"),
            (b'{"state": {}, "version": -1}', 400, "Invalid version"),
            (b'{"state": {}, "version": 1.5}', 400, "Invalid version"),
            (b'{"state": {}, "clientToken": 5}', 400, "Invalid clientToken"),
        ],
    )
    def test_bad_documents(self, store, payload, status, message):
        """Each malformed request gets the status and text AWS IoT uses, and stores nothing."""
        error = rejected(store, payload)

        assert (error.status, error.message) == (status, message)
        assert isinstance(error, StoreError)
        assert store.shadow("dev1", "tunnel-agent") is None

    def test_client_token_limit(self, store):
        """A 64-byte client token is echoed; 65 bytes are refused and not echoed."""
        accepted = update(store, {"state": {}, "clientToken": "é" * 32})
        error = rejected(store, {"state": {}, "clientToken": "t" * 65})

        assert accepted["clientToken"] == "é" * 32
        assert (error.message, error.client_token) == ("Invalid clientToken", None)

    def test_depth_limit(self, store):
        """Six levels of objects or arrays below a section are accepted, seven are not."""
        six: object = 1
        for _ in range(5):
            six = {"k": six}
        six = [six]

        accepted = update(store, {"state": {"desired": {"top": six}}})
        error = rejected(store, {"state": {"desired": {"top": {"more": six}}}, "clientToken": "d"})

        assert accepted["version"] == 1
        assert (error.status, error.message, error.client_token) == (
            400,
            "JSON contains too many levels of nesting; maximum is 6",
            "d",
        )

    def test_hostile_nesting(self, store):
        """JSON nested far beyond the recursion limit is refused, not a crash."""
        deep = b"[" * 50_000 + b"]" * 50_000

        error = rejected(store, b'{"state": {"desired": {"a": ' + deep + b"}}}")

        assert (error.status, error.message) == (400, "Invalid JSON")

    def test_state_size_limit(self, clock):
        """The state may fill the quota; one byte more is a 413 that keeps the old state."""
        store = ShadowStore(clock=clock, max_state_bytes=100)
        # {"a":"..."} is 8 bytes plus the string: 2 x (8 + 42) = 100 bytes.
        update(store, {"state": {"desired": {"a": "x" * 42}, "reported": {"a": "y" * 42}}})

        error = rejected(store, {"state": {"desired": {"a": "x" * 43}}, "clientToken": "s"})

        assert (error.status, error.code, error.client_token) == (
            413,
            "RequestEntityTooLargeException",
            "s",
        )
        assert store.get("dev1", "tunnel-agent")["version"] == 1

    def test_request_size_limit(self, store):
        """A request document beyond 128 KiB is refused before it is parsed."""
        error = rejected(store, b" " * (MAX_REQUEST_BYTES + 1))

        assert (error.status, error.message) == (
            413,
            "The payload exceeds the maximum size allowed",
        )

    @pytest.mark.parametrize(("thing", "name"), [("a/b", "x"), ("dev1", "a/b"), ("dev1", "")])
    def test_invalid_names(self, store, thing, name):
        """Thing and shadow names outside the service model's patterns are a 400."""
        error = rejected(store, {"state": {}}, thing=thing, name=name)

        assert error.status == 400

    def test_rejected_document(self):
        """The rejected document carries code, message, timestamp and the client token."""
        error = ShadowRejected(409, "Version conflict", client_token="t")

        assert error.document(5) == {
            "code": 409,
            "message": "Version conflict",
            "timestamp": 5,
            "clientToken": "t",
        }
        assert "clientToken" not in ShadowRejected(400, "x").document(5)


class TestGetDeleteList:
    def test_get_document(self, store, clock):
        """A get returns state with delta, per-section metadata, version, timestamp and token."""
        update(store, {"state": {"desired": {"a": 2, "b": 1}, "reported": {"a": 1, "b": 1}}})
        clock.now += 5

        document = store.get("dev1", "tunnel-agent", client_token="g")

        assert document == {
            "state": {"desired": {"a": 2, "b": 1}, "reported": {"a": 1, "b": 1}, "delta": {"a": 2}},
            "metadata": {
                "desired": {"a": _ts(), "b": _ts()},
                "reported": {"a": _ts(), "b": _ts()},
            },
            "version": 1,
            "timestamp": T0 + 5,
            "clientToken": "g",
        }

    def test_get_missing(self, store):
        """A missing named shadow is a 404 naming thing~shadow; a classic one names the thing."""
        with pytest.raises(ShadowRejected) as named:
            store.get("dev1", "nope")
        with pytest.raises(ShadowRejected) as classic:
            store.get("dev1", None)

        assert (named.value.status, named.value.code) == (404, "ResourceNotFoundException")
        assert named.value.message == "No shadow exists with name: 'dev1~nope'"
        assert classic.value.message == "No shadow exists with name: 'dev1'"

    def test_delete_keeps_version(self, store, events):
        """Delete answers the version; the shadow is gone, and a new one continues the version."""
        update(store, {"state": {"reported": {"a": 1}}})
        update(store, {"state": {"reported": {"a": 2}}})

        deleted = store.delete("dev1", "tunnel-agent", client_token="del")
        listed = store.list_named("dev1")
        recreated = update(store, {"state": {"reported": {"b": 1}}})

        assert deleted == {"version": 2, "timestamp": T0, "clientToken": "del"}
        assert listed == []
        assert recreated["version"] == 3
        assert events[-1].documents is not None
        assert events[-1].documents["previous"] is None
        assert store.get("dev1", "tunnel-agent")["state"] == {"reported": {"b": 1}}

    def test_delete_missing(self, store):
        """Deleting a shadow that does not exist (or no longer exists) is a 404."""
        update(store, {"state": {}})
        store.delete("dev1", "tunnel-agent")

        with pytest.raises(ShadowRejected) as caught:
            store.delete("dev1", "tunnel-agent")

        assert caught.value.status == 404

    def test_list_named(self, store):
        """list_named gives a thing's live named shadows, sorted; not classic, not others'."""
        for thing, name in [("dev1", "b"), ("dev1", "a"), ("dev1", None), ("dev2", "c")]:
            update(store, {"state": {}}, thing=thing, name=name)

        assert store.list_named("dev1") == ["a", "b"]
        assert store.list_named("dev2") == ["c"]
        assert store.list_named("dev3") == []

    def test_request_client_token(self):
        """get/delete payloads only contribute a valid client token."""
        assert request_client_token(b'{"clientToken": "abc"}') == "abc"
        assert request_client_token(b"") is None
        assert request_client_token(b"garbage") is None
        assert request_client_token(b'{"clientToken": "' + b"x" * 65 + b'"}') is None


class TestEvents:
    def test_update_event(self, store, events):
        """An update emits accepted, documents (previous/current) and a delta when one remains."""
        update(store, {"state": {"reported": {"a": 1}}})
        update(store, {"state": {"desired": {"a": 2}}, "clientToken": "t2"})

        first, second = events

        assert (first.kind, first.thing, first.name) == ("updated", "dev1", "tunnel-agent")
        assert first.delta is None
        assert first.documents == {
            "previous": None,
            "current": {
                "state": {"reported": {"a": 1}},
                "metadata": {"reported": {"a": _ts()}},
                "version": 1,
            },
            "timestamp": T0,
        }
        assert second.documents is not None
        assert second.documents["previous"] == first.documents["current"]
        assert second.documents["current"]["version"] == 2
        assert second.documents["clientToken"] == "t2"
        assert second.delta == {
            "state": {"a": 2},
            "metadata": {"a": _ts()},
            "version": 2,
            "timestamp": T0,
            "clientToken": "t2",
        }

    def test_reported_update_still_differing_has_delta(self, store, events):
        """A reported update that leaves desired unmet publishes the remaining delta again."""
        update(store, {"state": {"desired": {"a": 2, "b": 2}}})
        update(store, {"state": {"reported": {"a": 2}}})
        update(store, {"state": {"reported": {"b": 2}}})

        assert [e.delta["state"] if e.delta else None for e in events] == [
            {"a": 2, "b": 2},
            {"b": 2},
            None,
        ]

    def test_rejected_update_no_event(self, store, events):
        """A rejected request changes nothing and tells no listener."""
        rejected(store, b"{}")

        assert events == []

    def test_delete_event(self, store, events):
        """A delete emits the /delete/accepted document."""
        update(store, {"state": {}})
        store.delete("dev1", "tunnel-agent")

        assert events[-1] == ShadowEvent(
            "deleted", "dev1", "tunnel-agent", {"version": 1, "timestamp": T0}
        )

    def test_broken_listener(self, store):
        """A failing listener is logged; the update is still accepted and stored."""

        def boom(_event):
            raise RuntimeError("listener bug")

        store.listeners.append(boom)
        with capture_logs() as logs:
            accepted = update(store, {"state": {}})

        assert accepted["version"] == 1
        assert store.get("dev1", "tunnel-agent")["version"] == 1
        assert any(entry["event"] == "shadow_listener_failed" for entry in logs)


class TestPersistence:
    def test_saved_before_listeners(self, tmp_path, clock):
        """The state file (0600) already holds a change when listeners hear of it."""
        path = tmp_path / "shadows.json"
        store = ShadowStore(state_file=path, clock=clock)
        seen = []
        store.listeners.append(lambda _event: seen.append(json.loads(path.read_text())))

        update(store, {"state": {"reported": {"a": 1}}})

        assert seen[0]["shadows"][0]["reported"] == {"a": 1}
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def test_reload(self, tmp_path, clock):
        """A new store on the same file answers the same documents, tombstones included."""
        path = tmp_path / "shadows.json"
        first = ShadowStore(state_file=path, clock=clock)
        update(first, {"state": {"desired": {"a": [1, 2]}, "reported": {"a": 1}}})
        update(first, {"state": {}}, thing="dev2", name=None)
        update(first, {"state": {}}, name="gone")
        first.delete("dev1", "gone")

        second = ShadowStore(state_file=path, clock=clock)

        assert second.get("dev1", "tunnel-agent") == first.get("dev1", "tunnel-agent")
        assert second.get("dev2", None) == first.get("dev2", None)
        assert second.list_named("dev1") == ["tunnel-agent"]
        assert update(second, {"state": {}}, name="gone")["version"] == 2

    @pytest.mark.parametrize(
        "text",
        [
            "not json",
            '{"version": 2, "shadows": []}',
            '{"version": 1}',
            '{"version": 1, "shadows": [{"thing": "a"}]}',
            (
                '{"version": 1, "shadows": [{"thing": "a", "name": null, "desired": [1],'
                ' "reported": null, "metadata": {}, "version": 1, "deleted": false}]}'
            ),
        ],
    )
    def test_corrupt_file(self, tmp_path, text):
        """A state file that cannot be read back is a configuration error, not an empty store."""
        path = tmp_path / "shadows.json"
        path.write_text(text)

        with pytest.raises(ConfigError, match="cannot load shadow state"):
            ShadowStore(state_file=path)


# -- properties -------------------------------------------------------------------------------

keys = st.sampled_from(["a", "b", "c", "timestamp"])
scalars = (
    st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.text(max_size=3)
)
# Stored values: no nulls anywhere.
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=8,
)
sections = st.dictionaries(keys, values, max_size=4)
# Patches: nulls allowed as object values (deletions), never anywhere inside arrays.
patch_values = st.recursive(
    scalars | st.none(),
    lambda inner: st.lists(values, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=8,
)
patches = st.dictionaries(keys, patch_values, max_size=4)


def _has_null(value):
    if value is None:
        return True
    if isinstance(value, dict):
        return any(_has_null(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_null(v) for v in value)
    return False


def _mirrors(value, meta):
    """Whether ``meta`` has exactly the structure of ``value`` with timestamp leaves."""
    if isinstance(value, dict):
        return (
            isinstance(meta, dict)
            and meta.keys() == value.keys()
            and all(_mirrors(v, meta[k]) for k, v in value.items())
        )
    if isinstance(value, list):
        return (
            isinstance(meta, list)
            and len(meta) == len(value)
            and all(_mirrors(v, m) for v, m in zip(value, meta, strict=True))
        )
    return isinstance(meta, dict) and set(meta) == {"timestamp"}


class TestProperties:
    @given(sections, st.lists(patches, max_size=4))
    def test_metadata_mirrors_state(self, section, updates):
        """After any sequence of updates, the state has no nulls and the metadata mirrors it."""
        state, meta = section, stamp(section, 0)
        for t, patch in enumerate(updates, start=1):
            state, meta = merge_state(state, meta, patch, t)

        assert not _has_null(state)
        assert _mirrors(state, meta)

    @given(sections, patches)
    def test_merge_is_idempotent_and_local(self, section, patch):
        """Applying a patch twice equals applying it once; keys outside the patch stay."""
        once, _ = merge_state(section, None, patch, 1)
        twice, _ = merge_state(once, None, patch, 2)

        assert json_equal(once, twice)
        assert all(json_equal(once[k], v) for k, v in section.items() if k not in patch)
        assert all(k not in once for k, v in patch.items() if v is None)

    @given(sections, sections)
    def test_reporting_desired_clears_delta(self, desired, reported):
        """A device reporting the desired state (or just the delta) leaves no delta."""
        delta, delta_meta = compute_delta(desired, reported, stamp(desired, 1))
        after_full, _ = merge_state(reported, None, desired, 2)
        after_delta, _ = merge_state(reported, None, delta, 2)

        assert compute_delta(desired, after_full)[0] == {}
        assert compute_delta(desired, after_delta)[0] == {}
        assert _mirrors(delta, delta_meta)

    @given(sections, sections)
    def test_delta_is_part_of_desired(self, desired, reported):
        """Every delta entry is in desired with the same value (path kept to the root)."""

        def inside(delta, want):
            return all(
                k in want
                and (
                    inside(v, want[k])
                    if isinstance(v, dict) and isinstance(want[k], dict) and v != want[k]
                    else json_equal(v, want[k])
                )
                for k, v in delta.items()
            )

        delta, _ = compute_delta(desired, reported)

        assert inside(delta, desired)

    @settings(max_examples=50)
    @given(st.lists(st.tuples(st.sampled_from(["desired", "reported"]), patches), max_size=6))
    def test_store_versions_and_delta(self, requests):
        """The store counts one version per accepted update, and its delta is compute_delta's."""
        store = ShadowStore(clock=FakeClock(T0))
        accepted = 0
        for section, patch in requests:
            try:
                update(store, {"state": {section: patch}})
            except ShadowRejected as exc:
                # Generated values may nest deeper than the quota; nothing else is refused.
                assert exc.message.startswith("JSON contains too many levels")  # noqa: PT017
            else:
                accepted += 1

        if not accepted:
            assert store.shadow("dev1", "tunnel-agent") is None
            return
        document = store.get("dev1", "tunnel-agent")
        state = document["state"]
        expected, _ = compute_delta(state.get("desired"), state.get("reported"))

        assert document["version"] == accepted
        assert state.get("delta", {}) == expected
