"""Tests for agent.daemon.sdnotify against a real Unix datagram socket."""

from __future__ import annotations

import os
import socket

import pytest

from agent.daemon.sdnotify import SdNotifier, watchdog_interval


@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2)
    yield sock, path
    sock.close()


class TestSdNotifier:
    def test_sends_datagram(self, listener):
        """Assignments arrive as one newline-joined datagram."""
        sock, path = listener
        notifier = SdNotifier.from_environ({"NOTIFY_SOCKET": str(path)})
        assert notifier is not None

        sent = notifier.notify("READY=1", "STATUS=0 active tunnel(s)")
        notifier.close()

        assert sent is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=0 active tunnel(s)"

    def test_abstract_namespace(self):
        """An @-prefixed address is the abstract namespace."""
        name = f"tunnel-agent-test-{os.getpid()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0" + name)
            sock.settimeout(2)
            notifier = SdNotifier(f"@{name}")

            notifier.notify("WATCHDOG=1")
            notifier.close()

            assert sock.recv(100) == b"WATCHDOG=1"

    def test_absent(self):
        """Without NOTIFY_SOCKET (or with a bogus one) there is no notifier."""
        assert SdNotifier.from_environ({}) is None
        assert SdNotifier.from_environ({"NOTIFY_SOCKET": "relative"}) is None

    def test_send_failure_is_not_fatal(self, tmp_path):
        """A vanished socket makes notify() return False instead of raising."""
        notifier = SdNotifier(str(tmp_path / "gone.sock"))

        sent = notifier.notify("READY=1")
        notifier.close()

        assert sent is False


class TestWatchdogInterval:
    @pytest.mark.parametrize(
        ("environ", "expected"),
        [
            ({}, None),
            ({"WATCHDOG_USEC": "0"}, None),
            ({"WATCHDOG_USEC": "junk"}, None),
            ({"WATCHDOG_USEC": "10000000"}, 5.0),
            ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}, 5.0),
            ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, None),
        ],
    )
    def test_half_of_usec(self, environ, expected):
        """The ping interval is half of WATCHDOG_USEC, only for our own pid."""
        assert watchdog_interval(environ) == expected
