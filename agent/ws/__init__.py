"""
WebSocket mechanics, client and server: the proxy's and the relay's connections run on them.

:mod:`.frames` parses and frames plain binary frames in place (the data path's fast path);
:mod:`.routing` hands each received frame to websockets or to the binary-message consumer;
:mod:`.buffered` is the asyncio protocol around both (receive buffer, flushing, close timeout).
Nothing here reads the messages: the tunnel protocol lives in :mod:`agent.protocol`.
"""

from __future__ import annotations


__all__: list[str] = []
