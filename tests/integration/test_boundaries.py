"""
WebSocket message boundaries under fuzzed timings: no control frame shares a message.

Recording peers stand where the AWS localproxy would: raw WebSocket endpoints (websockets' own
client and server, not our fast path) that keep every message they receive and check, frame by
frame, that a message holding a control frame holds nothing else (docs/protocol.md §5.7). They
cover the relay's output towards each mode and the output of each bundled proxy.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import serve

from agent.protocol import (
    CONNECTION_RESET,
    CONNECTION_START,
    DATA,
    SERVICE_IDS,
    STREAM_RESET,
    STREAM_START,
    Message,
    decode_message,
)
from tests.integration.dataplane import (
    PROXY,
    SCALE,
    ProxyProcess,
    RelayThread,
    ThreadedServer,
    echo,
)
from tests.protocol.helpers import encode_frames


if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from websockets.sync.connection import Connection
    from websockets.sync.server import ServerConnection

pytestmark = pytest.mark.integration

V3 = "aws.iot.securetunneling-3.0"
MAX_MESSAGE = 131076
SEEDS = (1, 2, 3)


def fuzz(seed: int) -> random.Random:
    """A reproducible generator for one test's traffic and timings."""
    return random.Random(seed)  # noqa: S311 - traffic to replay, not secrets


def data(stream: int, service: str, connection: int, payload: bytes) -> bytes:
    return encode_frames(
        Message(DATA, stream, service_id=service, connection_id=connection, payload=payload)
    )


def control(mtype: int, stream: int, service: str, connection: int = 0) -> bytes:
    return encode_frames(Message(mtype, stream, service_id=service, connection_id=connection))


def split_frames(message: bytes) -> list[bytes]:
    """The whole frames of one WebSocket message; our senders never cut a frame."""
    frames = []
    pos = 0
    while pos < len(message):
        end = pos + 2 + (message[pos] << 8 | message[pos + 1])
        assert end <= len(message), "a WebSocket message ends inside a tunnel frame"
        frames.append(message[pos:end])
        pos = end
    return frames


def message_of(whole: bytes) -> Message:
    return decode_message(whole[2:])


@dataclass
class Counts:
    messages: int = 0
    frames: int = 0
    control: int = 0  # messages holding a control frame
    grouped_data: int = 0  # messages holding several DATA frames

    def __add__(self, other: Counts) -> Counts:
        return Counts(
            self.messages + other.messages,
            self.frames + other.frames,
            self.control + other.control,
            self.grouped_data + other.grouped_data,
        )


@dataclass
class Recording:
    """Every WebSocket message one peer received, in order."""

    name: str
    messages: list[bytes] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    last: float = field(default_factory=time.monotonic)

    def add(self, message: bytes) -> None:
        with self.changed:
            self.messages.append(message)
            self.last = time.monotonic()
            self.changed.notify_all()

    def frames(self) -> list[bytes]:
        with self.changed:
            return [f for message in self.messages for f in split_frames(message)]

    def wait_for(self, predicate: Callable[[list[bytes]], bool], timeout: float = 20) -> None:
        with self.changed:
            ok = self.changed.wait_for(
                lambda: predicate([f for m in self.messages for f in split_frames(m)]),
                timeout * SCALE,
            )
        assert ok, f"{self.name}: not seen within {timeout}s"

    def wait_quiet(self, quiet: float = 0.7, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout * SCALE
        while time.monotonic() - self.last < quiet and time.monotonic() < deadline:
            time.sleep(0.05)

    def check(self) -> Counts:
        """Assert the rule on every message; return the counts."""
        counts = Counts()
        for message in self.messages:
            frames = split_frames(message)
            types = [message_of(f).type for f in frames]
            assert all(t == DATA for t in types) or len(frames) == 1, (
                f"{self.name}: a control frame shares a WebSocket message: {types}"
            )
            counts.messages += 1
            counts.frames += len(frames)
            counts.control += any(t != DATA for t in types)
            counts.grouped_data += len(frames) > 1
        print(f"recording peer {self.name}: {counts}")
        return counts


def has_payload(payload: bytes) -> Callable[[list[bytes]], bool]:
    def seen(frames: list[bytes]) -> bool:
        return any(message_of(f).payload == payload for f in frames)

    return seen


def record(ws: Connection, recording: Recording, react: Callable[[bytes], None] | None) -> None:
    """Receive until the connection closes, recording each message (and reacting to it)."""
    with contextlib.suppress(ConnectionClosed):
        while True:
            message = ws.recv()
            assert isinstance(message, bytes), "text frame"
            recording.add(message)
            if react is not None:
                react(message)


def recorder(
    ws: Connection, recording: Recording, react: Callable[[bytes], None] | None = None
) -> threading.Thread:
    thread = threading.Thread(target=record, args=(ws, recording, react), daemon=True)
    thread.start()
    return thread


class SourceScript:
    """
    A random but valid sequence of source frames over several services (V3 unless ``v2``).

    ``duplicates`` also starts connections whose id is still open, which the destination
    answers with CONNECTION_RESET (docs/protocol.md §6.4), sometimes several in one message.
    """

    def __init__(
        self, rng: random.Random, services: tuple[str, ...], *, duplicates: bool = False
    ) -> None:
        self.rng = rng
        self.services = services
        self.duplicates = duplicates
        self.active = dict.fromkeys(services, 0)
        self.counter = dict.fromkeys(services, 0)
        self.open: dict[str, set[int]] = {s: set() for s in services}
        self.next_id = dict.fromkeys(services, 1)

    def start(self, service: str) -> bytes:
        self.counter[service] += 1
        self.active[service] = self.counter[service]
        self.open[service] = {1}
        self.next_id[service] = 2
        return control(STREAM_START, self.active[service], service, 1)

    def frames(self, count: int) -> list[bytes]:
        rng = self.rng
        first = self.services[0]
        out = [self.start(first), data(self.active[first], first, 1, b"first bytes at once")]
        while len(out) < count:
            service = rng.choice(self.services)
            stream, open_ = self.active[service], self.open[service]
            roll = rng.random()
            if not stream or roll < 0.02:
                out.append(self.start(service))
            elif roll < 0.55 and open_:
                size = rng.choice((1, 10, 100, 1000, 5000, 20000))
                out.append(data(stream, service, rng.choice(sorted(open_)), rng.randbytes(size)))
            elif roll < 0.72:
                connection = self.next_id[service]
                self.next_id[service] += 1
                open_.add(connection)
                out.append(control(CONNECTION_START, stream, service, connection))
            elif roll < 0.8 and self.duplicates and open_:
                for connection in sorted(open_)[: rng.randint(1, 3)]:
                    open_.discard(connection)
                    out.append(control(CONNECTION_START, stream, service, connection))
            elif roll < 0.95 and open_:
                connection = rng.choice(sorted(open_))
                open_.discard(connection)
                out.append(control(CONNECTION_RESET, stream, service, connection))
            else:
                out.append(control(STREAM_RESET, stream, service))
                self.active[service] = 0
        return out


def send_grouped(ws: Connection, rng: random.Random, frames: list[bytes]) -> int:
    """
    Send ``frames`` in WebSocket messages of 1 to 6 frames, with random pauses.

    Returns:
        How many messages grouped a control frame with others (the input the relay must split).
    """
    grouped_control = 0
    pos = 0
    while pos < len(frames):
        group = frames[pos : pos + rng.randint(1, 6)]
        pos += len(group)
        if len(group) > 1 and any(message_of(f).type != DATA for f in group):
            grouped_control += 1
        ws.send(b"".join(group))
        time.sleep(rng.choice((0, 0, 0, 0.0002, 0.001, 0.003)))
    return grouped_control


def open_ws(
    relay: RelayThread, mode: str, token: str, client_token: str | None = None
) -> Connection:
    headers = {"access-token": token}
    if client_token:
        headers["client-token"] = client_token
    return ws_connect(
        f"ws://127.0.0.1:{relay.port}/tunnel?local-proxy-mode={mode}",
        additional_headers=headers,
        subprotocols=[V3],  # type: ignore[list-item]
        open_timeout=5,
        close_timeout=2,
        max_size=MAX_MESSAGE,
        ping_interval=None,
        compression=None,
    )


@pytest.fixture
def plain_relay(tmp_path: Path) -> Iterator[RelayThread]:
    relay = RelayThread(tmp_path, tls=False).start()
    yield relay
    relay.shutdown()


@pytest.fixture
def closing() -> Iterator[contextlib.ExitStack]:
    """Where a test enters its WebSocket clients, to close them whatever happens."""
    with contextlib.ExitStack() as stack:
        yield stack


@pytest.mark.parametrize("seed", SEEDS)
def test_relay_sends_control_frames_alone_to_both_modes(
    plain_relay: RelayThread, closing: contextlib.ExitStack, seed: int
):
    """
    Peers that group control frames with others get them back from the relay one per message.

    A raw source sends random V3 traffic in groups of 1-6 frames right after connecting; a raw
    destination answers some frames with grouped DATA and resets. Then the source reconnects with
    its client token (the relay resets the destination's streams) and sends again. Every frame
    still arrives byte for byte, in order.
    """
    rng = fuzz(seed)
    answers = fuzz(seed + 1000)
    tokens = plain_relay.open_tunnel(("A", "B"))
    client_token = secrets.token_hex(20)
    to_destination, to_source, to_new_source = (
        Recording("relay->destination"),
        Recording("relay->source"),
        Recording("relay->source (reconnected)"),
    )
    answered: list[bytes] = []
    answering = threading.Event()
    answering.set()
    back = data(1, "A", 1, b"BACK")

    destination = closing.enter_context(open_ws(plain_relay, "destination", tokens.destination))

    def answer(message: bytes) -> None:
        # The destination answers some source frames at once, grouping control frames too; on
        # the first round's last frame it sends its own last frame and stops answering.
        if not answering.is_set():
            return
        for whole in split_frames(message):
            msg = message_of(whole)
            if msg.payload == b"END-1":
                answering.clear()
                answered.append(back)
                destination.send(back)
                return
            if msg.type == SERVICE_IDS or answers.random() > 0.3:
                continue
            stream, service, connection = msg.stream_id, msg.service_id, msg.connection_id or 1
            reply = data(stream, service, connection, answers.randbytes(answers.choice((3, 300))))
            reset = control(CONNECTION_RESET, stream, service, connection)
            group = answers.choice(
                (
                    [reply],
                    [reply, reply],
                    [reply, reset],
                    [reset, reply],
                    [control(STREAM_RESET, stream, service), reply],
                )
            )
            answered.extend(group)
            destination.send(b"".join(group))

    threads = [recorder(destination, to_destination, answer)]
    source = closing.enter_context(open_ws(plain_relay, "source", tokens.source, client_token))
    threads.append(recorder(source, to_source))

    first = [*SourceScript(rng, ("A", "B")).frames(300), data(1, "A", 1, b"END-1")]
    grouped_in = send_grouped(source, rng, first)
    to_source.wait_for(has_payload(b"BACK"))

    new_source = closing.enter_context(open_ws(plain_relay, "source", tokens.source, client_token))
    threads.append(recorder(new_source, to_new_source))
    second = [*SourceScript(rng, ("B", "A")).frames(300), data(1, "B", 1, b"END-2")]
    grouped_in += send_grouped(new_source, rng, second)
    to_destination.wait_for(has_payload(b"END-2"))
    for ws in (new_source, source, destination):
        ws.close()
    for thread in threads:
        thread.join(5 * SCALE)

    counts = [r.check() for r in (to_destination, to_source, to_new_source)]
    total = counts[0] + counts[1] + counts[2]
    print(f"relay: {grouped_in} grouped control messages in, out {total}")
    received = to_destination.frames()
    resets = received[1 + len(first) : len(received) - len(second)]
    assert grouped_in > 20, "the peers must give the relay control frames to split"
    assert message_of(received[0]).type == SERVICE_IDS
    assert received[1 : 1 + len(first)] == first
    assert received[len(received) - len(second) :] == second
    assert len(resets) <= 2
    assert all(message_of(f).type == STREAM_RESET for f in resets)
    assert to_source.frames() == [to_source.frames()[0], *answered]
    assert [message_of(f).type for f in to_new_source.frames()] == [SERVICE_IDS]
    assert total.grouped_data > 0, "DATA is still grouped"


class StandIn:
    """
    A relay stand-in for one proxy: records every message it receives; ``play`` is the far side.
    """

    def __init__(self, name: str, play: Callable[[ServerConnection, Recording], None]) -> None:
        self.recording = Recording(f"{name}->relay")
        self.play = play
        self.errors: list[BaseException] = []
        self.server = serve(
            self._handle,
            "127.0.0.1",
            0,
            subprotocols=[V3],  # type: ignore[list-item]
            max_size=MAX_MESSAGE,
            ping_interval=None,
            compression=None,
        )
        self.port = self.server.socket.getsockname()[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _handle(self, ws: ServerConnection) -> None:
        try:
            self.play(ws, self.recording)
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)
            raise

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


def proxy_to(stand_in: StandIn, tmp_path: Path, *args: str) -> ProxyProcess:
    return ProxyProcess(
        ["-e", f"127.0.0.1:{stand_in.port}", "--no-tls", *args],
        token="t",
        log_file=tmp_path / "proxy.log",
        binary=PROXY,
    )


def linger_reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.parametrize("version", ["V3", "V2"])
@pytest.mark.parametrize("seed", SEEDS)
def test_source_proxy_sends_control_frames_alone(tmp_path: Path, seed: int, version: str):
    """
    The source proxy's messages keep the rule whatever its applications do.

    Applications connect, send at once, pause and end (FIN or RST) in random order; the far side
    answers with grouped DATA and resets. Every message the source sends keeps the rule.
    """
    rng = fuzz(seed)
    connections = 40

    def play(ws: ServerConnection, recording: Recording) -> None:
        answers = fuzz(seed + 1000)
        ws.send(encode_frames(Message(SERVICE_IDS, available_service_ids=("A", "B"))))

        def answer(message: bytes) -> None:
            for whole in split_frames(message):
                msg = message_of(whole)
                if msg.type != DATA or answers.random() > 0.15:
                    continue
                stream, service, connection = msg.stream_id, msg.service_id, msg.connection_id
                reply = data(stream, service, connection, b"answer")
                if connection:
                    end = control(CONNECTION_RESET, stream, service, connection)
                else:
                    end = control(STREAM_RESET, stream, service)
                ws.send(b"".join(answers.choice(([reply], [reply, reply], [reply, end]))))

        record(ws, recording, answer)

    stand_in = StandIn(f"source {version}", play)
    proxy = proxy_to(stand_in, tmp_path, "-s", "A=0,B=0", "-y", version)
    try:
        ports = [proxy.port("A"), proxy.port("B")]
        plans = [
            (rng.choice(ports), rng.choice((1, 100, 5000, 70000, 300000)), rng.random() < 0.3,
             rng.choice((0, 0, 0.001, 0.01)), i)
            for i in range(connections)
        ]  # fmt: skip

        def application(plan: tuple[int, int, bool, float, int]) -> None:
            port, size, reset, pause, i = plan
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port)) as sock,
            ):
                payload = fuzz(i).randbytes(size)
                sock.sendall(payload[: size // 2])
                time.sleep(pause)
                sock.sendall(payload[size // 2 :])
                if reset:
                    linger_reset(sock)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(application, plans))
        stand_in.recording.wait_quiet()
    finally:
        proxy.stop()
        stand_in.close()

    counts = stand_in.recording.check()
    types = [message_of(f).type for f in stand_in.recording.frames()]
    assert not stand_in.errors
    assert types.count(STREAM_START) >= 2
    assert counts.control >= types.count(STREAM_START) + types.count(CONNECTION_START)
    if version == "V3":
        assert types.count(CONNECTION_START) > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_destination_proxy_sends_control_frames_alone(tmp_path: Path, seed: int):
    """
    The destination proxy's messages keep the rule whatever the far side does.

    A far side that groups everything drives the destination: streams and connections start,
    restart with ids in use (several CONNECTION_RESET answers from one message), reset, and
    fail to connect. Every message the destination sends keeps the rule.
    """
    echo_server = ThreadedServer(echo)

    def closer(conn: socket.socket) -> None:
        conn.recv(100)

    quick = ThreadedServer(closer)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()

    def play(ws: ServerConnection, recording: Recording) -> None:
        rng = fuzz(seed)
        ws.send(encode_frames(Message(SERVICE_IDS, available_service_ids=("A", "B", "C"))))
        thread = recorder(ws, recording)
        script = SourceScript(rng, ("A", "B", "C"), duplicates=True).frames(400)
        send_grouped(ws, rng, script)
        recording.wait_quiet(quiet=1.0)
        ws.close()
        thread.join(5)

    stand_in = StandIn("destination", play)
    proxy = proxy_to(
        stand_in,
        tmp_path,
        "-d",
        f"A={echo_server.port},B={quick.port},C={dead_port}",
        "--connect-retries",
        "1",
    )
    try:
        code = proxy.wait(60)
    finally:
        proxy.stop()
        stand_in.close()
        echo_server.close()
        quick.close()

    counts = stand_in.recording.check()
    types = [message_of(f).type for f in stand_in.recording.frames()]
    assert not stand_in.errors
    assert code == 0
    assert types.count(CONNECTION_RESET) > 5
    assert types.count(STREAM_RESET) > 0
    assert types.count(DATA) > 0
    assert counts.control == types.count(CONNECTION_RESET) + types.count(STREAM_RESET)
