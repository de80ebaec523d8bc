"""
Tokens handed to a child over an inherited pipe: never in argv or the environment.

``/proc/PID/environ`` and ``/proc/PID/cmdline`` stay readable for a process' whole life,
so the agent writes the bundled proxy's access and client tokens into a pipe, closes its
write end and passes the read end (``tunnel-localproxy --token-fd N``). The proxy reads the
small JSON document once, at start, and closes the descriptor.
"""

from __future__ import annotations

import contextlib
import json
import os


__all__ = [
    "MAX_DOCUMENT",
    "TokenPipeError",
    "decode_tokens",
    "encode_tokens",
    "read_tokens",
    "token_pipe",
]

#: Below a pipe's capacity (64 KiB on Linux): the writer never blocks.
MAX_DOCUMENT = 32 * 1024


class TokenPipeError(ValueError):
    """
    The token document is missing, too large or malformed.
    """


def encode_tokens(token: str, client_token: str | None) -> bytes:
    """
    The document: ``{"access_token": ..., "client_token": ...}`` in UTF-8 JSON.

    Raises:
        TokenPipeError: It would not fit in a pipe without blocking.
    """
    data = json.dumps({"access_token": token, "client_token": client_token}).encode()
    if len(data) > MAX_DOCUMENT:
        raise TokenPipeError("token document too large")
    return data


def decode_tokens(data: bytes) -> tuple[str, str | None]:
    """
    Parse a document made by :func:`encode_tokens`.

    Raises:
        TokenPipeError: Malformed.
    """
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise TokenPipeError("token document is not UTF-8 JSON") from None
    if not isinstance(document, dict):
        raise TokenPipeError("token document is not an object")
    token, client = document.get("access_token"), document.get("client_token")
    if not isinstance(token, str) or not (client is None or isinstance(client, str)):
        raise TokenPipeError("token document lacks its tokens")
    return token, client


def token_pipe(token: str, client_token: str | None) -> int:
    """
    A pipe holding the document, write end closed: return its read end (not inheritable).

    Raises:
        TokenPipeError: The document is too large.
    """
    data = encode_tokens(token, client_token)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return read_end


def read_tokens(fd: int) -> tuple[str, str | None]:
    """
    Read the whole document from ``fd`` until EOF, close it and return the tokens.

    Raises:
        TokenPipeError: Unreadable, too large or malformed.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := os.read(fd, 65536):
            size += len(chunk)
            if size > MAX_DOCUMENT:
                raise TokenPipeError("token document too large")
            chunks.append(chunk)
    except OSError as exc:
        raise TokenPipeError(f"cannot read the token descriptor: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return decode_tokens(b"".join(chunks))
