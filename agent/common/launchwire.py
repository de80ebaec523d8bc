"""
The proxy launcher's channel: messages between the agent and ``agent.proxy.launcher``.

One ``SOCK_SEQPACKET`` socket pair: each message is one JSON object (UTF-8) in one
packet, with descriptors riding along as ``SCM_RIGHTS``. Both sides are ours and the
socket is private to them, so a request may carry the tunnel's tokens.

- ``{"op": "start", "id": N, "argv": [...], "tokens": [token, client_token],
  "fds": [target, ...]}`` with descriptors ``stdout, stderr, lifeline, *extra``: fork a
  proxy that runs ``tunnel-localproxy ARGV``; each extra descriptor becomes the number
  in ``fds`` at the same position (so ``--report-fd N`` style options can name it).
- ``{"op": "started", "id": N, "pid": P}`` with the child's pidfd, or
  ``{"op": "failed", "id": N, "error": "..."}``.
- ``{"op": "exited", "pid": P, "status": S}``: S as ``subprocess`` reports it
  (negative: killed by that signal).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from collections.abc import Sequence


__all__ = ["MAX_FDS", "MAX_MESSAGE", "WireError", "decode", "encode", "receive", "send"]

#: The largest packet; tokens are at most a few KiB.
MAX_MESSAGE = 64 * 1024
#: Descriptors per message.
MAX_FDS = 16
_FD_SIZE = array.array("i").itemsize


class WireError(ValueError):
    """
    A message that is not a JSON object, or too large.
    """


def encode(message: dict[str, Any]) -> bytes:
    """
    One message as a packet.

    Raises:
        WireError: Larger than :data:`MAX_MESSAGE`.
    """
    data = json.dumps(message, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise WireError("message too large")
    return data


def decode(data: bytes) -> dict[str, Any]:
    """
    One packet as a message.

    Raises:
        WireError: Not a UTF-8 JSON object.
    """
    try:
        message = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise WireError("not UTF-8 JSON") from None
    if not isinstance(message, dict):
        raise WireError("not an object")
    return message


def send(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """
    Send one message and its descriptors (the caller keeps and closes its own copies).
    """
    ancillary = []
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    sock.sendmsg([encode(message)], ancillary)


def receive(sock: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """
    Receive one message and the descriptors it carries (now ours to close).

    Returns:
        The message and descriptors, or ``None`` at end of stream.

    Raises:
        BlockingIOError: Non-blocking socket with nothing to read.
        WireError: Malformed; its descriptors are closed.
    """
    data, ancillary, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * _FD_SIZE))
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % _FD_SIZE
            fds.extend(array.array("i", payload[:usable]))
    if not data and not fds:
        return None
    try:
        return _checked(data, flags), fds
    except WireError:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise


def _checked(data: bytes, flags: int) -> dict[str, Any]:
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        raise WireError("message truncated")
    return decode(data)
