"""
Mosquitto as a child process, configured like AWS IoT Core for the tunnel notify topic.

What AWS IoT Core enforces and this broker reproduces (docs/protocol.md §19):

* mutual TLS only: a client without a certificate from the emulator CA is
  refused during the handshake, with the TLS alert;
* the identity is the certificate CN (``use_identity_as_username``): the thing name;
* a thing connects only with its own name as client id (the ``iot:Connect`` policy on
  ``client/${iot:Connection.Thing.ThingName}``); any other id gets CONNACK "not
  authorized" and leaves the real thing's session alone. Mosquitto 2.0 cannot refuse
  that with certificate identities, so :class:`~agent.emulator.mqttgate.ConnectGate`
  holds the public port, checks the CONNECT and forwards to mosquitto's loopback
  listener, which trusts only the gate's own CA (see :mod:`.mqttgate`);
* a thing may subscribe to, and receive from, ``$aws/things/<its name>/tunnels/notify``
  and its own shadow topics ``$aws/things/<its name>/shadow/...``; it may publish only
  shadow requests (``.../update``, ``/get``, ``/delete``) for itself. The emulator's
  privileged identity may publish to ``$aws/things/+/tunnels/notify`` and serves the
  shadow topics of every thing.

mosquitto 2.0's ``acl_file`` cannot refuse a SUBSCRIBE (it grants every filter and
filters at delivery), whereas AWS IoT answers SUBACK 0x87. The dynamic-security
plugin shipped with the Debian package does refuse, but it has no ``%u``
substitution in 2.0.11, so each thing gets its own role: written into the plugin's
JSON at start, and created at run time over ``$CONTROL/dynamic-security/v1`` by the
privileged identity (:meth:`Broker.add_thing`).

Privileges: started as root, mosquitto switches to the ``user`` of its config
*before* it reads certificates, the plugin file or the persistence database.
With ``run_as=None`` (the default) a root emulator writes ``user root``: the
emulator directory often sits below directories the ``mosquitto`` account cannot
traverse (pytest's 0700 temp dirs, a home directory), and the broker listens on
loopback only, as a child of a process that is already root. ``run_as="mosquitto"``
runs it as that account instead (the emulator switches user between fork and exec):
the broker directory is then handed to that account, and every directory above it
must be traversable by it.

Lifetime: the broker never outlives the emulator. The kernel sends it SIGTERM when
the emulator's process ends, however it ends (``PR_SET_PDEATHSIG``, as for the
agent's proxies), and mosquitto saves its sessions on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import glob
import grp
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import ssl
import stat
import subprocess
from typing import IO, TYPE_CHECKING, Any, Self

import structlog

from agent.common.process import death_signal_preexec
from agent.emulator.mqtt_client import AsyncMqttClient, MqttConnectError
from agent.emulator.mqttgate import ConnectGate
from agent.emulator.pki import PRIVILEGED_IDENTITY, CertificateAuthority, KeyPair
from agent.exceptions import AgentError
from agent.protocol.ids import THING_NAME


if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path


__all__ = [
    "NOTIFY_TOPIC",
    "SHADOW_REQUEST_TOPICS",
    "Broker",
    "BrokerError",
    "find_dynsec_plugin",
    "find_mosquitto",
    "free_port",
    "notify_topic",
    "register_things",
]

log = structlog.get_logger(__name__)

#: The reserved notify topic filter the privileged identity publishes to (docs/protocol.md §17.1).
NOTIFY_TOPIC = "$aws/things/+/tunnels/notify"
_SHADOW_OPS = ("update", "get", "delete")
#: The shadow request filters the privileged identity subscribes to (classic and named).
SHADOW_REQUEST_TOPICS = tuple(
    f"$aws/things/+/shadow{infix}/{op}" for infix in ("", "/name/+") for op in _SHADOW_OPS
)
_CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_PORT_ATTEMPTS = 5
_ADMIN_TIMEOUT = 10.0
# Mosquitto itself listens here, behind the gate; only the gate's certificates get in.
_BACKEND_HOST = "127.0.0.1"


class BrokerError(AgentError):
    """
    The MQTT broker could not be started, configured or reached.
    """


def notify_topic(thing_name: str) -> str:
    """
    Return the tunnel notify topic of one thing (docs/protocol.md §17.1).
    """
    return f"$aws/things/{thing_name}/tunnels/notify"


def find_mosquitto() -> str:
    """
    Locate the mosquitto binary (PATH, then the sbin directories a non-root PATH lacks).

    Returns:
        Absolute path of the binary.

    Raises:
        BrokerError: mosquitto is not installed.
    """
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    found = shutil.which("mosquitto", path=path)
    if found is None:
        raise BrokerError(
            "mosquitto not found: install the Debian package 'mosquitto' "
            "(apt-get install mosquitto) or pass the binary path"
        )
    return found


def find_dynsec_plugin() -> str:
    """
    Locate mosquitto's dynamic-security plugin (shipped in the ``mosquitto`` package).

    Raises:
        BrokerError: The plugin is not installed.
    """
    patterns = (
        "/usr/lib/*/mosquitto_dynamic_security.so",
        "/usr/lib/mosquitto_dynamic_security.so",
        "/usr/local/lib/mosquitto_dynamic_security.so",
        "/usr/local/lib/*/mosquitto_dynamic_security.so",
    )
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))  # noqa: PTH207 - absolute multi-level patterns
        if matches:
            return matches[0]
    raise BrokerError("mosquitto_dynamic_security.so not found: mosquitto >= 2.0 is required")


def free_port(host: str = "127.0.0.1") -> int:
    """
    Return a TCP port that was free on ``host`` a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}


def _thing_role(name: str) -> dict[str, Any]:
    topic = notify_topic(name)
    # Literal, not pattern: `$aws/things/+/...` or `#` must not be granted (docs/protocol.md §19.3).
    return {
        "rolename": f"thing:{name}",
        "acls": [
            _acl("subscribeLiteral", topic),
            _acl("publishClientReceive", topic),
            *_shadow_acls(name),
        ],
    }


def _shadow_acls(name: str) -> list[dict[str, Any]]:
    # The thing's own shadow tree only: the name is fixed in every entry, so no pattern
    # reaches `$aws/things/<another thing>/...`. Requests go to the three request topics;
    # responses may be subscribed to (also with wildcards below the thing's own prefix).
    own = f"$aws/things/{name}/shadow"
    requests = [f"{prefix}/{op}" for prefix in (own, f"{own}/name/+") for op in _SHADOW_OPS]
    return [
        *(_acl("publishClientSend", topic) for topic in requests),
        _acl("subscribePattern", f"{own}/#"),
        _acl("publishClientReceive", f"{own}/#"),
    ]


def _thing_client(name: str) -> dict[str, Any]:
    return {"username": name, "roles": [{"rolename": f"thing:{name}"}]}


def _dynsec_config(things: Iterable[str]) -> dict[str, Any]:
    response = f"{_CONTROL_TOPIC}/response"
    emulator_role = {
        "rolename": "emulator",
        "acls": [
            _acl("publishClientSend", NOTIFY_TOPIC),
            _acl("publishClientSend", _CONTROL_TOPIC),
            _acl("subscribeLiteral", response),
            _acl("publishClientReceive", response),
            # The shadow service: every thing's shadow requests in, responses out.
            *(_acl("subscribeLiteral", topic) for topic in SHADOW_REQUEST_TOPICS),
            *(_acl("publishClientReceive", topic) for topic in SHADOW_REQUEST_TOPICS),
            _acl("publishClientSend", "$aws/things/+/shadow/#"),
        ],
    }
    names = sorted(set(things))
    return {
        # Everything not granted below is refused: no publish anywhere, no other subscription.
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": [
            {"username": PRIVILEGED_IDENTITY, "roles": [{"rolename": "emulator"}]},
            *(_thing_client(name) for name in names),
        ],
        "groups": [],
        "roles": [emulator_role, *(_thing_role(name) for name in names)],
    }


def _check_thing_name(name: str) -> None:
    if not THING_NAME.fullmatch(name):
        raise ValueError(f"invalid thing name {name!r}: must match [a-zA-Z0-9:_-]{{1,128}}")


class Broker:
    """
    One mosquitto child on a loopback port, with the emulator CA and per-thing ACLs.

    Args:
        directory: The broker's own directory (config, certificate copies, ACLs,
            persistence, log, the gate's CA); created when missing.
        ca_file: The emulator CA; clients must present a certificate it issued.
        server: The broker's TLS server certificate and key.
        host: Listen address.
        port: Listen port; 0 picks a free one on first start and keeps it afterwards.
        things: Thing names allowed to subscribe from the first start.
        run_as: Account mosquitto drops to when started as root; ``None`` keeps root
            (see the module docstring). Ignored when not root.
        binary: mosquitto executable; default: :func:`find_mosquitto`.
        verbose: Log every packet (``log_type all``) instead of connections and errors.
        start_timeout: Seconds to wait for the broker to listen.
        stop_timeout: Seconds between SIGTERM and SIGKILL.
    """

    def __init__(  # noqa: PLR0913 - keyword-only broker settings, each documented
        self,
        directory: Path,
        *,
        ca_file: Path,
        server: KeyPair,
        host: str = "127.0.0.1",
        port: int = 0,
        things: Iterable[str] = (),
        run_as: str | None = None,
        binary: str | None = None,
        verbose: bool = False,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        """
        Record the settings; nothing runs before :meth:`start`.
        """
        self.directory = directory
        self.host = host
        self.port = port
        self.ca_file = ca_file
        self.server = server
        self.run_as = run_as
        self.binary = binary
        self.verbose = verbose
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.config_file = directory / "mosquitto.conf"
        self.dynsec_file = directory / "dynamic-security.json"
        self.log_file = directory / "mosquitto.log"
        self.data_dir = directory / "data"
        # Never handed to the run_as account: it holds the key that makes gate identities.
        self.gate_ca = CertificateAuthority(
            directory / "gate-pki", common_name="IoT Tunnel Emulator broker gate CA"
        )
        self.backend_port = 0
        self._gate: ConnectGate | None = None
        self._gate_contexts: dict[str, ssl.SSLContext] = {}
        self._things: set[str] = set()
        for name in things:
            _check_thing_name(name)
            self._things.add(name)
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """
        Start the broker; see :meth:`start`.
        """
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """
        Stop the broker; see :meth:`stop`.
        """
        await self.stop()

    @property
    def things(self) -> frozenset[str]:
        """
        The thing names the broker lets subscribe to their notify topic.
        """
        return frozenset(self._things)

    @property
    def running(self) -> bool:
        """
        Whether the child process is alive.
        """
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """
        The child's process id while it runs.
        """
        return self._process.pid if self.running and self._process is not None else None

    async def start(self) -> None:
        """
        Write the configuration, start mosquitto and wait until it accepts connections.

        Raises:
            BrokerError: mosquitto is missing, exits during startup, or does not listen
                within ``start_timeout``; the message quotes its log.
        """
        if self.running:
            return
        binary = self.binary or find_mosquitto()
        plugin = find_dynsec_plugin()
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self.backend_port = free_port(_BACKEND_HOST)
            self._write_files(plugin)
            try:
                await self._spawn(binary)
            except _PortInUseError:
                # The free port we probed was taken before mosquitto bound it: pick again.
                if attempt == _PORT_ATTEMPTS:
                    raise BrokerError(
                        f"mosquitto: port {_BACKEND_HOST}:{self.backend_port} already in use"
                    ) from None
                continue
            break
        try:
            await self._start_gate()
        except BaseException:
            await self.stop()
            raise
        log.info("broker_started", host=self.host, port=self.port, pid=self.pid)

    async def _start_gate(self) -> None:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.minimum_version = ssl.TLSVersion.TLSv1_2
        server.load_cert_chain(self.server.cert, self.server.key)
        server.verify_mode = ssl.CERT_REQUIRED
        server.load_verify_locations(cafile=str(self.ca_file))
        gate = ConnectGate(
            host=self.host,
            port=self.port,
            server=server,
            backend=(_BACKEND_HOST, self.backend_port),
            identity_context=self._gate_identity,
        )
        try:
            await gate.start()
        except OSError as exc:
            raise BrokerError(
                f"mosquitto: port {self.host}:{self.port} already in use"
                if exc.errno == errno.EADDRINUSE
                else f"mosquitto: cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from exc
        # Port 0 picked one: keep it, so a restart comes back on the same endpoint.
        self.port = gate.port
        self._gate = gate

    async def _gate_identity(self, name: str) -> ssl.SSLContext:
        context = self._gate_contexts.get(name)
        if context is None:
            context = await asyncio.to_thread(self._new_gate_identity, name)
            self._gate_contexts[name] = context
        return context

    def gate_identity(self, name: str) -> KeyPair:
        """
        Return (issuing it on first use) the certificate that speaks as ``name`` to mosquitto.

        Mosquitto's listener trusts only the gate's CA: these certificates are how the gate,
        and the emulator's own administration, reach it directly.
        """
        # Files named by a digest: a CN is any string the emulator CA signed.
        stem = hashlib.sha256(name.encode()).hexdigest()[:32]
        clients = self.gate_ca.directory / "clients"
        return self.gate_ca.issue_client(
            KeyPair(clients / f"{stem}.crt", clients / f"{stem}.key"), common_name=name
        )

    @property
    def backend_address(self) -> tuple[str, int]:
        """
        Mosquitto's own loopback listener, behind the gate (valid while running).
        """
        return _BACKEND_HOST, self.backend_port

    def _new_gate_identity(self, name: str) -> ssl.SSLContext:
        pair = self.gate_identity(name)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # The backend is our own child on loopback, presenting the broker's certificate.
        context.check_hostname = False
        context.load_verify_locations(cafile=str(self.ca_file))
        context.load_cert_chain(pair.cert, pair.key)
        return context

    async def stop(self) -> None:
        """
        Stop mosquitto and reap it.

        SIGTERM first (mosquitto then saves its persistence database), SIGKILL after
        ``stop_timeout``.
        """
        gate, self._gate = self._gate, None
        if gate is not None:
            await gate.close()
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                if not await self._wait(process, self.stop_timeout):
                    log.warning("broker_kill", pid=process.pid)
                    process.kill()
                    await self._wait(process, self.stop_timeout)
            log.info("broker_stopped", port=self.port, returncode=process.returncode)
        if self._log is not None:
            self._log.close()
            self._log = None

    async def restart(self) -> None:
        """
        Stop and start again on the same port, keeping sessions (persistence).
        """
        await self.stop()
        await self.start()

    def allow_thing(self, name: str) -> None:
        """
        Let ``name`` subscribe from the next start on (no effect on a running broker).

        Raises:
            ValueError: ``name`` is not a valid thing name.
        """
        _check_thing_name(name)
        self._things.add(name)

    async def add_thing(self, name: str) -> None:
        """
        Allow ``name`` to subscribe to its notify topic, at once when the broker runs.

        Args:
            name: Thing name (its certificate CN).

        Raises:
            ValueError: ``name`` is not a valid thing name.
            BrokerError: The running broker refused the registration.
        """
        _check_thing_name(name)
        if name in self._things:
            return
        if self.running:
            # Straight to mosquitto, not through the gate: a caller may block the event loop
            # the gate runs on while it waits for this (Emulator.add_thing does).
            host, port = self.backend_address
            await register_things(
                host=host,
                port=port,
                ca_file=self.ca_file,
                admin=await asyncio.to_thread(self.gate_identity, PRIVILEGED_IDENTITY),
                names=[name],
            )
        self._things.add(name)

    # -- internals ------------------------------------------------------------------------------

    def _write_files(self, plugin: str) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        # Copies, so the broker never needs to read the emulator's PKI directory (and its CA key).
        # Mosquitto trusts the gate's CA only: devices reach it through the gate.
        self.gate_ca.load_or_create()
        shutil.copyfile(self.gate_ca.cert_file, self.directory / "ca.crt")
        shutil.copyfile(self.server.cert, self.directory / "server.crt")
        key_copy = self.directory / "server.key"
        key_copy.touch(mode=0o600)
        key_copy.chmod(0o600)
        shutil.copyfile(self.server.key, key_copy)
        self.dynsec_file.write_text(json.dumps(_dynsec_config(self._things), indent=1) + "\n")
        self.dynsec_file.chmod(0o600)
        self.config_file.write_text(self._config_text(plugin))
        self.config_file.chmod(0o600)
        user = self._drop_user()
        if user is not None:
            self._hand_over(user)

    def _drop_user(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0 or self.run_as is None or self.run_as == "root":
            return None
        try:
            return pwd.getpwnam(self.run_as)
        except KeyError:
            raise BrokerError(f"run_as: no such user {self.run_as!r}") from None

    def _hand_over(self, user: pwd.struct_passwd) -> None:
        # mosquitto reads everything after switching user, and the plugin rewrites its JSON.
        self._check_traversable(user)
        paths = [self.directory, self.data_dir, *self.directory.iterdir(), *self.data_dir.iterdir()]
        for path in paths:
            if path not in (self.log_file, self.gate_ca.directory):
                os.chown(path, user.pw_uid, user.pw_gid)

    def _check_traversable(self, user: pwd.struct_passwd) -> None:
        groups = {g.gr_gid for g in grp.getgrall() if user.pw_name in g.gr_mem} | {user.pw_gid}
        for parent in self.directory.resolve().parents:
            st = parent.stat()
            if st.st_uid == user.pw_uid:
                bit = stat.S_IXUSR
            elif st.st_gid in groups:
                bit = stat.S_IXGRP
            else:
                bit = stat.S_IXOTH
            if not st.st_mode & bit:
                raise BrokerError(
                    f"run_as={user.pw_name!r}: {parent} is not traversable by that user "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); use another directory or run_as=None"
                )

    def _config_text(self, plugin: str) -> str:
        lines = [
            "# Generated by the tunnel emulator; rewritten on every start.",
            "per_listener_settings false",
            "allow_anonymous false",
            f"plugin {plugin}",
            f"plugin_opt_config_file {self.dynsec_file}",
            # Persistent sessions and their queued QoS 1 messages survive a broker restart.
            "persistence true",
            f"persistence_location {self.data_dir}/",
            "autosave_interval 60",
            "log_dest stderr",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            *(
                ["log_type all"]
                if self.verbose
                else [f"log_type {t}" for t in ("error", "warning", "notice", "information")]
            ),
            "set_tcp_nodelay true",
            f"listener {self.backend_port} {_BACKEND_HOST}",
            f"cafile {self.directory / 'ca.crt'}",
            f"certfile {self.directory / 'server.crt'}",
            f"keyfile {self.directory / 'server.key'}",
            "require_certificate true",
            "use_identity_as_username true",
        ]
        if os.geteuid() == 0:
            lines.insert(1, f"user {self.run_as or 'root'}")
        return "\n".join(lines) + "\n"

    async def _spawn(self, binary: str) -> None:
        if self._log is None:
            self._log = self.log_file.open("ab")
        offset = self._log.tell()
        user = self._drop_user()
        try:
            self._process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; waits are async
                [binary, "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                # Its own session: Ctrl-C in the emulator's terminal reaches the emulator only,
                # which then stops the broker in order.
                start_new_session=True,
                # The kernel sends SIGTERM when the emulator dies, even by SIGKILL: a broker
                # left behind would hold the port and the emulator's directory.
                preexec_fn=death_signal_preexec(os.getpid()),  # noqa: PLW1509 - one bound prctl call
                # Switch user before exec rather than letting mosquitto drop privileges
                # itself: a change of user clears the death signal, and here the switch
                # happens before preexec_fn asks for it.
                user=None if user is None else user.pw_uid,
                group=None if user is None else user.pw_gid,
                extra_groups=None if user is None else [],
            )
        except OSError as exc:
            await self.stop()  # closes the log file
            raise BrokerError(f"cannot run {binary}: {exc.strerror or exc}") from exc
        try:
            await self._wait_ready(offset)
        except BaseException:
            await self.stop()
            raise

    async def _wait_ready(self, offset: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        assert self._process is not None  # noqa: S101 - set by _spawn
        while True:
            text = self._log_since(offset)
            if self._process.poll() is not None:
                if "Address already in use" in text:
                    raise _PortInUseError
                raise BrokerError(
                    f"mosquitto exited with status {self._process.returncode} during startup:\n"
                    + text.strip()
                )
            # "running" is logged once every listener is bound: a connect probe alone
            # could reach someone else's socket on a port we failed to bind.
            if " running" in text and await self._probe():
                return
            if loop.time() > deadline:
                raise BrokerError(
                    f"mosquitto did not listen on {_BACKEND_HOST}:{self.backend_port} within "
                    f"{self.start_timeout:g}s:\n" + text.strip()
                )
            await asyncio.sleep(0.02)

    def _log_since(self, offset: int) -> str:
        with self.log_file.open("rb") as file:
            file.seek(offset)
            return file.read().decode(errors="replace")

    async def _probe(self) -> bool:
        try:
            _reader, writer = await asyncio.open_connection(_BACKEND_HOST, self.backend_port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    @staticmethod
    async def _wait(process: subprocess.Popen[bytes], seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while process.poll() is None:
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True


class _PortInUseError(AgentError):
    """
    mosquitto could not bind its port (internal: triggers another port choice).
    """


async def register_things(
    *,
    host: str,
    port: int,
    ca_file: Path,
    admin: KeyPair,
    names: Iterable[str],
) -> None:
    """
    Create the dynamic-security role and client of each thing on a running broker.

    Registering a thing that already exists is not an error, so this is idempotent.

    Args:
        host: Broker host.
        port: Broker port.
        ca_file: The emulator CA.
        admin: The privileged identity's certificate and key.
        names: Thing names to register.

    Raises:
        BrokerError: The broker is unreachable or refused a command.
    """
    commands: list[dict[str, Any]] = []
    for name in names:
        _check_thing_name(name)
        role = _thing_role(name)
        commands.append({"command": "createRole", **role})
        commands.append({"command": "createClient", **_thing_client(name)})
    if not commands:
        return
    client = AsyncMqttClient(
        endpoint=host,
        port=port,
        cert=admin.cert,
        key=admin.key,
        ca=ca_file,
        client_id=f"{PRIVILEGED_IDENTITY}-admin-{secrets.token_hex(4)}",
        connect_timeout=_ADMIN_TIMEOUT,
    )
    try:
        async with asyncio.timeout(_ADMIN_TIMEOUT):
            await client.connect()
            codes = await client.subscribe(f"{_CONTROL_TOPIC}/response")
            if codes != [1]:
                raise BrokerError(f"dynamic-security response topic refused: SUBACK {codes}")
            await client.publish(_CONTROL_TOPIC, json.dumps({"commands": commands}).encode())
            message = await client.receive()
    except MqttConnectError as exc:
        raise BrokerError(f"cannot reach the broker to register things: {exc}") from exc
    except TimeoutError:
        raise BrokerError("the broker did not answer the thing registration in time") from None
    finally:
        await client.disconnect()
    errors = [
        f"{r.get('command')}: {r['error']}"
        for r in json.loads(message.payload).get("responses", [])
        if r.get("error") and "already exists" not in str(r["error"])
    ]
    if errors:
        raise BrokerError("dynamic-security refused: " + "; ".join(errors))
