"""
Sans-I/O core of the Secure Tunneling data plane: framing, messages and the tunnel protocol.

No asyncio, sockets, clocks, subprocesses or AWS SDK here (docs/architecture.md §2.3). Callers
import from this package::

    from agent.protocol import TunnelProtocol, CLIENT, SOURCE
"""

from __future__ import annotations

from agent.exceptions import FrameTooLarge, LocalProtocolError, ProtocolError, RemoteProtocolError
from agent.protocol.events import (
    ConnectionReset,
    ConnectionStarted,
    DataReceived,
    Event,
    ProtocolFailed,
    ServiceIdsReceived,
    SessionReset,
    StreamReset,
    StreamStarted,
)
from agent.protocol.framing import (
    MAX_FRAME_SIZE,
    MAX_WS_MESSAGE_SIZE,
    FrameBuffer,
    LoneFrame,
    encode_frame,
)
from agent.protocol.messages import (
    CONNECTION_RESET,
    CONNECTION_START,
    DATA,
    INT32_MAX,
    MAX_PAYLOAD_SIZE,
    SERVICE_IDS,
    SESSION_RESET,
    STREAM_RESET,
    STREAM_START,
    UNKNOWN,
    V1,
    V2,
    V3,
    Message,
    MessageType,
    ProtocolVersion,
    decode_message,
    encode_message,
)
from agent.protocol.streams import (
    MAX_CONNECTIONS_PER_SERVICE,
    TRANSITIONS,
    StreamEvent,
    StreamState,
    StreamTable,
)
from agent.protocol.tunnel import (
    CLIENT,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_POLICY_VIOLATION,
    DESTINATION,
    SERVICE,
    SOURCE,
    Mode,
    Side,
    TunnelProtocol,
)


__all__ = [
    "CLIENT",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_POLICY_VIOLATION",
    "CONNECTION_RESET",
    "CONNECTION_START",
    "DATA",
    "DESTINATION",
    "INT32_MAX",
    "MAX_CONNECTIONS_PER_SERVICE",
    "MAX_FRAME_SIZE",
    "MAX_PAYLOAD_SIZE",
    "MAX_WS_MESSAGE_SIZE",
    "SERVICE",
    "SERVICE_IDS",
    "SESSION_RESET",
    "SOURCE",
    "STREAM_RESET",
    "STREAM_START",
    "TRANSITIONS",
    "UNKNOWN",
    "V1",
    "V2",
    "V3",
    "ConnectionReset",
    "ConnectionStarted",
    "DataReceived",
    "Event",
    "FrameBuffer",
    "FrameTooLarge",
    "LocalProtocolError",
    "LoneFrame",
    "Message",
    "MessageType",
    "Mode",
    "ProtocolError",
    "ProtocolFailed",
    "ProtocolVersion",
    "RemoteProtocolError",
    "ServiceIdsReceived",
    "SessionReset",
    "Side",
    "StreamEvent",
    "StreamReset",
    "StreamStarted",
    "StreamState",
    "StreamTable",
    "TunnelProtocol",
    "decode_message",
    "encode_frame",
    "encode_message",
]
