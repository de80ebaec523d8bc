"""
The Secure Tunneling control plane over HTTP, compatible with botocore and the AWS CLI.

Wire protocol (docs/protocol.md §12): ``POST`` on any path, awsJson 1.1 bodies, dispatch on
``X-Amz-Target: IoTSecuredTunneling.<Operation>``, timestamps as epoch-second numbers, errors
as ``{"__type", "message"}`` (docs/protocol.md §13.1). The handlers only translate between JSON
and the :class:`~agent.emulator.store.TunnelStore`; shapes are checked in :mod:`.validation`,
signatures in :mod:`.sigv4`. Notifications are not sent here: the store emits events and the
notifier publishes them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from agent.emulator.jsonserver import CONTENT_TYPE, JsonErrorServer, error_response
from agent.emulator.sigv4 import SignatureVerifier, region_from_authorization
from agent.emulator.store import StoreError, ValidationFailed
from agent.emulator.validation import (
    DESCRIPTION,
    MAX_PAGE_SIZE,
    TUNNEL_ID,
    SerializationFailed,
    Shape,
    check_tag_key,
    decode_next_token,
    encode_next_token,
)
from agent.protocol.ids import THING_NAME


if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from agent.emulator.store import Endpoint, Tunnel, TunnelStore


__all__ = ["TARGET_PREFIX", "ControlPlaneApi"]

log = structlog.get_logger(__name__)

TARGET_PREFIX = "IoTSecuredTunneling."
# Caps the body before signature checks; the largest valid input (200 tags) is far smaller.
MAX_BODY = 1024 * 1024
_MODES = {"SOURCE": ("source",), "DESTINATION": ("destination",), "ALL": ("source", "destination")}


class ApiError(StoreError):
    """
    A protocol-level refusal: unknown operation or method (a choice, docs/protocol.md §13.2).
    """

    def __init__(self, code: str, status: int, message: str, *, close: bool = False) -> None:
        """
        Record the AWS error code and HTTP status.

        Args:
            code: The AWS error code.
            status: The HTTP status.
            message: Text safe to show the caller.
            close: Close the connection after answering: the request's body was not read to
                its end, so the next request on it cannot be found.
        """
        super().__init__(message)
        self.code = code  # type: ignore[misc] # per instance, like SignatureRejected
        self.status = status
        self.close = close


def _reject_constant(name: str) -> float:
    raise SerializationFailed(f"Invalid JSON number {name}")


def _connection(ep: Endpoint) -> dict[str, Any]:
    return {
        "status": "CONNECTED" if ep.connected else "DISCONNECTED",
        "lastUpdatedAt": ep.last_updated_at,
    }


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in tags.items()]


class ControlPlaneApi:
    """
    The aiohttp server of the control plane.

    Attributes:
        store: The tunnel store every operation reads and changes.
    """

    def __init__(  # noqa: PLR0913 - keyword-only server settings, each documented
        self,
        store: TunnelStore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        credentials: dict[str, str] | None = None,
        lazy_expiry: bool = True,
        extra: Callable[[web.BaseRequest], Awaitable[web.Response | None]] | None = None,
        body_timeout: float = 30.0,
    ) -> None:
        """
        Configure the server; nothing listens before :meth:`start`.

        Args:
            store: The tunnel store.
            host: Address to listen on (loopback by default).
            port: TCP port; 0 picks a free one, see :attr:`port` after :meth:`start`.
            credentials: Access key id -> secret access key accepted by the SigV4 check;
                None turns the check off (docs/protocol.md §12.4).
            lazy_expiry: Run ``store.expire_due()`` before each operation, so answers are
                exact even between two ticks of the app's expiry timer (docs/protocol.md §16.4).
            extra: Another service on the same port (the iot-data shadows): asked first,
                it answers its own paths and returns ``None`` for the rest.
            body_timeout: Seconds a request's body may take to arrive once its headers have.
        """
        self.store = store
        self._host = host
        self._port = port
        self._verifier = None if credentials is None else SignatureVerifier(credentials)
        self._lazy_expiry = lazy_expiry
        self._body_timeout = body_timeout
        self._runner: web.ServerRunner | None = None
        self._operations: dict[str, Callable[[Shape, str], dict[str, Any]]] = {
            "OpenTunnel": self._open_tunnel,
            "CloseTunnel": self._close_tunnel,
            "DescribeTunnel": self._describe_tunnel,
            "ListTunnels": self._list_tunnels,
            "RotateTunnelAccessToken": self._rotate,
            "TagResource": self._tag_resource,
            "UntagResource": self._untag_resource,
            "ListTagsForResource": self._list_tags,
        }
        self._extra = extra

    @property
    def port(self) -> int:
        """
        The bound TCP port (valid after :meth:`start`).
        """
        return self._port

    @property
    def url(self) -> str:
        """
        The endpoint URL for ``endpoint_url=`` / ``--endpoint-url``.
        """
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        """
        Start listening.
        """
        # Every path and method reaches _handle; requests aiohttp cannot even parse get the
        # same JSON errors from the server's connection handler.
        server = JsonErrorServer(
            self._handle,
            client_max_size=MAX_BODY,
            loop=asyncio.get_running_loop(),
            access_log=None,
        )
        runner = web.ServerRunner(server)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        log.info("control_plane_listening", url=self.url, signatures=self._verifier is not None)

    async def close(self) -> None:
        """
        Stop listening and close open connections.
        """
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- HTTP ----------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        if self._extra is not None and (answer := await self._extra(request)) is not None:
            return answer
        request_id = str(uuid.uuid4())
        try:
            result = await self._dispatch(request)
        except StoreError as exc:
            log.debug("api_error", code=exc.code, status=exc.status)
            response = self._error(request_id, exc.status, exc.code, exc.message)
            if isinstance(exc, ApiError) and exc.close:
                response.force_close()
            return response
        except Exception:
            # Our bug: log it, but keep exception text out of the response
            # (docs/architecture.md §7.4).
            log.exception("api_failure", target=request.headers.get("X-Amz-Target"))
            return self._error(request_id, 500, "InternalFailure", "Internal failure")
        return web.Response(
            status=200,
            body=json.dumps(result).encode(),
            headers={"Content-Type": CONTENT_TYPE, "x-amzn-RequestId": request_id},
        )

    async def _dispatch(self, request: web.BaseRequest) -> dict[str, Any]:
        # Order: method, signature, target, body (authenticate before revealing anything).
        if request.method != "POST":
            raise ApiError(
                "UnknownOperationException", 405, f"Method {request.method} is not supported"
            )
        body = await self._read_body(request)
        region = self._region(request, body)
        target = request.headers.get("X-Amz-Target", "")
        operation = target.removeprefix(TARGET_PREFIX)
        handler = self._operations.get(operation) if target.startswith(TARGET_PREFIX) else None
        if handler is None:
            shown = f"'{target}'" if target else "(no X-Amz-Target header)"
            raise ApiError("UnknownOperationException", 400, f"Unknown operation {shown}")
        shape = Shape(self._decode(body))
        if self._lazy_expiry:
            self.store.expire_due()
        log.debug("api_call", operation=operation)
        return handler(shape, region)

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        try:
            async with asyncio.timeout(self._body_timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise ApiError(
                "SerializationException", 413, f"Request body over {MAX_BODY} bytes", close=True
            ) from exc
        except web.RequestPayloadError as exc:
            # The headers parsed but the body did not (a bad Content-Encoding, say).
            raise ApiError(
                "SerializationException", 400, f"Malformed HTTP request body: {exc}", close=True
            ) from exc
        except TimeoutError:
            # Also ends a request whose body aiohttp's parser gave up on midway (a bad chunk
            # after good ones): it never completes, and the answer is due anyway.
            raise ApiError(
                "RequestTimeoutException",
                408,
                f"Request body not received within {self._body_timeout:g} s",
                close=True,
            ) from None
        except ConnectionResetError:
            # The client left before sending its body: nobody reads an answer.
            raise ApiError(
                "SerializationException", 400, "Request body incomplete", close=True
            ) from None

    def _region(self, request: web.BaseRequest, body: bytes) -> str:
        if self._verifier is None:
            region = region_from_authorization(request.headers.get("Authorization"))
            return region or self.store.region
        return self._verifier.verify(
            method=request.method,
            host=request.host,
            raw_path=request.raw_path,
            headers=request.headers.items(),
            body=body,
        )

    @staticmethod
    def _decode(body: bytes) -> dict[str, Any]:
        if not body.strip():
            return {}
        try:
            data = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise SerializationFailed("Request body is not valid JSON") from exc
        if not isinstance(data, dict):
            raise SerializationFailed("Request body must be a JSON object")
        return data

    @staticmethod
    def _error(request_id: str, status: int, code: str, message: str) -> web.Response:
        return error_response(status, code, message, request_id=request_id)

    # -- operations (docs/protocol.md §15) -----------------------------------------------

    def _open_tunnel(self, shape: Shape, region: str) -> dict[str, Any]:
        description = shape.string("description", pattern=DESCRIPTION, max_len=2048)
        tags = shape.tags()
        thing_name, services = shape.destination_config() or (None, None)
        lifetime = None
        timeout = shape.structure("timeoutConfig")
        if timeout is not None:
            lifetime = timeout.integer(
                "maxLifetimeTimeoutMinutes",
                low=1,
                high=720,
                where="timeoutConfig.maxLifetimeTimeoutMinutes",
            )
        tunnel = self.store.open_tunnel(
            description=description,
            tags=tags,
            thing_name=thing_name,
            services=services,
            max_lifetime_minutes=lifetime,
            region=region,
        )
        return {
            "tunnelId": tunnel.tunnel_id,
            "tunnelArn": tunnel.arn,
            "sourceAccessToken": tunnel.source.token,
            "destinationAccessToken": tunnel.destination.token,
        }

    def _tunnel(self, shape: Shape) -> Tunnel:
        tunnel_id = shape.string("tunnelId", required=True, pattern=TUNNEL_ID, max_len=128)
        return self.store.get(str(tunnel_id))

    def _resource(self, shape: Shape) -> Tunnel:
        arn = shape.string("resourceArn", required=True, max_len=1011)
        return self.store.get_by_arn(str(arn))

    def _close_tunnel(self, shape: Shape, _region: str) -> dict[str, Any]:
        delete = shape.boolean("delete")  # check every member before touching the store
        self.store.close_tunnel(self._tunnel(shape).tunnel_id, delete=delete)
        return {}

    def _describe_tunnel(self, shape: Shape, _region: str) -> dict[str, Any]:
        t = self._tunnel(shape)
        out: dict[str, Any] = {
            "tunnelId": t.tunnel_id,
            "tunnelArn": t.arn,
            "status": t.status,
            "sourceConnectionState": _connection(t.source),
            "destinationConnectionState": _connection(t.destination),
        }
        if t.description is not None:
            out["description"] = t.description
        if t.has_destination_config:
            config: dict[str, Any] = {"services": list(t.services)}
            if t.thing_name is not None:
                config["thingName"] = t.thing_name
            out["destinationConfig"] = config
        # Always present, 720 filled in when none was given (a choice, docs/protocol.md §15.3).
        out["timeoutConfig"] = {"maxLifetimeTimeoutMinutes": t.max_lifetime_minutes}
        if t.tags:
            out["tags"] = _tag_list(t.tags)
        out["createdAt"] = t.created_at
        out["lastUpdatedAt"] = t.last_updated_at
        return {"tunnel": out}

    def _list_tunnels(self, shape: Shape, _region: str) -> dict[str, Any]:
        thing_name = shape.string("thingName", pattern=THING_NAME, max_len=128)
        page_size = shape.integer("maxResults", low=1, high=MAX_PAGE_SIZE) or MAX_PAGE_SIZE
        token = shape.string("nextToken", max_len=4096)
        tunnels = self.store.list_tunnels(thing_name=thing_name)
        start = 0
        if token is not None:
            after = decode_next_token(token)
            ids = [t.tunnel_id for t in tunnels]
            if after not in ids:
                # The tunnel the token points after is gone, or the token is foreign
                # (docs/protocol.md §15.4).
                raise ValidationFailed(f"Invalid nextToken '{token}': its tunnel is gone")
            start = ids.index(after) + 1
        page = tunnels[start : start + page_size]
        out: dict[str, Any] = {"tunnelSummaries": [self._summary(t) for t in page]}
        if start + page_size < len(tunnels):
            out["nextToken"] = encode_next_token(page[-1].tunnel_id)
        return out

    @staticmethod
    def _summary(t: Tunnel) -> dict[str, Any]:
        out: dict[str, Any] = {"tunnelId": t.tunnel_id, "tunnelArn": t.arn, "status": t.status}
        if t.description is not None:
            out["description"] = t.description
        out["createdAt"] = t.created_at
        out["lastUpdatedAt"] = t.last_updated_at
        return out

    def _rotate(self, shape: Shape, _region: str) -> dict[str, Any]:
        tunnel_id = shape.string("tunnelId", required=True, pattern=TUNNEL_ID, max_len=128)
        mode = shape.client_mode()
        thing_name, services = shape.destination_config() or (None, None)
        tunnel = self.store.rotate(
            str(tunnel_id), _MODES[mode], thing_name=thing_name, services=services
        )
        out: dict[str, Any] = {"tunnelArn": tunnel.arn}
        # Only the rotated side's token is returned (docs/protocol.md §15.5).
        if mode in ("SOURCE", "ALL"):
            out["sourceAccessToken"] = tunnel.source.token
        if mode in ("DESTINATION", "ALL"):
            out["destinationAccessToken"] = tunnel.destination.token
        return out

    def _tag_resource(self, shape: Shape, _region: str) -> dict[str, Any]:
        arn = shape.string("resourceArn", required=True, max_len=1011)
        self.store.tag(str(arn), shape.tags(required=True) or {})
        return {}

    def _untag_resource(self, shape: Shape, _region: str) -> dict[str, Any]:
        arn = shape.string("resourceArn", required=True, max_len=1011)
        raw = shape.items("tagKeys", required=True, min_items=0, max_items=200) or []
        keys = [check_tag_key(k, f"tagKeys.{n}.member") for n, k in enumerate(raw, 1)]
        self.store.untag(str(arn), keys)
        return {}

    def _list_tags(self, shape: Shape, _region: str) -> dict[str, Any]:
        return {"tags": _tag_list(self._resource(shape).tags)}
