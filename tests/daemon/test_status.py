"""Tests for agent.daemon.status: the 0600 status file and its rendering."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from agent.daemon.status import StatusFile, format_status, read_status, status_path
from agent.daemon.tunnels import TunnelInfo
from agent.exceptions import AgentError


INFO = TunnelInfo(
    key="ab12cd34",
    services=("SSH", "HTTP"),
    region="us-east-1",
    state="running",
    pid=4242,
    started_at=1_000_000.0,
    restarts=2,
    superseded=False,
)


def dead_pid() -> int:
    """The pid of a process that has exited."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(dead.stdout)


class TestStatusFile:
    def test_write_read(self, tmp_path):
        """The file is JSON with the tunnels, mode 0600, in a 0700 directory."""
        directory = tmp_path / "run"
        status = StatusFile(directory, thing_name="dev-1")

        status.write([INFO])
        document = read_status(directory)

        assert document["pid"] == os.getpid()
        assert document["thing_name"] == "dev-1"
        assert document["tunnels"] == [
            {
                "key": "ab12cd34",
                "services": ["SSH", "HTTP"],
                "region": "us-east-1",
                "state": "running",
                "pid": 4242,
                "started_at": 1_000_000.0,
                "restarts": 2,
                "superseded": False,
                "connected": None,
                "last_error": None,
                "connections": None,
                "bytes_in": None,
                "bytes_out": None,
            }
        ]
        assert (directory / "status.dev-1.json").stat().st_mode & 0o777 == 0o600
        assert directory.stat().st_mode & 0o777 == 0o700
        assert [p.name for p in directory.iterdir()] == ["status.dev-1.json"]

    def test_remove(self, tmp_path):
        """remove() deletes the file and tolerates its absence."""
        status = StatusFile(tmp_path, thing_name="dev-1")
        status.write([])

        status.remove()
        status.remove()

        assert not status.path.exists()

    def test_missing(self, tmp_path):
        """No file means no agent."""
        with pytest.raises(AgentError, match="is the agent running"):
            read_status(tmp_path)

    def test_dead_agent(self, tmp_path):
        """A file left by a dead agent is reported as such."""
        stale = status_path(tmp_path, "dev-1")
        stale.write_text(json.dumps({"pid": dead_pid(), "tunnels": []}))

        with pytest.raises(AgentError, match=r"the agent \(pid \d+\) is not running"):
            read_status(tmp_path)

    def test_garbage(self, tmp_path):
        """A malformed file is reported, not a traceback."""
        status_path(tmp_path, "dev-1").write_text("[1, 2")

        with pytest.raises(AgentError, match="unreadable status file"):
            read_status(tmp_path)


class TestSeveralAgents:
    def test_two_agents_do_not_collide(self, tmp_path):
        """Two agents in one runtime directory keep a file each, read by thing name."""
        StatusFile(tmp_path, thing_name="dev-1").write([INFO])
        StatusFile(tmp_path, thing_name="dev-2").write([])

        one, two = read_status(tmp_path, "dev-1"), read_status(tmp_path, "dev-2")

        assert (one["thing_name"], len(one["tunnels"])) == ("dev-1", 1)
        assert (two["thing_name"], len(two["tunnels"])) == ("dev-2", 0)
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "status.dev-1.json",
            "status.dev-2.json",
        ]

    def test_ambiguous_without_a_thing(self, tmp_path):
        """Without a thing name, two live agents are named rather than one picked."""
        StatusFile(tmp_path, thing_name="dev-1").write([])
        StatusFile(tmp_path, thing_name="dev-2").write([])

        with pytest.raises(AgentError, match=r"2 agents run here \(dev-1, dev-2\): choose one"):
            read_status(tmp_path)

    def test_stale_file_is_skipped(self, tmp_path):
        """A dead agent's leftover file does not hide the one live agent."""
        status_path(tmp_path, "old").write_text(json.dumps({"pid": dead_pid(), "tunnels": []}))
        StatusFile(tmp_path, thing_name="dev-1").write([])

        assert read_status(tmp_path)["thing_name"] == "dev-1"

    def test_named_thing_absent(self, tmp_path):
        """A named thing without a file says which file it looked for."""
        StatusFile(tmp_path, thing_name="dev-1").write([])

        with pytest.raises(AgentError, match=r"status\.dev-2\.json: is the agent running"):
            read_status(tmp_path, "dev-2")


class TestFormat:
    def test_table(self):
        """The table shows services, state, pid, uptime and restarts per tunnel."""
        tunnel = {
            "key": "ab12cd34",
            "services": ["SSH", "HTTP"],
            "state": "running",
            "pid": 4242,
            "started_at": 1_000_000.0,
            "restarts": 2,
            "superseded": True,
        }
        document = {
            "pid": 7,
            "thing_name": "dev-1",
            "state": "running",
            "started_at": 999_000.0,
            "tunnels": [tunnel],
        }

        text = format_status(document, now=1_003_725.0)

        assert text.splitlines() == [
            "agent pid 7 thing dev-1 state running up 1h18m45s",
            "1 active tunnel(s)",
            (
                "KEY        SERVICES                 STATE           PID     UPTIME RESTARTS"
                " CONNECTED CONNS BYTES_IN BYTES_OUT"
            ),
            (
                "ab12cd34   SSH,HTTP (rotated)       running        4242   1h02m05s 2        ..."
                "           -        -         -"
            ),
        ]

    def test_health_and_figures(self):
        """MQTT state and age, the last notification and rejection, connections and bytes."""
        tunnel = {"key": "k1", "services": ["SSH"], "state": "running", "pid": 5,
                  "started_at": 0.0, "connected": True, "connections": 2,
                  "bytes_in": 1234, "bytes_out": 56789}  # fmt: skip
        document = {
            "pid": 7, "thing_name": "dev-1", "state": "running", "started_at": 0.0,
            "mqtt": {"state": "connected", "since": 30.0},
            "last_notification": {"at": 50.0, "outcome": "rejected"},
            "last_rejection": {"at": 50.0, "reason": "services[0] is not in the services map"},
            "tunnels": [tunnel],
        }  # fmt: skip

        lines = format_status(document, now=60.0).splitlines()

        assert lines[1] == "mqtt connected for 0m30s"
        assert lines[2] == "last notification 0m10s ago: rejected"
        assert lines[3] == "last rejection 0m10s ago: services[0] is not in the services map"
        assert lines[-1].split()[-4:] == ["yes", "2", "1234", "56789"]

    def test_not_connected_shows_why(self):
        """An overdue proxy reads NO, with its last error line under it; a connected one yes."""
        base = {"services": ["SSH"], "state": "running", "pid": 1, "started_at": 0.0}
        overdue = base | {"key": "aa", "connected": False, "last_error": "cert verify failed"}
        fine = base | {"key": "bb", "connected": True, "last_error": None}
        document = {"pid": 7, "started_at": 0.0, "tunnels": [overdue, fine]}

        lines = format_status(document, now=60.0).splitlines()

        assert lines[3].split()[-4:] == ["NO", "-", "-", "-"]
        assert lines[4] == "           last error: cert verify failed"
        assert lines[5].startswith("bb ")
        assert lines[5].split()[-4:] == ["yes", "-", "-", "-"]
        assert len(lines) == 6

    def test_write_records_connection(self, tmp_path):
        """The file carries connected and last_error per tunnel."""
        info = dataclasses.replace(INFO, connected=False, last_error="handshake failed")
        StatusFile(tmp_path, thing_name="dev-1").write([info])

        [tunnel] = read_status(tmp_path)["tunnels"]

        assert (tunnel["connected"], tunnel["last_error"]) == (False, "handshake failed")
