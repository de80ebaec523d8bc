"""
Moving websockets' sans-I/O output to an asyncio transport, shared by the proxy and the relay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING


if TYPE_CHECKING:
    import asyncio

    from websockets.protocol import Protocol


__all__ = ["write_pending"]


def write_pending(ws: Protocol, transport: asyncio.Transport) -> bool:
    """
    Write what ``ws`` queued, honouring its end-of-stream marker.

    Returns:
        Whether websockets now expects the TCP connection to close (the caller arms a timeout
        that aborts it, as websockets' own asyncio layer does).
    """
    chunks = ws.data_to_send()
    if chunks:
        if chunks[-1] == b"":
            # websockets signals "send EOF" with an empty chunk; TLS cannot half-close.
            transport.writelines(chunks[:-1])
            transport.close()
        else:
            transport.writelines(chunks)
    return ws.close_expected()
