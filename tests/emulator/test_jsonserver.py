"""Tests for agent.emulator.jsonserver: aiohttp's own refusals as AWS JSON, on real sockets."""

from __future__ import annotations

import asyncio
import json

import structlog.testing
from aiohttp import web

from agent.emulator.jsonserver import JsonErrorServer, error_response


async def _serve(handler, **options):
    server = JsonErrorServer(handler, loop=asyncio.get_running_loop(), **options)
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def _exchange(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(10):
            raw = await reader.read()  # each answer here closes: reading to EOF checks that
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, body


async def _ok(_request: web.BaseRequest) -> web.Response:
    return web.Response(text="ok")


class TestJsonErrorServer:
    async def test_unparsable_request(self):
        """Bytes that are not HTTP get a 400 awsJson SerializationException and a close."""
        runner, port = await _serve(_ok, client_max_size=1024)
        try:
            status, headers, body = await _exchange(port, b"\x00\x01 not http\r\n\r\n")
        finally:
            await runner.cleanup()

        assert status.split()[1] == "400"
        assert headers["content-type"] == "application/x-amz-json-1.1"
        assert headers["x-amzn-errortype"] == "SerializationException"
        assert json.loads(body)["__type"] == "SerializationException"
        assert json.loads(body)["message"].startswith("Malformed HTTP request: ")

    async def test_handler_failure_hides_details(self):
        """An exception escaping the handler is a 500 InternalFailure without its text."""

        async def broken(_request: web.BaseRequest) -> web.Response:
            raise RuntimeError("secret detail")

        runner, port = await _serve(broken, client_max_size=1024)
        try:
            with structlog.testing.capture_logs() as logs:
                status, headers, body = await _exchange(
                    port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
                )
        finally:
            await runner.cleanup()

        assert status.split()[1] == "500"
        assert headers["content-type"] == "application/x-amz-json-1.1"
        assert json.loads(body) == {"__type": "InternalFailure", "message": "Internal failure"}
        assert [e["event"] for e in logs] == ["http_failure"]

    async def test_client_max_size(self):
        """Bodies over client_max_size are refused by BaseRequest.read."""
        seen: list[str] = []

        async def read(request: web.BaseRequest) -> web.Response:
            try:
                await request.read()
            except web.HTTPRequestEntityTooLarge:
                seen.append("too large")
                raise
            return web.Response(text="read")

        runner, port = await _serve(read, client_max_size=10)
        try:
            status, _, _ = await _exchange(
                port,
                b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 11\r\n\r\n"
                + b"x" * 11,
            )
        finally:
            await runner.cleanup()

        assert status.split()[1] == "413"
        assert seen == ["too large"]


def test_error_response():
    """error_response builds the awsJson error shape with code header and request id."""
    response = error_response(404, "ResourceNotFoundException", "gone", request_id="rid")

    assert response.status == 404
    assert response.content_type == "application/x-amz-json-1.1"
    assert response.headers["x-amzn-RequestId"] == "rid"
    assert response.headers["x-amzn-ErrorType"] == "ResourceNotFoundException"
    assert json.loads(response.body) == {"__type": "ResourceNotFoundException", "message": "gone"}
