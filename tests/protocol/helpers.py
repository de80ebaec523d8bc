"""Helpers for the protocol tests: frame builders, assertions and the in-memory TunnelPair."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.protocol import (
    CLIENT,
    DESTINATION,
    SERVICE,
    SOURCE,
    V3,
    Event,
    Message,
    MessageType,
    ProtocolVersion,
    StreamTable,
    TunnelProtocol,
    decode_message,
    encode_frame,
    encode_message,
)


if TYPE_CHECKING:
    from collections.abc import Callable, Iterable


__all__ = [
    "VECTORS",
    "TunnelPair",
    "assert_events_received",
    "assert_frames_sent",
    "decode_frames",
    "frame",
    "load_vectors",
]

VECTORS = Path(__file__).parent / "vectors" / "frames.json"


def encode_frames(*messages: Message) -> bytes:
    """The tunnel frames (2-byte length, message) of MESSAGES, back to back."""
    return b"".join(encode_frame(encode_message(message)) for message in messages)


def load_vectors() -> list[dict[str, Any]]:
    """Return the frame vectors of tests/protocol/vectors/frames.json."""
    return json.loads(VECTORS.read_text())["vectors"]


def frame(mtype: MessageType | int, **fields: Any) -> bytes:
    """Return one whole frame (prefix included) for a message built from keyword fields."""
    return encode_frame(encode_message(Message(mtype, **fields)))


def decode_frames(data: bytes) -> list[Message]:
    """Split a byte string of whole frames and decode every frame."""
    messages = []
    pos = 0
    while pos < len(data):
        size = data[pos] << 8 | data[pos + 1]
        body = data[pos + 2 : pos + 2 + size]
        assert len(body) == size, "partial frame"
        messages.append(decode_message(body))
        pos += 2 + size
    return messages


def assert_frames_sent(protocol: TunnelProtocol, expected: list[Message]) -> None:
    """Drain messages_to_send() and check each holds exactly one frame, equal to expected."""
    sent = protocol.messages_to_send()
    decoded = []
    for message in sent:
        frames = decode_frames(message)
        assert len(frames) == 1, "one frame per WebSocket message"
        decoded.extend(frames)
    assert decoded == expected


def assert_events_received(protocol: TunnelProtocol, expected: list[Event]) -> None:
    """Drain events_received() and compare with expected."""
    assert protocol.events_received() == expected


class TunnelPair:
    """
    A source and a destination local proxy joined through the relay's two ends, in memory.

    CLIENT+SOURCE <-> SERVICE+SOURCE ==(shared StreamTable)== SERVICE+DESTINATION <->
    CLIENT+DESTINATION. ``pump()`` moves bytes until nothing is left; ``split`` may cut every
    WebSocket message into pieces to exercise reassembly (the relay may regroup messages).
    Events are collected per end.
    """

    def __init__(
        self,
        *,
        services: Iterable[str] = ("SSH",),
        source_version: ProtocolVersion = V3,
        subprotocol: ProtocolVersion = V3,
        split: Callable[[bytes], list[bytes]] | None = None,
        **limits: int,
    ) -> None:
        services = tuple(services)
        self.table = StreamTable()
        self.source = TunnelProtocol(
            CLIENT, SOURCE, services=services, version=source_version, **limits
        )
        self.destination = TunnelProtocol(CLIENT, DESTINATION, services=services, **limits)
        self.relay_source = TunnelProtocol(
            SERVICE, SOURCE, services=services, version=subprotocol, streams=self.table, **limits
        )
        self.relay_destination = TunnelProtocol(
            SERVICE,
            DESTINATION,
            services=services,
            version=subprotocol,
            streams=self.table,
            **limits,
        )
        self.split = split or (lambda data: [data])
        self.events: dict[str, list[Event]] = {
            "source": [],
            "destination": [],
            "relay_source": [],
            "relay_destination": [],
        }
        self.forwarded: list[bytes] = []

    def connect(self) -> None:
        """Have both relay ends announce the services, as after the handshake."""
        self.relay_source.send_service_ids()
        self.relay_destination.send_service_ids()
        self.pump()

    def _deliver(self, messages: list[bytes], to: TunnelProtocol) -> bool:
        for message in messages:
            for piece in self.split(message):
                to.receive_message(piece)
        return bool(messages)

    def pump(self) -> None:
        """Move every pending message along the chain until the tunnel is quiet."""
        moved = True
        while moved:
            moved = False
            moved |= self._deliver(self.source.messages_to_send(), self.relay_source)
            moved |= self._deliver(self.destination.messages_to_send(), self.relay_destination)
            moved |= self._deliver(self.relay_source.messages_to_send(), self.source)
            moved |= self._deliver(self.relay_destination.messages_to_send(), self.destination)
            to_destination = self.relay_source.messages_to_forward()
            self.forwarded.extend(to_destination)
            moved |= self._deliver(to_destination, self.destination)
            to_source = self.relay_destination.messages_to_forward()
            self.forwarded.extend(to_source)
            moved |= self._deliver(to_source, self.source)
            for name in self.events:
                self.events[name].extend(getattr(self, name).events_received())

    def take(self, name: str) -> list[Event]:
        """Return and forget the events collected at one end."""
        events, self.events[name] = self.events[name], []
        return events

    def received(self, name: str) -> bytes:
        """Return and forget the DATA bytes one client end received, concatenated."""
        data = b"".join(getattr(event, "data", b"") for event in self.events[name])
        self.events[name] = [e for e in self.events[name] if not hasattr(e, "data")]
        return data
