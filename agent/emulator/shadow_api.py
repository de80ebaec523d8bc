"""
The AWS IoT data plane's shadow operations over HTTP, for botocore's ``iot-data`` and the CLI.

Wire protocol (botocore's ``iot-data`` service model, REST-JSON, SigV4 signing name
``iotdata``):

* ``GET|POST|DELETE /things/{thingName}/shadow[?name=...]``: GetThingShadow,
  UpdateThingShadow, DeleteThingShadow; the document itself is the body both ways;
* ``GET /api/things/shadow/ListNamedShadowsForThing/{thingName}[?nextToken=&pageSize=]``;
* errors: the status of the model's error shape, ``x-amzn-ErrorType: <Code>:`` and the
  shadow error document as body.

These routes are mounted on the control plane's server ahead of its awsJson catch-all (whose
requests are all ``POST /`` with ``X-Amz-Target``), so one endpoint serves both services. The
handlers only translate HTTP to :class:`~agent.emulator.shadows.ShadowStore` calls; the store's
listeners publish the MQTT side of every accepted change.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from agent.emulator.shadows import SHADOW_NAME_PATTERN, ShadowRejected
from agent.emulator.sigv4 import DATA_SIGNING_NAME, SignatureVerifier
from agent.emulator.store import StoreError
from agent.protocol.ids import THING_NAME


if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from agent.emulator.shadows import JsonObject, ShadowStore


__all__ = ["DEFAULT_PAGE_SIZE", "ShadowApi"]

log = structlog.get_logger(__name__)

#: ListNamedShadowsForThing page size when the request sets none (the model allows 1..100).
DEFAULT_PAGE_SIZE = 25
_MAX_PAGE_SIZE = 100
_SHADOW_PATH = re.compile(r"/things/([^/]+)/shadow")
_LIST_PATH = re.compile(r"/api/things/shadow/ListNamedShadowsForThing/([^/]+)")
_PAGE_PREFIX = "shadows:"


class _ApiError(StoreError):
    """
    A refusal before the store is reached (method, paging token, body size).
    """

    def __init__(self, code: str, status: int, message: str) -> None:
        super().__init__(message)
        self.code = code  # type: ignore[misc] # per instance, like SignatureRejected
        self.status = status


def _encode_token(name: str) -> str:
    return base64.urlsafe_b64encode((_PAGE_PREFIX + name).encode()).decode()


def _decode_token(token: str) -> str:
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    name = text.removeprefix(_PAGE_PREFIX)
    if not text.startswith(_PAGE_PREFIX) or not SHADOW_NAME_PATTERN.fullmatch(name):
        raise _ApiError("InvalidRequestException", 400, "Invalid nextToken")
    return name


class ShadowApi:
    """
    The iot-data shadow routes, to mount on an aiohttp application.

    Args:
        shadows: The shadow store.
        credentials: Access key id -> secret key accepted by the SigV4 check (scope
            ``iotdata``); None turns the check off.
    """

    def __init__(self, shadows: ShadowStore, *, credentials: Mapping[str, str] | None) -> None:
        """
        Configure the handlers; :meth:`routes` hands them to a server.
        """
        self.shadows = shadows
        self._verifier = (
            None
            if credentials is None
            else SignatureVerifier(credentials, signing_name=DATA_SIGNING_NAME)
        )

    async def handle(self, request: web.BaseRequest) -> web.Response | None:
        """
        Answer an iot-data request; ``None`` when the path is not one of this API's.
        """
        if match := _SHADOW_PATH.fullmatch(request.path):
            return await self._respond(request, match.group(1), self._shadow_operation)
        if match := _LIST_PATH.fullmatch(request.path):
            return await self._respond(request, match.group(1), self._list_operation)
        return None

    # -- HTTP ----------------------------------------------------------------------------------

    async def _respond(
        self,
        request: web.BaseRequest,
        thing: str,
        operation: Callable[[web.BaseRequest, str, bytes], Awaitable[JsonObject]],
    ) -> web.Response:
        request_id = str(uuid.uuid4())
        try:
            body = await self._authenticated_body(request)
            document = await operation(request, thing, body)
        except StoreError as exc:
            log.debug("iot_data_error", code=exc.code, status=exc.status)
            return self._error(request_id, exc.status, exc.code, exc.message)
        except Exception:
            # Our bug: log it, but keep exception text out of the response.
            log.exception("iot_data_failure", path=request.path)
            return self._error(request_id, 500, "InternalFailureException", "Internal failure")
        return web.Response(
            status=200,
            body=json.dumps(document, separators=(",", ":")).encode(),
            headers={"Content-Type": "application/json", "x-amzn-RequestId": request_id},
        )

    async def _authenticated_body(self, request: web.BaseRequest) -> bytes:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise _ApiError(
                "RequestEntityTooLargeException",
                413,
                "The payload exceeds the maximum size allowed",
            ) from exc
        if self._verifier is not None:
            self._verifier.verify(
                method=request.method,
                host=request.host,
                raw_path=request.raw_path,
                headers=request.headers.items(),
                body=body,
            )
        return body

    def _error(self, request_id: str, status: int, code: str, message: str) -> web.Response:
        document = {"code": status, "message": message, "timestamp": int(self.shadows.clock())}
        return web.Response(
            status=status,
            body=json.dumps(document).encode(),
            headers={
                "Content-Type": "application/json",
                "x-amzn-RequestId": request_id,
                # AWS sends the code with a trailing colon; botocore strips it.
                "x-amzn-ErrorType": f"{code}:",
            },
        )

    # -- operations ----------------------------------------------------------------------------

    async def _shadow_operation(
        self, request: web.BaseRequest, thing: str, body: bytes
    ) -> JsonObject:
        name = request.query.get("name")
        if name is not None and not SHADOW_NAME_PATTERN.fullmatch(name):
            raise ShadowRejected(400, "Invalid shadow name")
        if request.method == "GET":
            return self.shadows.get(thing, name)
        if request.method == "POST":
            return self.shadows.update(thing, name, body)
        if request.method == "DELETE":
            return self.shadows.delete(thing, name)
        raise _ApiError(
            "MethodNotAllowedException",
            405,
            "The specified combination of HTTP verb and URI is not supported",
        )

    async def _list_operation(
        self, request: web.BaseRequest, thing: str, _body: bytes
    ) -> JsonObject:
        if request.method != "GET":
            raise _ApiError(
                "MethodNotAllowedException",
                405,
                "The specified combination of HTTP verb and URI is not supported",
            )
        if not THING_NAME.fullmatch(thing):
            raise ShadowRejected(400, "Invalid thing name")
        page_size = self._page_size(request.query.get("pageSize"))
        names = self.shadows.list_named(thing)
        token = request.query.get("nextToken")
        if token is not None:
            # Resume after the last name served, even if that shadow was deleted since.
            after = _decode_token(token)
            names = [n for n in names if n > after]
        out: JsonObject = {"results": names[:page_size]}
        if len(names) > page_size:
            out["nextToken"] = _encode_token(names[page_size - 1])
        out["timestamp"] = int(self.shadows.clock())
        return out

    @staticmethod
    def _page_size(text: str | None) -> int:
        if text is None:
            return DEFAULT_PAGE_SIZE
        try:
            size = int(text)
        except ValueError:
            size = 0
        if not 1 <= size <= _MAX_PAGE_SIZE:
            raise _ApiError(
                "InvalidRequestException", 400, f"pageSize must be between 1 and {_MAX_PAGE_SIZE}"
            )
        return size
