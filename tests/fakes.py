"""
Test doubles for the agent's two seams, and a real stand-in proxy process.

- ``FakeNotificationSource``: an in-memory notification source (docs/architecture.md §5.1)
  fed by ``publish()``.
- ``SocketNotificationSource``: a notification source fed over a Unix datagram socket,
  so a *separate* agent process can be driven by a test (``python -m tests.fakes agent``).
- ``python -m tests.fakes agent-stuck CONFIG MARKER``: a real daemon on the real MQTT
  source whose proxy launches never finish (it touches MARKER when one starts), to kill
  an agent between receiving a notification and handling it.
- ``FakeProxyLauncher``: an in-memory proxy launcher (docs/architecture.md §5.2) whose
  proxies exit on command.
- ``write_fake_proxy()``: a tiny executable standing in for ``tunnel-localproxy``;
  it records its argv/environment to a 0600 JSON file and follows a plan.
- ``all_cmdlines()``: every process' command line, to check that no secret is on one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self


if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from agent.daemon.supervisor import ProxySpec

from agent.daemon.children import Child
from agent.notify.base import Acknowledgement, RawNotification


__all__ = [
    "MS",
    "FakeNotificationSource",
    "FakeProxy",
    "FakeProxyLauncher",
    "LogCapture",
    "SocketNotificationSource",
    "StuckLauncher",
    "all_cmdlines",
    "notification",
    "read_runs",
    "reset_logging",
    "send_datagram",
    "wait_for",
    "write_fake_proxy",
]

# One time unit for every timing-sensitive wait, scaled on slow machines.
MS = 0.001 * float(os.environ.get("TEST_TIME_SCALE", "1.0"))
TOPIC = "$aws/things/dev-1/tunnels/notify"


def notification(
    token: str = "AQGAAXi-token-destination-0001",  # noqa: S107 - a test token
    services: list[Any] | None = None,
    region: str = "us-east-1",
    mode: str = "destination",
) -> bytes:
    """Build a notification payload as AWS IoT publishes it (docs/protocol.md §17.2)."""
    return json.dumps(
        {
            "clientAccessToken": token,
            "clientMode": mode,
            "region": region,
            "services": ["SSH"] if services is None else services,
        }
    ).encode()


async def wait_for(predicate, timeout: float = 5000 * MS, interval: float = 10 * MS) -> None:
    """Poll ``predicate`` until true or fail after ``timeout`` seconds (tests only)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:.2f}s")
        await asyncio.sleep(interval)


class FakeNotificationSource:
    """An in-memory notification source: ``publish()`` delivers, ``close()`` ends iteration.

    Each notification's acknowledgement appends its payload to ``acked``.
    """

    def __init__(self, *, fail_on_enter: BaseException | None = None, block_enter: bool = False):
        self.entered = 0
        self.exited = 0
        self.fail_on_enter = fail_on_enter
        self.block_enter = block_enter
        self.acked: list[bytes] = []
        self._queue: asyncio.Queue[RawNotification | None] = asyncio.Queue()

    async def __aenter__(self) -> Self:
        if self.block_enter:
            await asyncio.Event().wait()
        if self.fail_on_enter is not None:
            raise self.fail_on_enter
        self.entered += 1
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.exited += 1
        self._queue.put_nowait(None)

    def publish(self, payload: bytes, topic: str = TOPIC) -> RawNotification:
        ack = Acknowledgement(lambda: self.acked.append(payload))
        raw = RawNotification(topic=topic, payload=payload, ack=ack)
        self._queue.put_nowait(raw)
        return raw

    def close(self) -> None:
        """End the iteration as a source that lost its connection for good would."""
        self._queue.put_nowait(None)

    async def _iterate(self) -> AsyncIterator[RawNotification]:
        while (item := await self._queue.get()) is not None:
            yield item

    def __aiter__(self) -> AsyncIterator[RawNotification]:
        return self._iterate()


class SocketNotificationSource:
    """A notification source reading one payload per datagram from a Unix socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._socket: socket.socket | None = None

    async def __aenter__(self) -> Self:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.path))
        sock.setblocking(False)  # noqa: FBT003 - socket API
        self._socket = sock
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _iterate(self) -> AsyncIterator[RawNotification]:
        loop = asyncio.get_running_loop()
        assert self._socket is not None
        while True:
            payload = await loop.sock_recv(self._socket, 1 << 20)
            yield RawNotification(topic=TOPIC, payload=payload)

    def __aiter__(self) -> AsyncIterator[RawNotification]:
        return self._iterate()


def send_datagram(path: Path, payload: bytes) -> None:
    """Deliver one payload to a SocketNotificationSource."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(payload, str(path))


class FakeProxy:
    """A proxy handle whose exit the test decides."""

    def __init__(self, spec: ProxySpec, pid: int) -> None:
        self.spec = spec
        self._pid = pid
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.stopped = False
        self.connected: bool | None = None
        self.last_error: str | None = None
        self.detached = False

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._exit.result() if self._exit.done() else None

    def exit(self, returncode: int) -> None:
        if not self._exit.done():
            self._exit.set_result(returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    async def stop(self) -> int:
        self.stopped = True
        self.exit(-signal.SIGTERM)
        return await self.wait()

    async def detach(self) -> Child | None:
        """Hand the fake on: it keeps 'running', described by its pid and fake pipe fds."""
        if self.returncode is not None:
            return None
        self.detached = True
        return Child(self._pid, 1000 + self._pid % 1000, 2000 + self._pid % 1000)


class FakeProxyLauncher:
    """Records every launch; ``fail`` makes the next launches raise ProxyStartError."""

    def __init__(self) -> None:
        self.proxies: list[FakeProxy] = []
        self.adopted: list[FakeProxy] = []
        self.fail = False
        self.refuse_adoption = False
        self._pids = itertools.count(10_000)

    async def adopt(
        self, child: Child, *, log: Any, stop_grace: float, **_watch: Any
    ) -> FakeProxy | None:
        """Adopt a handed-on fake (``refuse_adoption``: as if it were not our child)."""
        del stop_grace
        if self.refuse_adoption:
            return None
        proxy = FakeProxy(None, child.pid)  # type: ignore[arg-type]
        log.info("fake_proxy_adopted", pid=proxy.pid)
        self.adopted.append(proxy)
        return proxy

    async def launch(self, spec: ProxySpec, *, log: Any, on_change: Any = None) -> FakeProxy:
        from agent.exceptions import ProxyStartError

        if self.fail:
            raise ProxyStartError("cannot start fake: No such file or directory")
        proxy = FakeProxy(spec, next(self._pids))
        log.info("fake_proxy_launched", pid=proxy.pid)
        self.proxies.append(proxy)
        return proxy

    @property
    def running(self) -> list[FakeProxy]:
        return [p for p in self.proxies + self.adopted if p.returncode is None and not p.detached]


FAKE_PROXY = """\
#!{python}
# Stands in for tunnel-localproxy: records argv/env (0600), then follows its plan.
import fcntl, json, os, signal, sys, time
from pathlib import Path

directory = Path(os.environ["FAKE_PROXY_DIR"])
record = {{"argv": sys.argv, "env": dict(os.environ), "pid": os.getpid(),
          "pgid": os.getpgid(0), "ppid": os.getppid(), "time": time.time()}}
fd = os.open(directory / f"run-{{os.getpid()}}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "w") as file:
    json.dump(record, file)

action = "wait"
plan = directory / "plan"
if plan.exists():
    with plan.open("r+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        lines = file.read().split()
        if lines:
            action = lines[0]
            file.seek(0)
            file.truncate()
            file.write("\\n".join(lines[1:]))

print("fake proxy up", action, flush=True)
if os.environ.get("FAKE_PROXY_ECHO_TOKEN"):
    print("token is", os.environ.get("AWSIOT_TUNNEL_ACCESS_TOKEN"), file=sys.stderr, flush=True)

def on_term(signum, frame):
    (directory / f"term-{{os.getpid()}}").write_text("")
    sys.exit(0)

if action.startswith("exit:"):
    sys.exit(int(action.split(":", 1)[1]))
if action == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, on_term)
(directory / f"ready-{{os.getpid()}}").write_text("")
while True:
    time.sleep(3600)
"""


def write_fake_proxy(directory: Path, plan: list[str] | None = None) -> Path:
    """Write the stand-in proxy (and its plan: ``exit:N``, ``wait``, ``ignore-term``)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fake-localproxy"
    path.write_text(FAKE_PROXY.format(python=sys.executable))
    path.chmod(0o755)
    if plan is not None:
        (directory / "plan").write_text("\n".join(plan))
    return path


def read_runs(directory: Path) -> list[dict[str, Any]]:
    """Every recorded run of the fake proxy, oldest first."""
    runs = []
    for path in directory.glob("run-*.json"):
        with contextlib.suppress(ValueError):  # being written right now
            runs.append(json.loads(path.read_text()) | {"mode": path.stat().st_mode & 0o777})
    return sorted(runs, key=lambda r: r["time"])


class LogCapture:
    """The agent's real logging pipeline (redaction included) writing JSON to memory."""

    def __init__(self, level: str = "debug") -> None:
        import io

        from agent.logging import configure_logging

        self.stream = io.StringIO()
        configure_logging(level=level, fmt="json", stream=self.stream)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    @property
    def events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


def reset_logging() -> None:
    """Undo configure_logging(): structlog defaults, no context, no root handler."""
    import logging

    import structlog

    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if handler.get_name() == "tunnel-agent":
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.NOTSET)


def _agent_main(argv: list[str]) -> int:
    """``python -m tests.fakes agent CONFIG SOCKET``: a real daemon fed by a socket."""
    from agent.daemon.lifecycle import build_daemon
    from agent.daemon.settings import load_settings
    from agent.logging import configure_logging

    config, sock = Path(argv[0]), Path(argv[1])
    settings = load_settings(config)
    configure_logging(level=settings.logging.level, fmt="json")
    daemon = build_daemon(
        settings, reload=lambda: load_settings(config), source=SocketNotificationSource(sock)
    )
    return asyncio.run(daemon.run())


class StuckLauncher:
    """A launcher whose launches never complete; the first one touches ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    async def launch(self, spec: ProxySpec, *, log: Any, on_change: Any = None) -> Any:
        log.info("stuck_launch", argv0=spec.argv[0])
        self.marker.touch()
        await asyncio.Event().wait()


def _stuck_agent_main(argv: list[str]) -> int:
    """``python -m tests.fakes agent-stuck CONFIG MARKER``: real MQTT, launches that hang."""
    from agent.daemon.lifecycle import build_daemon
    from agent.daemon.settings import load_settings
    from agent.logging import configure_logging

    config, marker = Path(argv[0]), Path(argv[1])
    settings = load_settings(config, {"runtime_dir": str(marker.parent)})
    configure_logging(level=settings.logging.level, fmt="json")
    daemon = build_daemon(settings, launcher=StuckLauncher(marker))
    return asyncio.run(daemon.run())


def all_cmdlines() -> bytes:
    """Every process' command line, concatenated."""
    chunks = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                chunks.append((entry / "cmdline").read_bytes())
    return b"\n".join(chunks)


if __name__ == "__main__":
    if sys.argv[1:2] == ["agent"]:
        raise SystemExit(_agent_main(sys.argv[2:]))
    if sys.argv[1:2] == ["agent-stuck"]:
        raise SystemExit(_stuck_agent_main(sys.argv[2:]))
    raise SystemExit(f"usage: {sys.argv[0]} agent CONFIG SOCKET | agent-stuck CONFIG MARKER")


class FakeClock:
    """A settable epoch-seconds clock; by default it starts at the real time (SigV4 dates)."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now
