"""Micro-benchmark of the DATA hot path: ``python -m tests.protocol.bench_protocol``.

Measures 64512-byte DATA frames per second through each role of TunnelProtocol (no I/O),
with the generated protobuf code as a reference. Takes the best of several runs, since a
shared machine adds noise.
"""

from __future__ import annotations

import os
import timeit

from agent.protocol import (
    CLIENT,
    DESTINATION,
    MAX_PAYLOAD_SIZE,
    SERVICE,
    SOURCE,
    StreamTable,
    TunnelProtocol,
)
from agent.protocol._pb import message_pb2


NUMBER = 2000
REPEAT = 7


def best(func: object) -> float:
    """Return the best time per call, in seconds."""
    return min(timeit.repeat(func, number=NUMBER, repeat=REPEAT)) / NUMBER  # type: ignore[arg-type]


def report(name: str, seconds: float) -> None:
    """Print one line: microseconds per frame, frames/s and payload MB/s."""
    print(
        f"{name:44s} {seconds * 1e6:7.2f} us/frame {1 / seconds:9.0f} frames/s"
        f" {MAX_PAYLOAD_SIZE / seconds / 1e6:8.0f} MB/s"
    )


def main() -> None:
    """Run the benchmark."""
    chunk = os.urandom(MAX_PAYLOAD_SIZE)
    table = StreamTable()
    source = TunnelProtocol(CLIENT, SOURCE, services=("SSH",))
    relay = TunnelProtocol(SERVICE, SOURCE, services=("SSH",), streams=table)
    destination = TunnelProtocol(CLIENT, DESTINATION, services=("SSH",))
    source.send_stream_start("SSH")
    (start,) = source.messages_to_send()
    relay.receive_message(start)
    destination.receive_message(relay.messages_to_forward()[0])
    destination.events_received()
    relay.events_received()
    source.send_data("SSH", 1, chunk)
    (frame,) = source.messages_to_send()

    def send() -> None:
        source.send_data("SSH", 1, chunk)
        source.messages_to_send()

    def receive() -> None:
        destination.receive_message(frame)
        destination.events_received()

    def validate() -> None:
        relay.receive_message(frame)
        relay.messages_to_forward()

    def chain() -> None:
        source.send_data("SSH", 1, chunk)
        for message in source.messages_to_send():
            relay.receive_message(message)
        for message in relay.messages_to_forward():
            destination.receive_message(message)
        destination.events_received()

    def protobuf_encode() -> bytes:
        body = message_pb2.Message(
            type=1, streamId=1, payload=chunk, serviceId="SSH", connectionId=1
        ).SerializeToString()
        return len(body).to_bytes(2, "big") + body

    body = frame[2:]

    def protobuf_decode() -> tuple[object, ...]:
        pb = message_pb2.Message.FromString(body)
        return (pb.type, pb.streamId, pb.serviceId, pb.connectionId, pb.payload)

    report("client send_data (encode)", best(send))
    report("client receive DATA (decode + event)", best(receive))
    report("relay validate + forward (zero copy)", best(validate))
    report("source -> relay -> destination", best(chain))
    report("reference: protobuf encode + prefix", best(protobuf_encode))
    report("reference: protobuf decode + fields", best(protobuf_decode))


if __name__ == "__main__":
    main()
