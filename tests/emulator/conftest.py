"""Fixtures for the control-plane API: a real server on 127.0.0.1:0 and real boto3 clients.

The server runs on its own event loop in a background thread, so tests call boto3 (which
blocks) directly. Requests are sequential, so tests may read and change the store between calls.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.config import Config

from agent.emulator.api import ControlPlaneApi
from agent.emulator.store import TunnelStore
from tests.emulator import fixtures
from tests.fakes import FakeClock


if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterator
    from pathlib import Path


ACCESS_KEY = "AKIAEMULATORTEST0001"
SECRET_KEY = "emulator/secret+key/for-tests"
CREDENTIALS = {ACCESS_KEY: SECRET_KEY}
SCALE = float(os.environ.get("TEST_TIME_SCALE", "1.0"))

# The shared fixtures, for every test in this directory.
broker = fixtures.broker
emulator = fixtures.emulator
emulator_thread = fixtures.emulator_thread
mqtt_pki = fixtures.mqtt_pki


class ServerThread:
    """Runs coroutines on an event loop that lives in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30 * SCALE)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30 * SCALE)
        self.loop.close()


class ApiHarness:
    """Starts and restarts ControlPlaneApi instances on one background loop."""

    def __init__(self) -> None:
        self.thread = ServerThread()
        self._apis: list[ControlPlaneApi] = []

    def start(self, store: TunnelStore, **kwargs: Any) -> ControlPlaneApi:
        api = ControlPlaneApi(store, **kwargs)
        self.thread.run(api.start())
        self._apis.append(api)
        return api

    def stop(self, api: ControlPlaneApi) -> None:
        self.thread.run(api.close())

    def close(self) -> None:
        try:
            for api in self._apis:
                self.thread.run(api.close())
        finally:
            self.thread.stop()


@pytest.fixture
def api_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def api_store(api_clock: FakeClock) -> TunnelStore:
    return TunnelStore(clock=api_clock)


@pytest.fixture
def api_harness() -> Iterator[ApiHarness]:
    harness = ApiHarness()
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def api_server(api_harness: ApiHarness, api_store: TunnelStore) -> ControlPlaneApi:
    return api_harness.start(api_store, credentials=CREDENTIALS)


@pytest.fixture(scope="session")
def boto_session() -> boto3.session.Session:
    return boto3.session.Session()


@pytest.fixture
def make_client(
    boto_session: boto3.session.Session, api_server: ControlPlaneApi
) -> Iterator[Callable[..., Any]]:
    """Return a factory of iotsecuretunneling clients for the running server."""
    made: list[Any] = []

    def make(
        *,
        url: str | None = None,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        region: str = "us-east-1",
        validate: bool = True,
    ) -> Any:
        client = boto_session.client(
            "iotsecuretunneling",
            endpoint_url=url or api_server.url,
            region_name=region,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=Config(
                retries={"total_max_attempts": 1},
                parameter_validation=validate,
                connect_timeout=10 * SCALE,
                read_timeout=10 * SCALE,
            ),
        )
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            client.close()


@pytest.fixture
def client(make_client: Callable[..., Any]) -> Any:
    """Return a signed client with the emulator's credentials, us-east-1, no retries."""
    return make_client()


@pytest.fixture
def raw_client(make_client: Callable[..., Any]) -> Any:
    """Return a client without botocore's parameter validation (to test server checks)."""
    return make_client(validate=False)


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    return tmp_path / "emulator" / "state.json"
