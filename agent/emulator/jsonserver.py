"""
An aiohttp server that refuses like an AWS JSON endpoint, even before any handler runs.

aiohttp answers a request it cannot parse (garbage bytes, a bad request line, oversize or
malformed headers, a bad Content-Length ...) by itself, with a plain-text 400. AWS's endpoints
answer every refusal with an awsJson error body (``{"__type", "message"}``, ``Content-Type:
application/x-amz-json-1.1``), and botocore reads the error code from that body only. So the
connection handler here builds the same body as the control plane's own errors, through
:func:`error_response`.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web


if TYPE_CHECKING:
    import asyncio
    from collections.abc import Awaitable, Callable

    from aiohttp.abc import AbstractStreamWriter
    from aiohttp.http_parser import RawRequestMessage
    from aiohttp.streams import StreamReader


__all__ = ["CONTENT_TYPE", "MALFORMED_CODE", "JsonErrorServer", "error_response"]

log = structlog.get_logger(__name__)

CONTENT_TYPE = "application/x-amz-json-1.1"
#: Error code of a request that is not HTTP aiohttp can read: it cannot be deserialized either.
MALFORMED_CODE = "SerializationException"
# Longest parser reason quoted back; aiohttp's reasons can quote the offending bytes.
_MAX_REASON = 200


def error_response(
    status: int, code: str, message: str, *, request_id: str | None = None
) -> web.Response:
    """
    Return an AWS JSON error response.

    Args:
        status: HTTP status.
        code: The AWS error code (``__type``; also sent as ``x-amzn-ErrorType``).
        message: Text safe to show the caller.
        request_id: ``x-amzn-RequestId``; a new UUID when None.
    """
    return web.Response(
        status=status,
        body=json.dumps({"__type": code, "message": message}).encode(),
        headers={
            "Content-Type": CONTENT_TYPE,
            "x-amzn-RequestId": request_id or str(uuid.uuid4()),
            "x-amzn-ErrorType": code,
        },
    )


def _reason(exc: BaseException | None, message: str | None) -> str:
    # aiohttp's parser reasons may span lines: the reason, the bad bytes, a caret under them.
    text = message or (str(exc) if exc is not None else "") or "unreadable request"
    lines = [line.strip() for line in text.splitlines() if line.strip(" ^")]
    reason = " ".join(lines)
    return reason if len(reason) <= _MAX_REASON else reason[:_MAX_REASON] + "..."


class _JsonErrorHandler(web.RequestHandler):
    """
    aiohttp's connection handler with AWS JSON bodies on the errors it answers itself.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """
        Answer a request aiohttp could not parse or serve, and close the connection.
        """
        if request.writer.output_size > 0:
            # A response has started: aiohttp's own handling drops the connection.
            return super().handle_error(request, status, exc, message)
        if status >= 500:
            log.error("http_failure", status=status, exc_info=exc)
            response = error_response(status, "InternalFailure", "Internal failure")
        else:
            reason = _reason(exc, message)
            log.info("http_malformed_request", status=status, reason=reason)
            response = error_response(status, MALFORMED_CODE, f"Malformed HTTP request: {reason}")
        # After a parse error the rest of the stream cannot be framed into requests.
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """
    A low-level aiohttp server that answers unparsable requests with AWS JSON errors.

    Run it with :class:`aiohttp.web.ServerRunner`.

    Args:
        handler: The request handler.
        client_max_size: Largest body :meth:`aiohttp.web.BaseRequest.read` accepts.
        loop: The running event loop.
        kwargs: Connection handler settings, as for :class:`aiohttp.web.Server`.
    """

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        client_max_size: int,
        loop: asyncio.AbstractEventLoop,
        **kwargs: Any,
    ) -> None:
        """
        Record the settings; the runner starts listening.
        """
        super().__init__(handler, request_factory=self._new_request, loop=loop, **kwargs)
        self._event_loop = loop
        self._client_max_size = client_max_size
        self._handler_kwargs = kwargs

    def __call__(self) -> web.RequestHandler:
        """
        Return the handler of one new connection.
        """
        return _JsonErrorHandler(self, loop=self._event_loop, **self._handler_kwargs)

    def _new_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: web.RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        return web.BaseRequest(
            message,
            payload,
            protocol,
            writer,
            task,
            self._event_loop,
            client_max_size=self._client_max_size,
        )
