"""Tests for agent.common.files: atomic private files."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from agent.common.files import write_private


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


class TestWritePrivate:
    def test_replaces_a_readable_file_with_a_private_one(self, tmp_path):
        """An existing world-readable file is replaced by a 0600 one holding the new data."""
        target = tmp_path / "secret"
        target.write_text("old")
        target.chmod(0o644)

        write_private(target, b"new-secret")

        assert target.read_bytes() == b"new-secret"
        assert _mode(target) == 0o600
        assert [p.name for p in tmp_path.iterdir()] == ["secret"]

    def test_private_whatever_the_umask(self, tmp_path):
        """A permissive umask does not widen the file's mode."""
        old = os.umask(0)
        try:
            write_private(tmp_path / "f", b"x")
        finally:
            os.umask(old)

        assert _mode(tmp_path / "f") == 0o600

    def test_failure_leaves_the_old_file_and_no_temporary(self, tmp_path, monkeypatch):
        """When the write fails the old content stays and no temporary file is left behind."""
        target = tmp_path / "state"
        target.write_bytes(b"old")

        def fail(_fd, _data):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "write", fail)
        with pytest.raises(OSError, match="No space"):
            write_private(target, b"new")

        assert target.read_bytes() == b"old"
        assert [p.name for p in tmp_path.iterdir()] == ["state"]

    def test_concurrent_writers_never_mix_their_bytes(self, tmp_path):
        """Threads writing the same file at once leave one writer's whole content."""
        target = tmp_path / "status"
        payloads = [bytes([65 + i]) * 200_000 for i in range(8)]

        threads = [threading.Thread(target=write_private, args=(target, p)) for p in payloads]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        assert target.read_bytes() in payloads
        assert [p.name for p in tmp_path.iterdir()] == ["status"]
