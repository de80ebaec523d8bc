"""Tests for agent.daemon.records: tunnel record files on a real file system."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest
from pydantic import SecretStr

from agent.daemon.records import RecordError, RecordStore, TunnelRecord, parse_record


TOKEN = "AQGAAXiSecretRecordToken_0123456789"
CLIENT = "Cl1entT0ken-recordsrecordsrecordsrecords0123456789"


def record(key: str = "0123abcd", **changes) -> TunnelRecord:
    values = {
        "key": key,
        "services": ("SSH", "HTTP"),
        "region": "eu-west-1",
        "endpoint": "127.0.0.1:8443",
        "token": SecretStr(TOKEN),
        "client_token": CLIENT,
        "started_at": time.time(),
        "expires_at": time.time() + 3600,
        "generation": 2,
    } | changes
    return TunnelRecord(**values)


@pytest.fixture
def store(tmp_path):
    made = RecordStore(tmp_path / "state")
    assert made.prepare()
    return made


class TestSaveLoad:
    def test_round_trip_private(self, store):
        """A saved record reads back equal; the file is 0600, ours, and no temporary is left."""
        saved = record()

        assert store.save(saved)
        path = store.path(saved.key)
        info = path.stat()
        (loaded,) = store.load()

        assert loaded == saved
        assert loaded.token.get_secret_value() == TOKEN
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.getuid()
        assert [p.name for p in store.directory.iterdir()] == ["tunnel-0123abcd.json"]
        assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700

    def test_repr_hides_tokens(self):
        """Neither token appears in a record's repr (it may end up in a traceback)."""
        text = repr(record())

        assert TOKEN not in text
        assert CLIENT not in text

    def test_remove(self, store):
        """remove() deletes the file; removing a missing one is not an error."""
        store.save(record())

        store.remove("0123abcd")
        store.remove("0123abcd")

        assert store.load() == []

    def test_purge_removes_ours(self, store):
        """purge() deletes every record file of ours (persistence turned off)."""
        store.save(record("0000aaaa"))
        store.save(record("1111bbbb"))
        (store.directory / "other.txt").write_text("not a record")

        count = store.purge()

        assert count == 2
        assert [p.name for p in store.directory.iterdir()] == ["other.txt"]

    def test_prepare_fails_softly(self, tmp_path, capture):
        """A state directory that cannot be created is reported, not raised."""
        (tmp_path / "file").write_text("")
        made = RecordStore(tmp_path / "file" / "state")

        usable = made.prepare()

        assert usable is False
        assert capture.named("tunnel_state_unavailable")[0]["path"] == str(made.directory)

    def test_save_fails_softly(self, store, capture):
        """A write failure is logged (without the token) and reported as False."""
        store.directory.rmdir()

        saved = store.save(record())

        assert saved is False
        assert (
            capture.named("tunnel_record_write_failed")[0]["error"] == "No such file or directory"
        )
        assert TOKEN not in capture.text


class TestIgnored:
    """Each unusable file: a warning naming the file and the reason, never its content."""

    def check(self, store, capture, path, reason):
        loaded = store.load()
        (warning,) = capture.named("tunnel_record_ignored")

        assert loaded == []
        assert warning["path"] == str(path)
        assert reason in warning["reason"]
        assert warning["level"] == "warning"
        assert TOKEN not in capture.text
        assert CLIENT not in capture.text

    def test_corrupt(self, store, capture):
        path = store.path("0123abcd")
        path.write_bytes(json.dumps(record().to_dict()).encode()[:-7])
        path.chmod(0o600)

        self.check(store, capture, path, "not valid UTF-8 JSON")

    def test_group_readable(self, store, capture):
        store.save(record())
        path = store.path("0123abcd")
        path.chmod(0o640)

        self.check(store, capture, path, "mode 0640")

    def test_foreign_owner(self, store, capture):
        if os.geteuid() != 0:
            pytest.skip("making a file owned by another uid needs root")
        store.save(record())
        path = store.path("0123abcd")
        os.chown(path, 65534, 65534)

        self.check(store, capture, path, "owned by uid 65534")

    def test_symlink(self, store, capture, tmp_path):
        target = tmp_path / "elsewhere.json"
        target.write_text(json.dumps(record().to_dict()))
        target.chmod(0o600)
        path = store.path("0123abcd")
        path.symlink_to(target)

        self.check(store, capture, path, "cannot open")

    def test_directory(self, store, capture):
        path = store.path("0123abcd")
        path.mkdir()

        self.check(store, capture, path, "not a regular file")

    def test_key_mismatch(self, store, capture):
        store.save(record("0123abcd"))
        path = store.path("0123abcd")
        path.rename(store.path("99999999"))

        self.check(store, capture, store.path("99999999"), "does not match")

    def test_bad_field(self, store, capture):
        data = record().to_dict() | {"region": TOKEN}
        path = store.path("0123abcd")
        path.write_text(json.dumps(data))
        path.chmod(0o600)

        self.check(store, capture, path, "bad region")

    def test_good_ones_still_load(self, store, capture):
        """A bad file does not hide the good ones beside it."""
        store.save(record("0000aaaa"))
        bad = store.path("1111bbbb")
        bad.write_text("{}")
        bad.chmod(0o600)

        loaded = store.load()

        assert [r.key for r in loaded] == ["0000aaaa"]
        assert capture.named("tunnel_record_ignored")[0]["reason"] == "unknown format version"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("key", "../../etc"),
        ("services", []),
        ("services", ["SSH", "SSH"]),
        ("services", ["a:b"]),
        ("region", "us-east-1.evil.com"),
        ("endpoint", "host name"),
        ("token", ""),
        ("token", "tok en"),
        ("client_token", "short"),
        ("started_at", "now"),
        ("expires_at", float("nan")),
        ("generation", -1),
        ("generation", True),
    ],
)
def test_each_field_checked(field, value):
    """Every field is validated; the error names the field only."""
    data = record().to_dict() | {field: value}

    with pytest.raises(RecordError) as error:
        parse_record(json.dumps(data).encode())

    assert str(error.value) == f"bad {field}"
