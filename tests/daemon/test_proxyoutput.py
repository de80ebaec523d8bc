"""Tests for agent.daemon.proxyoutput: proxy log levels and the connect timeout."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

import pytest
import structlog

from agent.daemon.proxyoutput import ConnectionWatch, parse_line
from agent.daemon.supervisor import ProxySpec, SubprocessLauncher, build_argv, build_env
from agent.logging import MASK, secrets
from tests.fakes import MS, wait_for


TOKEN = "AQGAAXiSecretTunnelAccessToken_0123456789"
AWS_TIME = "[2024-05-01T12:00:00.123456]{4242}"
BUNDLED_TIME = "2024-05-01T12:00:00.123"
AWS_CONNECTED = (
    "Successfully established websocket connection with proxy server: "
    "wss://data.tunneling.iot.us-east-1.amazonaws.com:443"
)
AWS_TLS_ERROR = "Could not perform SSL handshake with proxy server: certificate verify failed"
BUNDLED_CONNECTED = (
    "connected to the tunnel mode=destination subprotocol=aws.iot.securetunneling-3.0 channel_id=-"
)


def aws(level: str, message: str) -> str:
    """A line as the AWS localproxy prints it: the severity padded to 9 columns."""
    return f"{AWS_TIME}{f'[{level}]':<9} {message}"


class TestParseLine:
    @pytest.mark.parametrize(
        ("line", "level", "message", "event"),
        [
            (aws("info", "Starting proxy in destination mode"), logging.INFO,
             "Starting proxy in destination mode", None),
            (aws("info", AWS_CONNECTED), logging.INFO, AWS_CONNECTED, "connected"),
            (aws("error", AWS_TLS_ERROR), logging.ERROR, AWS_TLS_ERROR, None),
            (aws("warning", "Starting new stream for service id: SSH"), logging.WARNING,
             "Starting new stream for service id: SSH", None),
            (aws("fatal", "Must specify one of -s or -d"), logging.ERROR,
             "Must specify one of -s or -d", None),
            (aws("trace", "Waiting for stream start..."), logging.DEBUG,
             "Waiting for stream start...", None),
            (aws("debug", "Scheduled next read:"), logging.DEBUG, "Scheduled next read:", None),
            (aws("error", "Error from io_ctx::run(): Websocket read error"), logging.ERROR,
             "Error from io_ctx::run(): Websocket read error", "disconnected"),
            ("[2024-05-01 12:00:00] [warning] short form without pid", logging.WARNING,
             "short form without pid", None),
            (f"{BUNDLED_TIME} INFO {BUNDLED_CONNECTED}", logging.INFO, BUNDLED_CONNECTED,
             "connected"),
            (f"{BUNDLED_TIME} WARNING cannot reach 127.0.0.1:9, retrying: [Errno 111] refused",
             logging.WARNING, "cannot reach 127.0.0.1:9, retrying: [Errno 111] refused", None),
            (f"{BUNDLED_TIME} WARNING connection lost (EOF), reconnecting", logging.WARNING,
             "connection lost (EOF), reconnecting", "disconnected"),
            (f"{BUNDLED_TIME} ERROR tunnel refused the connection: 403", logging.ERROR,
             "tunnel refused the connection: 403", None),
            (f"{BUNDLED_TIME} CRITICAL boom", logging.ERROR, "boom", None),
            (f"{BUNDLED_TIME} DEBUG pong rtt_ms=3", logging.DEBUG, "pong rtt_ms=3", None),
            # Only a message that *starts* with the phrase counts.
            (aws("error", "not connected to the tunnel yet"), logging.ERROR,
             "not connected to the tunnel yet", None),
            ("Traceback (most recent call last):", logging.INFO,
             "Traceback (most recent call last):", None),
            ("SSL is disabled", logging.INFO, "SSL is disabled", None),
        ],
    )  # fmt: skip
    def test_formats(self, line, level, message, event):
        """Both proxies' formats give the line's level, its message and connection events."""
        parsed = parse_line(line)

        assert (parsed.level, parsed.message, parsed.event) == (level, message, event)


class Changes:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def watch(timeout: float, changes: Changes) -> ConnectionWatch:
    return ConnectionWatch(
        log=structlog.get_logger().bind(pid=4242), timeout=timeout, on_change=changes
    )


class TestConnectionWatch:
    async def test_overdue_is_reported_once(self, capture):
        """No connected line in time: connected False, one warning with the last error line."""
        changes = Changes()
        conn = watch(100 * MS, changes)

        conn.feed(aws("info", "Starting proxy in destination mode"), "stdout")
        conn.feed(aws("warning", "Web proxy not set"), "stdout")
        conn.feed(aws("error", "Could not perform SSL handshake: certificate verify failed"), "x")
        assert conn.connected is None
        await asyncio.sleep(300 * MS)
        conn.feed(aws("error", "Could not perform SSL handshake: certificate verify failed"), "x")
        conn.close()

        assert conn.connected is False
        assert conn.last_error == "Could not perform SSL handshake: certificate verify failed"
        [warning] = capture.named("proxy_not_connected")
        assert warning["level"] == "warning"
        assert warning["pid"] == 4242
        assert warning["timeout"] == pytest.approx(0.1)
        assert warning["last_error"] == conn.last_error
        levels = [e["level"] for e in capture.named("proxy_output")]
        assert levels == ["info", "warning", "error", "error"]
        # The same error again while overdue is no news for the status file.
        assert changes.count == 1

    async def test_new_error_while_overdue_is_published(self, capture):
        """A different error line after the report updates the status (on_change)."""
        changes = Changes()
        conn = watch(50 * MS, changes)
        await wait_for(lambda: conn.connected is False)

        conn.feed(aws("error", "Proxy server rejected web socket upgrade request: 403"), "stdout")
        conn.close()

        assert changes.count == 2
        assert conn.last_error == "Proxy server rejected web socket upgrade request: 403"
        assert capture.named("proxy_not_connected")[0]["last_error"] is None

    async def test_connected_in_time(self, capture):
        """A connected line stops the clock and clears the last error."""
        changes = Changes()
        conn = watch(100 * MS, changes)

        conn.feed(f"{BUNDLED_TIME} WARNING cannot reach 127.0.0.1:9, retrying: refused", "stderr")
        conn.feed(f"{BUNDLED_TIME} INFO connected to the tunnel mode=destination", "stderr")
        await asyncio.sleep(250 * MS)
        conn.close()

        assert conn.connected is True
        assert conn.last_error is None
        assert capture.named("proxy_not_connected") == []
        assert capture.named("proxy_connected")[0]["after"] < 0.1
        assert changes.count == 1

    async def test_late_connection_after_report(self, capture):
        """Overdue, then connected: connected True again, proxy_connected says how late."""
        changes = Changes()
        conn = watch(50 * MS, changes)
        await wait_for(lambda: conn.connected is False)

        conn.feed(aws("info", "Successfully established websocket connection with proxy"), "o")
        conn.close()

        assert conn.connected is True
        assert capture.named("proxy_connected")[0]["after"] >= 0.05
        assert changes.count == 2

    async def test_drop_restarts_the_clock(self, capture):
        """A connection lost after connecting is watched again with the same timeout."""
        changes = Changes()
        conn = watch(100 * MS, changes)
        conn.feed(f"{BUNDLED_TIME} INFO connected to the tunnel mode=destination", "stderr")
        await asyncio.sleep(150 * MS)

        conn.feed(f"{BUNDLED_TIME} WARNING connection lost (EOF), reconnecting", "stderr")
        assert conn.connected is None
        await wait_for(lambda: conn.connected is False)
        conn.close()

        [warning] = capture.named("proxy_not_connected")
        assert warning["last_error"] == "connection lost (EOF), reconnecting"
        assert changes.count == 3  # connected, reconnecting, overdue

    async def test_closed_clock_never_fires(self, capture):
        """After close() (the process exited) nothing is reported, even for late lines."""
        changes = Changes()
        conn = watch(50 * MS, changes)
        conn.close()
        conn.feed(f"{BUNDLED_TIME} WARNING connection lost (EOF), reconnecting", "stderr")

        await asyncio.sleep(150 * MS)

        assert conn.connected is None
        assert capture.named("proxy_not_connected") == []

    async def test_tokens_masked_in_log_and_last_error(self, capture):
        """A token in an error line is masked in the log and in last_error."""
        secrets.register(TOKEN)
        try:
            conn = watch(50 * MS, Changes())
            conn.feed(aws("error", f"upgrade rejected, access-token: {TOKEN}"), "stdout")
            await wait_for(lambda: conn.connected is False)
            conn.close()
        finally:
            secrets.unregister(TOKEN)

        assert conn.last_error == f"upgrade rejected, access-token: {MASK}"
        assert TOKEN not in capture.text
        assert capture.named("proxy_output")[0]["level"] == "error"


class TestBundledProxyForReal:
    async def test_unreachable_relay_is_reported(self, tmp_path, capture):
        """The real bundled proxy, pointed at a closed port, is reported with its own warning."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        argv = build_argv(
            [sys.executable, "-m", "agent.proxy"],
            services={"SSH": "22"},
            region="us-east-1",
            endpoint=f"127.0.0.1:{port}",
        )
        env = build_env(token=TOKEN, client_token="c" * 32)
        spec = ProxySpec(argv=tuple(argv), env=env, stop_grace=2.0, connect_timeout=1.0)
        changes = Changes()

        handle = await SubprocessLauncher().launch(
            spec, log=structlog.get_logger(), on_change=changes
        )
        try:
            await wait_for(lambda: handle.connected is False, timeout=10)
        finally:
            await handle.stop()

        [warning] = capture.named("proxy_not_connected")
        assert warning["last_error"].startswith(f"cannot reach 127.0.0.1:{port}, retrying")
        assert handle.last_error == warning["last_error"] or handle.last_error.startswith(
            f"cannot reach 127.0.0.1:{port}"
        )
        retries = [e for e in capture.named("proxy_output") if "cannot reach" in e["line"]]
        assert retries
        assert {e["level"] for e in retries} == {"warning"}
        assert changes.count >= 1
