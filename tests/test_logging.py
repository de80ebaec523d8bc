"""Tests for agent.logging: output formats and the redaction processor."""

from __future__ import annotations

import io
import json
import logging

import pytest
import structlog

from agent.logging import MASK, SecretRegistry, configure_logging, redact, secrets
from tests.fakes import LogCapture, reset_logging


TOKEN = "AQGAAXiSecretTunnelAccessToken_0123456789"
CLIENT = "client-token-0123456789abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(autouse=True)
def clean():
    reset_logging()
    yield
    reset_logging()
    for value in secrets.values:
        while value in secrets.values:
            secrets.unregister(value)


def fail(exc: Exception) -> None:
    raise exc


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


class TestFormats:
    def test_json_when_not_a_tty(self):
        """With format auto and a non-TTY stream, each event is one JSON object."""
        stream = io.StringIO()
        configure_logging(level="info", fmt="auto", stream=stream)

        structlog.get_logger().info("tunnel_started", tunnel_key="ab12", pid=42)
        event = json.loads(stream.getvalue())

        assert event["event"] == "tunnel_started"
        assert event["tunnel_key"] == "ab12"
        assert event["pid"] == 42
        assert event["level"] == "info"
        assert event["timestamp"].endswith("Z")

    def test_console_on_a_tty(self):
        """On a TTY the console renderer is used (not JSON)."""
        stream = Tty()
        configure_logging(level="info", fmt="auto", stream=stream)

        structlog.get_logger().info("tunnel_started", pid=42)

        assert "tunnel_started" in stream.getvalue()
        assert not stream.getvalue().lstrip().startswith("{")

    def test_level_filter(self):
        """Events below the configured level are dropped."""
        capture = LogCapture(level="warning")

        structlog.get_logger().info("quiet")
        structlog.get_logger().warning("loud")

        assert [e["event"] for e in capture.events] == ["loud"]

    def test_dict_tracebacks(self):
        """Exceptions become structured tracebacks in JSON."""
        capture = LogCapture()

        try:
            fail(RuntimeError("boom"))
        except RuntimeError:
            structlog.get_logger().exception("failed")
        (event,) = capture.events

        assert event["exception"][0]["exc_type"] == "RuntimeError"
        assert event["exception"][0]["exc_value"] == "boom"

    def test_stdlib_records_routed(self):
        """Standard-library log records go through the same JSON pipeline."""
        capture = LogCapture()

        logging.getLogger("asyncio").warning("loop %s", "slow")
        (event,) = capture.events

        assert event["event"] == "loop slow"
        assert event["logger"] == "asyncio"

    def test_reconfigure_does_not_stack_handlers(self):
        """A second configuration replaces the stdlib handler instead of adding one."""
        LogCapture()
        capture = LogCapture()

        logging.getLogger("x").warning("once")

        assert len(capture.named("once")) == 1


class TestRedaction:
    @pytest.mark.parametrize(
        "key",
        [
            "token",
            "access_token",
            "clientAccessToken",
            "secret_key",
            "password",
            "Authorization",
            "cookie",
        ],
    )
    def test_secret_keys_masked(self, key):
        """Any key matching token|secret|password|authorization|cookie is masked."""
        capture = LogCapture()

        structlog.get_logger().info("event", **{key: "visible-value-123"})

        assert capture.events[0][key] == MASK
        assert "visible-value-123" not in capture.text

    def test_registered_secret_in_any_value(self):
        """A registered secret is masked inside any string value, nested or not."""
        capture = LogCapture()
        secrets.register(TOKEN)

        structlog.get_logger().info(
            "proxy_output",
            line=f"connecting with {TOKEN} now",
            nested={"a": [f"x{TOKEN}y"], "headers": {"access-token": "abc"}},
            raw=TOKEN.encode(),
        )
        (event,) = capture.events

        assert TOKEN not in capture.text
        assert event["line"] == f"connecting with {MASK} now"
        assert event["nested"]["a"] == [f"x{MASK}y"]
        assert event["nested"]["headers"]["access-token"] == MASK

    def test_secret_in_traceback(self):
        """A registered secret inside an exception message is masked in the traceback."""
        capture = LogCapture()
        secrets.register(TOKEN)

        try:
            fail(ValueError(f"bad token {TOKEN}"))
        except ValueError:
            structlog.get_logger().exception("failed")

        assert TOKEN not in capture.text
        assert MASK in capture.text

    def test_secret_via_stdlib(self):
        """A registered secret logged through the standard library is masked too."""
        capture = LogCapture()
        secrets.register(CLIENT)

        logging.getLogger("sdk").warning("client token %s", CLIENT)

        assert CLIENT not in capture.text

    def test_unregistered_after_tunnel(self):
        """After unregistering, the value is no longer masked (no unbounded growth)."""
        registry = SecretRegistry()
        registry.register(TOKEN)
        registry.register(TOKEN)
        registry.unregister(TOKEN)
        still = registry.mask(TOKEN)
        registry.unregister(TOKEN)

        assert still == MASK
        assert registry.mask(TOKEN) == TOKEN
        assert registry.values == ()

    def test_short_values_ignored(self):
        """Values under 8 characters are not registered (they would mask ordinary words)."""
        registry = SecretRegistry()
        registry.register("SSH")

        assert registry.values == ()

    def test_longest_first(self):
        """A secret containing another is masked whole."""
        registry = SecretRegistry()
        registry.register("abcdefgh")
        registry.register("abcdefgh-ijklmnop")

        assert registry.mask("x abcdefgh-ijklmnop y") == f"x {MASK} y"

    def test_processor_direct(self):
        """The processor leaves unrelated keys and non-string values untouched."""
        event = redact(None, "info", {"event": "e", "pid": 3, "services": ["SSH"], "token": None})

        assert event == {"event": "e", "pid": 3, "services": ["SSH"], "token": MASK}


def parse_datagram(data: bytes) -> dict[str, str]:
    """Decode the journal's native protocol (simple and length-prefixed fields)."""
    fields: dict[str, str] = {}
    while data:
        line, sep, rest = data.partition(b"\n")
        assert sep, "every field ends with a newline"
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields[name.decode()] = value.decode()
            data = rest
        else:
            size = int.from_bytes(rest[:8], "little")
            fields[line.decode()] = rest[8 : 8 + size].decode()
            assert rest[8 + size : 9 + size] == b"\n"
            data = rest[9 + size :]
    return fields


@pytest.fixture
def journal(tmp_path):
    """A datagram socket standing where journald's native socket stands."""
    import socket

    path = tmp_path / "journal.socket"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield path, sock
    sock.close()


class TestJournal:
    def test_datagram_byte_for_byte(self):
        """Keys become upper-case fields, values JSON unless strings, newlines length-prefixed."""
        from agent.logging import journal_fields

        event = {"event": "proxy_output", "level": "warning", "tunnel_key": "k1", "n": 3}
        event["line"] = "a\nb"

        data = journal_fields(event, '{"event": "proxy_output"}')

        assert data == (
            b'MESSAGE={"event": "proxy_output"}\n'
            b"PRIORITY=4\n"
            b"SYSLOG_IDENTIFIER=tunnel-agent\n"
            b"EVENT=proxy_output\n"
            b"LEVEL=warning\n"
            b"TUNNEL_KEY=k1\n"
            b"N=3\n"
            b"LINE\n\x03\x00\x00\x00\x00\x00\x00\x00a\nb\n"
        )

    def test_a_value_cannot_inject_a_field(self):
        """A newline followed by PRIORITY=0 inside a value stays inside that value."""
        from agent.logging import journal_fields

        fields = parse_datagram(
            journal_fields({"event": "x", "level": "info", "v": "x\nPRIORITY=0"}, "m")
        )

        assert fields["PRIORITY"] == "6"
        assert fields["V"] == "x\nPRIORITY=0"

    def test_events_reach_the_socket_with_priority_and_fields(self, journal):
        """A warning event arrives as one datagram: PRIORITY 4, its keys as fields, token masked."""
        path, sock = journal
        secrets.register(TOKEN)
        configure_logging(level="info", journal_socket=str(path))

        structlog.get_logger().warning("proxy_not_connected", tunnel_key="abc", line=f"x {TOKEN}")
        logging.getLogger("asyncio").error("loop trouble")
        first = parse_datagram(sock.recv(65536))
        second = parse_datagram(sock.recv(65536))

        assert first["PRIORITY"] == "4"
        assert first["TUNNEL_KEY"] == "abc"
        assert first["EVENT"] == "proxy_not_connected"
        assert TOKEN not in first["LINE"]
        assert MASK in first["LINE"]
        assert json.loads(first["MESSAGE"])["event"] == "proxy_not_connected"
        assert second["PRIORITY"] == "3"
        assert second["EVENT"] == "loop trouble"

    def test_journal_chosen_when_journal_stream_names_stdout(self, journal, tmp_path, monkeypatch):
        """With $JOURNAL_STREAM naming the output stream, events go to the journal socket."""
        import os

        import agent.logging

        path, sock = journal
        out = (tmp_path / "stdout").open("w")
        st = os.fstat(out.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        monkeypatch.setattr(agent.logging, "JOURNAL_SOCKET", str(path))
        configure_logging(level="info", stream=out)

        structlog.get_logger().info("tunnel_started", tunnel_key="t1")

        assert parse_datagram(sock.recv(65536))["TUNNEL_KEY"] == "t1"
        out.close()
        assert (tmp_path / "stdout").read_text() == ""

    def test_other_stream_keeps_json_lines(self, journal, tmp_path, monkeypatch):
        """$JOURNAL_STREAM naming another stream (output redirected) keeps JSON lines."""
        import agent.logging

        path, _ = journal
        monkeypatch.setenv("JOURNAL_STREAM", "1:2")
        monkeypatch.setattr(agent.logging, "JOURNAL_SOCKET", str(path))
        stream = io.StringIO()
        configure_logging(level="info", stream=stream)

        structlog.get_logger().info("tunnel_started")

        assert json.loads(stream.getvalue())["event"] == "tunnel_started"

    def test_refused_datagram_falls_back_to_the_stream(self, tmp_path):
        """When journald is gone the event is written to the stream, not lost."""
        stream = io.StringIO()
        configure_logging(level="info", stream=stream, journal_socket=str(tmp_path / "none"))

        structlog.get_logger().error("broker_gone", port=1)

        assert json.loads(stream.getvalue())["event"] == "broker_gone"
