"""Shared fixtures for MQTT, PKI and whole-emulator tests.

Import the fixtures you need into a test module or a conftest::

    from tests.emulator.fixtures import emulator, mqtt_pki  # noqa: F401

* ``mqtt_pki``: a CA with a broker server certificate, the privileged identity, and
  helpers issuing thing certificates (and certificates from a foreign CA).
* ``broker``: a running mosquitto knowing ``thing1`` and ``thing2``.
* ``emulator``: a running :class:`~agent.emulator.app.Emulator` (API, relay, broker,
  notifier) on the test's event loop, with ``thing1`` and ``thing2`` added.
* ``emulator_thread``: the same in a background event loop, for blocking callers (boto3).

Every fixture stops what it started, even when the test fails.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from agent.emulator.app import Emulator
from agent.emulator.broker import Broker
from agent.emulator.mqtt_client import AsyncMqttClient
from agent.emulator.pki import PRIVILEGED_IDENTITY, CertificateAuthority, KeyPair


if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine, Iterator
    from pathlib import Path


__all__ = [
    "SCALE",
    "EmulatorThread",
    "MqttPki",
    "alive",
    "broker",
    "emulator",
    "emulator_thread",
    "mqtt_client",
    "mqtt_pki",
    "refused",
]

SCALE = float(os.environ.get("TEST_TIME_SCALE", "1.0"))


def alive(pid: int) -> bool:
    """Whether process ``pid`` still exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def refused(host: str, port: int) -> bool:
    """Whether nothing listens on ``host:port`` any more."""
    try:
        _reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


@dataclass
class MqttPki:
    """A CA on disk plus the broker's and the emulator's certificates."""

    directory: Path
    ca: CertificateAuthority
    server: KeyPair
    admin: KeyPair

    @property
    def ca_file(self) -> Path:
        return self.ca.cert_file

    def thing(self, name: str) -> KeyPair:
        """Issue (or reuse) the client certificate of thing ``name``."""
        return self.ca.issue_client(
            KeyPair(self.directory / f"{name}.crt", self.directory / f"{name}.key"),
            common_name=name,
        )

    def foreign(self, name: str) -> KeyPair:
        """Issue a certificate with CN ``name`` from a CA the broker does not trust."""
        other = CertificateAuthority(self.directory / "foreign", common_name="Foreign CA")
        return other.issue_client(
            KeyPair(self.directory / "foreign" / f"{name}.crt", self.directory / "foreign" / "k"),
            common_name=name,
        )


def make_pki(directory: Path) -> MqttPki:
    """Create a CA with server and privileged certificates in ``directory``."""
    ca = CertificateAuthority(directory)
    server = ca.issue_server(KeyPair(directory / "broker.crt", directory / "broker.key"))
    admin = ca.issue_client(
        KeyPair(directory / "emulator.crt", directory / "emulator.key"),
        common_name=PRIVILEGED_IDENTITY,
    )
    return MqttPki(directory, ca, server, admin)


@pytest.fixture
def mqtt_pki(tmp_path: Path) -> MqttPki:
    """Create a fresh emulator CA with broker and privileged certificates."""
    return make_pki(tmp_path / "pki")


@pytest.fixture
async def broker(mqtt_pki: MqttPki, tmp_path: Path) -> AsyncIterator[Broker]:
    """Run a mosquitto that lets ``thing1`` and ``thing2`` subscribe."""
    instance = Broker(
        tmp_path / "broker",
        ca_file=mqtt_pki.ca_file,
        server=mqtt_pki.server,
        things=["thing1", "thing2"],
        start_timeout=10 * SCALE,
    )
    await instance.start()
    try:
        yield instance
    finally:
        await instance.stop()


def mqtt_client(
    pki: MqttPki, port: int, pair: KeyPair, client_id: str, **options: Any
) -> AsyncMqttClient:
    """Return an unconnected MQTT5 client for ``127.0.0.1:port`` with ``pair`` as identity."""
    options.setdefault("connect_timeout", 5 * SCALE)
    return AsyncMqttClient(
        endpoint="127.0.0.1",
        port=port,
        cert=pair.cert,
        key=pair.key,
        ca=pki.ca_file,
        client_id=client_id,
        **options,
    )


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[Emulator]:
    """Run an emulator in ``tmp_path/emulator`` with things ``thing1`` and ``thing2``."""
    instance = Emulator(tmp_path / "emulator")
    instance.add_thing("thing1")
    instance.add_thing("thing2")
    async with instance:
        yield instance


class EmulatorThread:
    """An :class:`Emulator` running on an event loop in a daemon thread."""

    def __init__(self, directory: Path, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.emulator = Emulator(directory, **options)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the emulator's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60 * SCALE)

    def start(self) -> EmulatorThread:
        self.run(self.emulator.__aenter__())
        return self

    def stop(self) -> None:
        try:
            self.run(self.emulator.__aexit__(None, None, None))
        finally:
            self.close_loop()

    def close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30 * SCALE)
        self.loop.close()


def device_client(emu: Emulator, name: str, *, client_id: str | None = None) -> AsyncMqttClient:
    """An MQTT client with thing NAME's certificate from the running emulator's bundle."""
    bundle = emu.bundle(name)
    host, port = emu.mqtt_endpoint
    return AsyncMqttClient(
        endpoint=host,
        port=port,
        cert=bundle.cert,
        key=bundle.key,
        ca=bundle.ca,
        client_id=client_id or name,
        connect_timeout=5 * SCALE,
    )


@pytest.fixture
def emulator_thread(tmp_path: Path) -> Iterator[EmulatorThread]:
    """Run an emulator on a background loop, with things ``thing1`` and ``thing2``."""
    thread = EmulatorThread(tmp_path / "emulator")
    thread.emulator.add_thing("thing1")
    thread.emulator.add_thing("thing2")
    try:
        thread.start()
    except BaseException:
        thread.close_loop()  # a failed __aenter__ already stopped what it had started
        raise
    try:
        yield thread
    finally:
        thread.stop()
