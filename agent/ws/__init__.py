"""
WebSocket mechanics shared by the bundled proxy and the emulator's relay.

:mod:`.frames` parses and frames plain binary frames in place (the data path's fast
path); :mod:`.routing` hands each received frame to the tunnel core or to
websockets. The tunnel protocol itself lives in :mod:`agent.protocol`.
"""

from __future__ import annotations


__all__: list[str] = []
