"""
The emulator application: Secure Tunneling and the AWS IoT parts it needs, on one machine.

One :class:`Emulator` owns a directory and runs, on loopback:

* the control-plane API (:class:`~agent.emulator.api.ControlPlaneApi`, plain HTTP, SigV4
  checked against generated dummy credentials);
* the data-plane relay (:class:`~agent.emulator.relay.Relay`, TLS with the emulator CA);
* the MQTT broker (:class:`~agent.emulator.broker.Broker`, mutual TLS, per-thing ACL) and
  the notification publisher (:class:`~agent.emulator.notifier.Notifier`);
* Device Shadows: the store (:class:`~agent.emulator.shadows.ShadowStore`), its MQTT topics
  (:class:`~agent.emulator.shadow_mqtt.ShadowService`) and the iot-data HTTP API
  (:class:`~agent.emulator.shadow_api.ShadowApi`, on the control plane's port);
* a timer closing tunnels at expiry (docs/protocol.md §16.4).

Directory layout (everything survives a restart)::

    pki/            ca.crt, ca.key and the service certificates
    broker/         mosquitto's config, ACLs, persistence and log
    things/<name>/  cert.pem, key.pem (0600), ca.pem, config.toml: a ready agent bundle
    state.json      the tunnel store (0600)
    shadows.json    every thing's shadows (0600)
    credentials.json, operator.env (0600): what `aws` / boto3 need to call the API
    emulator.json   endpoints of the running emulator (removed at stop)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import ssl
import string
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import structlog

from agent.common.files import write_private
from agent.emulator.admission import HANDSHAKE_TIMEOUT
from agent.emulator.broker import Broker, BrokerError, register_things
from agent.emulator.notifier import Notifier
from agent.emulator.pki import (
    DEFAULT_SERVER_HOSTS,
    PRIVILEGED_IDENTITY,
    CertificateAuthority,
    KeyPair,
)
from agent.emulator.shadows import ShadowStore
from agent.emulator.store import StoreEvent, TunnelStore
from agent.protocol.ids import THING_NAME


if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from agent.emulator.api import ControlPlaneApi
    from agent.emulator.relay import Relay
    from agent.emulator.shadow_mqtt import ShadowService


__all__ = ["DEFAULT_SERVICES", "Emulator", "ThingBundle"]

log = structlog.get_logger(__name__)

#: The services map written into a new thing's config.toml (the reference agents' SSH -> 22).
DEFAULT_SERVICES: Mapping[str, str] = {"SSH": "22"}
# Longest sleep of the expiry timer: also bounds how late retained CLOSED tunnels are purged.
_MAX_TICK = 60.0
_ADD_THING_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class ThingBundle:
    """
    What a device needs to talk to the emulator as one thing.

    Attributes:
        name: The thing name (the certificate CN).
        directory: ``things/<name>/``.
        cert: Client certificate.
        key: Private key (0600).
        ca: The emulator CA (trust anchor for the broker and the relay).
        config: Agent configuration (``tunnel-agent run --config``); written once
            the emulator's endpoints are known, rewritten at every start.
    """

    name: str
    directory: Path
    cert: Path
    key: Path
    ca: Path
    config: Path


def _toml_string(value: str) -> str:
    # json.dumps yields a valid TOML basic string for any str (same escapes).
    return json.dumps(value)


def _new_credentials() -> dict[str, str]:
    alphabet = string.ascii_uppercase + string.digits
    return {
        "access_key": "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16)),
        "secret_key": secrets.token_urlsafe(30)[:40],
    }


class Emulator:
    """
    The whole emulator, started and stopped as one async context manager.

    Args:
        directory: Where certificates, bundles, broker files and state live.
        host: Loopback address every service listens on.
        api_port: Control-plane port (0: any free port).
        relay_port: Data-plane port (0: any free port).
        mqtt_port: Broker port (0: any free port, kept across broker restarts).
        region: Region of tunnels whose request carries none.
        relay_tls: Serve ``wss://`` with the emulator CA (``False``: plain ``ws://``).
        verify_signatures: Check SigV4 against :attr:`access_key` / :attr:`secret_key`.
        max_open_tunnels: Cap of OPEN tunnels (docs/protocol.md §18).
        relay: Run the data-plane relay (``False``: control plane and MQTT only).
        broker_run_as: Account mosquitto drops to when root (see :mod:`.broker`).
        retention_seconds: How long CLOSED tunnels stay listed.
        replace_on_rotate: Rotation policy of the relay (docs/protocol.md §7.7).
        relay_handshake_timeout: Seconds a relay connection has for its TLS handshake and
            WebSocket upgrade before it is aborted.
    """

    def __init__(  # noqa: PLR0913 - every knob is a documented keyword-only setting
        self,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        api_port: int = 0,
        relay_port: int = 0,
        mqtt_port: int = 0,
        region: str = "us-east-1",
        relay_tls: bool = True,
        verify_signatures: bool = True,
        max_open_tunnels: int = 100,
        relay: bool = True,
        broker_run_as: str | None = None,
        retention_seconds: float = 3 * 3600,
        replace_on_rotate: bool = True,
        relay_handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        """
        Prepare the directory, PKI and store; no socket is opened before ``__aenter__``.
        """
        self.directory = directory.resolve()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.host = host
        self.region = region
        self.relay_tls = relay_tls
        self.verify_signatures = verify_signatures
        self._ports = {"api": api_port, "relay": relay_port}
        self._relay_enabled = relay
        self._relay_handshake_timeout = relay_handshake_timeout
        self.ca = CertificateAuthority(self.directory / "pki")
        self.ca.load_or_create()
        self.ca_file = self.ca.cert_file
        pki = self.directory / "pki"
        self.privileged = self.ca.issue_client(
            KeyPair(pki / "emulator.crt", pki / "emulator.key"), common_name=PRIVILEGED_IDENTITY
        )
        self.access_key, self.secret_key = self._load_credentials()
        self.store = TunnelStore(
            region=region,
            max_open_tunnels=max_open_tunnels,
            retention_seconds=retention_seconds,
            state_file=self.directory / "state.json",
            replace_on_rotate=replace_on_rotate,
        )
        self.shadows = ShadowStore(state_file=self.directory / "shadows.json")
        self.broker = Broker(
            self.directory / "broker",
            ca_file=self.ca_file,
            server=self.ca.issue_server(
                KeyPair(pki / "broker.crt", pki / "broker.key"), hosts=self._server_hosts()
            ),
            host=host,
            port=mqtt_port,
            things=self.thing_names(),
            run_as=broker_run_as,
        )
        self.notifier: Notifier | None = None
        self.shadow_service: ShadowService | None = None
        self.api: ControlPlaneApi | None = None
        self.relay: Relay | None = None
        self.operator_env = self.directory / "operator.env"
        self.endpoints_file = self.directory / "emulator.json"
        self._expiry: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.running = False

    # -- endpoints ------------------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        """
        The HTTP API endpoint URL, for the control plane and the shadow operations.

        Both ``AWS_ENDPOINT_URL_IOTSECURETUNNELING`` and ``AWS_ENDPOINT_URL_IOT_DATA_PLANE``.
        """
        return f"http://{self._url_host}:{self.api.port if self.api else self._ports['api']}"

    @property
    def relay_endpoint(self) -> str:
        """
        The data-plane endpoint as ``host:port`` (the localproxy's ``-e``).
        """
        return f"{self._url_host}:{self.relay.port if self.relay else self._ports['relay']}"

    @property
    def mqtt_endpoint(self) -> tuple[str, int]:
        """
        The broker's ``(host, port)``.
        """
        return self.host, self.broker.port

    @property
    def _url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def api_client(self, *, secret_key: str | None = None) -> Any:
        """
        A boto3 ``iotsecuretunneling`` client for this emulator, with its operator credentials.

        Args:
            secret_key: Another secret key (to be refused: signatures are checked).
        """
        import boto3  # noqa: PLC0415 - only callers that talk to the API pay for boto3
        from botocore.config import Config  # noqa: PLC0415

        return boto3.client(
            "iotsecuretunneling",
            endpoint_url=self.api_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(retries={"total_max_attempts": 1}),
        )

    def data_client(self, *, secret_key: str | None = None) -> Any:
        """
        A boto3 ``iot-data`` client (the shadow operations) for this emulator.

        Args:
            secret_key: Another secret key (to be refused: signatures are checked).
        """
        import boto3  # noqa: PLC0415 - only callers that talk to the API pay for boto3
        from botocore.config import Config  # noqa: PLC0415

        return boto3.client(
            "iot-data",
            endpoint_url=self.api_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(retries={"total_max_attempts": 1}),
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """
        Start broker, notifier, API, relay and the expiry timer; write bundles.

        On a failure, whatever already started is stopped again before the error propagates.
        """
        self._loop = asyncio.get_running_loop()
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """
        Stop everything, in the reverse order of starting.
        """
        await self._stop()

    async def _start(self) -> None:
        # Imported here: the API and relay pull in aiohttp / websockets, not needed by `add-thing`.
        from agent.emulator.api import ControlPlaneApi  # noqa: PLC0415
        from agent.emulator.shadow_api import ShadowApi  # noqa: PLC0415
        from agent.emulator.shadow_mqtt import ShadowService  # noqa: PLC0415

        for name in self.thing_names():
            self.broker.allow_thing(name)
        await self.broker.start()
        self.notifier = Notifier(
            self.store,
            host=self.host,
            port=self.broker.port,
            identity=self.privileged,
            ca_file=self.ca_file,
        )
        await self.notifier.start()
        self.shadow_service = ShadowService(
            self.shadows,
            host=self.host,
            port=self.broker.port,
            identity=self.privileged,
            ca_file=self.ca_file,
        )
        await self.shadow_service.start()
        credentials = {self.access_key: self.secret_key} if self.verify_signatures else None
        self.api = ControlPlaneApi(
            self.store,
            host=self.host,
            port=self._ports["api"],
            credentials=credentials,
            extra=ShadowApi(self.shadows, credentials=credentials).handle,
        )
        await self.api.start()
        # Keep the bound ports: a restarted emulator comes back on the same endpoints.
        self._ports["api"] = self.api.port
        if self._relay_enabled:
            from agent.emulator.relay import Relay  # noqa: PLC0415

            self.relay = Relay(
                self.store,
                host=self.host,
                port=self._ports["relay"],
                ssl_context=self._relay_ssl() if self.relay_tls else None,
                handshake_timeout=self._relay_handshake_timeout,
            )
            await self.relay.start()
            self._ports["relay"] = self.relay.port
        self.store.listeners.append(self._on_store_event)
        self._expiry = asyncio.create_task(self._expire_loop(), name="emulator-expiry")
        self.running = True
        for name in sorted(self.thing_names()):
            self._write_config(name)
        self._write_operator_env()
        self._write_endpoints()
        log.info(
            "emulator_started",
            api=self.api_url,
            relay=self.relay_endpoint if self.relay else None,
            mqtt=f"{self.host}:{self.broker.port}",
            directory=str(self.directory),
        )

    async def _stop(self) -> None:
        self.running = False
        with contextlib.suppress(FileNotFoundError):
            self.endpoints_file.unlink()
        if self._on_store_event in self.store.listeners:
            self.store.listeners.remove(self._on_store_event)
        # Stop taking requests and notifications first (docs/architecture.md §6.5).
        if self.api is not None:
            await self.api.close()
        if self._expiry is not None:
            task, self._expiry = self._expiry, None
            task.cancel("emulator stopping")
            await asyncio.gather(task, return_exceptions=True)
        if self.relay is not None:
            await self.relay.close()
            self.relay = None
        if self.shadow_service is not None:
            await self.shadow_service.stop()
            self.shadow_service = None
        if self.notifier is not None:
            await self.notifier.stop()
            self.notifier = None
        await self.broker.stop()
        self.api = None
        log.info("emulator_stopped", directory=str(self.directory))

    def _server_hosts(self) -> list[str]:
        # The listen address first (it becomes the CN), then the loopback names.
        return list(dict.fromkeys([self.host, *DEFAULT_SERVER_HOSTS]))

    def _relay_ssl(self) -> ssl.SSLContext:
        pki = self.directory / "pki"
        pair = self.ca.issue_server(
            KeyPair(pki / "relay.crt", pki / "relay.key"), hosts=self._server_hosts()
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(pair.cert, pair.key)
        return context

    # -- expiry (docs/protocol.md §16.4) -------------------------------------------------------

    def _on_store_event(self, event: StoreEvent) -> None:
        if event.kind == "opened" and self._loop is not None:
            # A new tunnel may expire before the timer's current deadline.
            self._loop.call_soon_threadsafe(self._wake.set)

    async def _expire_loop(self) -> None:
        while True:
            self._wake.clear()
            due = self.store.next_expiry()
            delay = _MAX_TICK if due is None else max(0.0, min(_MAX_TICK, due - self.store.clock()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            try:
                self.store.expire_due()
            except Exception:
                log.exception("expiry_failed")

    # -- things ---------------------------------------------------------------------------------

    def thing_names(self) -> set[str]:
        """
        Return the names of every thing with a bundle in ``things/``.
        """
        root = self.directory / "things"
        if not root.is_dir():
            return set()
        return {p.name for p in root.iterdir() if (p / "cert.pem").is_file()}

    def bundle(self, name: str) -> ThingBundle:
        """
        Return the paths of a thing's bundle (whether or not it exists yet).
        """
        directory = self.directory / "things" / name
        return ThingBundle(
            name=name,
            directory=directory,
            cert=directory / "cert.pem",
            key=directory / "key.pem",
            ca=directory / "ca.pem",
            config=directory / "config.toml",
        )

    def add_thing(
        self, name: str, *, services: Mapping[str, str | int] | None = None
    ) -> ThingBundle:
        """
        Create (or refresh) a thing: certificate, key, CA copy and agent config.

        When the emulator runs, the broker learns the thing before this returns, so
        the device may subscribe at once. Blocks for that registration (tens of ms).

        Args:
            name: Thing name, ``[a-zA-Z0-9:_-]{1,128}``.
            services: ``[services]`` map for config.toml; default :data:`DEFAULT_SERVICES`.

        Returns:
            The bundle's paths.

        Raises:
            ValueError: Invalid thing name.
            BrokerError: The running broker refused the registration.
        """
        bundle = self._write_bundle(name, services)
        if self.running:
            self._run_blocking(self.broker.add_thing(name))
        else:
            self._register_with_running_emulator(name)
        return bundle

    async def add_thing_async(
        self, name: str, *, services: Mapping[str, str | int] | None = None
    ) -> ThingBundle:
        """
        Like :meth:`add_thing`, without blocking the event loop.
        """
        bundle = self._write_bundle(name, services)
        await self.broker.add_thing(name)
        return bundle

    def _write_bundle(self, name: str, services: Mapping[str, str | int] | None) -> ThingBundle:
        if not THING_NAME.fullmatch(name):
            raise ValueError(f"invalid thing name {name!r}: must match [a-zA-Z0-9:_-]{{1,128}}")
        bundle = self.bundle(name)
        bundle.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.ca.issue_client(KeyPair(bundle.cert, bundle.key), common_name=name)
        shutil.copyfile(self.ca_file, bundle.ca)
        if services is not None:
            self._services_file(name).write_text(
                json.dumps({k: str(v) for k, v in services.items()})
            )
        self._write_config(name)
        return bundle

    def _services_file(self, name: str) -> Path:
        return self.directory / "things" / name / "services.json"

    def _run_blocking(self, coro: Any) -> None:
        # The caller may be a coroutine on our own loop: run the exchange on a private loop
        # in a helper thread so that waiting here cannot deadlock ours.
        errors: list[BaseException] = []

        def target() -> None:
            try:
                asyncio.run(coro)
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)

        thread = threading.Thread(target=target, name="emulator-add-thing", daemon=True)
        thread.start()
        thread.join(_ADD_THING_TIMEOUT)
        if errors:
            raise errors[0]
        if thread.is_alive():
            raise BrokerError(f"the broker did not register the thing within {_ADD_THING_TIMEOUT}s")

    def _register_with_running_emulator(self, name: str) -> None:
        # `tunnel-agent emulator add-thing` in another process while an emulator runs on this
        # directory: tell its mosquitto directly (the address is in emulator.json), with the
        # identity its listener trusts, as the running emulator itself does.
        endpoints = self._read_endpoints()
        if endpoints is None or "mqtt_backend" not in endpoints:
            return
        host, port = endpoints["mqtt_backend"]
        with contextlib.suppress(OSError, BrokerError):
            admin = self.broker.gate_identity(PRIVILEGED_IDENTITY)
            self._run_blocking(
                register_things(
                    host=host, port=port, ca_file=self.ca_file, admin=admin, names=[name]
                )
            )

    def _read_endpoints(self) -> dict[str, Any] | None:
        """
        Return the endpoints of an emulator running on this directory, if one is alive.
        """
        try:
            data: dict[str, Any] = json.loads(self.endpoints_file.read_text())
            # A crashed emulator leaves its file behind: trust it only while its pid lives.
            os.kill(int(data["pid"]), 0)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return data

    # -- generated files ------------------------------------------------------------------------

    def _write_config(self, name: str) -> None:
        bundle = self.bundle(name)
        endpoints = self._current_endpoints() or self._read_endpoints()
        if endpoints is None or not bundle.directory.is_dir():
            return
        mqtt_host, mqtt_port = endpoints["mqtt"]
        try:
            services = json.loads(self._services_file(name).read_text())
        except (OSError, ValueError):
            services = dict(DEFAULT_SERVICES)
        lines = [
            f"# Agent configuration for thing {name!r} against the local tunnel emulator.",
            "# Generated by the emulator; rewritten whenever it starts.",
            f"thing_name = {_toml_string(name)}",
            'notify = "mqtt"',
            "",
            "[mqtt]",
            f"endpoint = {_toml_string(mqtt_host)}",
            f"port = {int(mqtt_port)}",
            f"cert = {_toml_string(str(bundle.cert))}",
            f"key = {_toml_string(str(bundle.key))}",
            f"ca = {_toml_string(str(bundle.ca))}",
        ]
        if endpoints.get("relay"):
            lines += [
                "",
                "[proxy]",
                f"endpoint = {_toml_string(endpoints['relay'])}",
                f"ca = {_toml_string(str(bundle.ca))}",
            ]
        # Tunnel records beside the bundle, not in the system's /var/lib/iot-tunnel-agent.
        lines += ["", "[tunnels]", f"state_dir = {_toml_string(str(bundle.directory / 'state'))}"]
        lines += ["", "[services]"]
        lines += [f"{key} = {_toml_string(str(value))}" for key, value in services.items()]
        bundle.config.write_text("\n".join(lines) + "\n")

    def _current_endpoints(self) -> dict[str, Any] | None:
        if not self.running:
            return None
        return {
            "api": self.api_url,
            "relay": self.relay_endpoint if self.relay is not None else None,
            "relay_tls": self.relay_tls,
            "mqtt": [self.host, self.broker.port],
            "mqtt_backend": list(self.broker.backend_address),
            "ca": str(self.ca_file),
            "region": self.region,
            "pid": os.getpid(),
            "broker_pid": self.broker.pid,
        }

    def _write_endpoints(self) -> None:
        endpoints = self._current_endpoints()
        if endpoints is not None:
            self.endpoints_file.write_text(json.dumps(endpoints, indent=1) + "\n")

    def _write_operator_env(self) -> None:
        lines = [
            "# Operator environment for the local tunnel emulator: `set -a; . ./operator.env`.",
            f"AWS_ENDPOINT_URL_IOTSECURETUNNELING={self.api_url}",
            f"AWS_ENDPOINT_URL_IOT_DATA_PLANE={self.api_url}",
            f"AWS_ACCESS_KEY_ID={self.access_key}",
            f"AWS_SECRET_ACCESS_KEY={self.secret_key}",
            f"AWS_DEFAULT_REGION={self.region}",
            f"TUNNEL_EMULATOR_CA_FILE={self.ca_file}",
        ]
        if self.relay is not None:
            lines.append(f"TUNNEL_EMULATOR_RELAY_ENDPOINT={self.relay_endpoint}")
        write_private(self.operator_env, ("\n".join(lines) + "\n").encode())

    def _load_credentials(self) -> tuple[str, str]:
        path = self.directory / "credentials.json"
        try:
            data = json.loads(path.read_text())
            return str(data["access_key"]), str(data["secret_key"])
        except (OSError, ValueError, KeyError):
            data = _new_credentials()
            write_private(path, json.dumps(data).encode())
            return data["access_key"], data["secret_key"]
