"""
``tunnel-localproxy``: command line compatible with the AWS IoT Secure Tunneling localproxy.

Flags and environment variables follow the AWS binary (docs/protocol.md §9) so the agent can spawn
either. The access token should come from ``AWSIOT_TUNNEL_ACCESS_TOKEN``: argv is public in ``ps``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import signal
import sys
import types
from typing import TextIO

from agent import __version__
from agent.common.loop import run
from agent.common.secretpipe import TokenPipeError, read_tokens
from agent.exceptions import EXIT_USAGE, AgentError
from agent.protocol import DESTINATION, SOURCE, Mode, ProtocolVersion
from agent.protocol.ids import CLIENT_TOKEN, MAX_TOKEN_LENGTH
from agent.proxy.mapping import MappingError, Target, parse_destination_map, parse_source_map
from agent.proxy.options import ProxyOptions, endpoint_for_region, parse_endpoint


__all__ = [
    "build_parser",
    "environment_with_tokens",
    "main",
    "options_from_args",
    "run_options",
    "setup_logging",
]

# -v levels of the AWS localproxy: 0 off ... 4 info (default) ... 6 trace.
_LEVELS = {
    0: logging.CRITICAL + 10,
    1: logging.CRITICAL,
    2: logging.ERROR,
    3: logging.WARNING,
    4: logging.INFO,
    5: logging.DEBUG,
    6: logging.DEBUG,
}

log = logging.getLogger("agent.proxy")


class UsageError(AgentError):
    """
    The command line or environment is invalid.
    """


def build_parser() -> argparse.ArgumentParser:
    """
    The argument parser, with the AWS localproxy's flag names.
    """
    parser = argparse.ArgumentParser(
        prog="tunnel-localproxy",
        description=(
            "Local proxy for AWS IoT Secure Tunneling. A source listens on local ports and carries "
            "each connection through the tunnel; a destination connects the tunnel's streams to "
            "local services. Set the access token in AWSIOT_TUNNEL_ACCESS_TOKEN."
        ),
        epilog=(
            "Environment: AWSIOT_TUNNEL_ACCESS_TOKEN (token), AWSIOT_TUNNEL_CLIENT_TOKEN or "
            "AWSIOT_CLIENT_TOKEN, "
            "AWSIOT_TUNNEL_ENDPOINT, AWSIOT_TUNNEL_REGION, https_proxy/HTTPS_PROXY, no_proxy. "
            "Exit status 0 when the tunnel ends (closed, or the token is refused)."
        ),
    )
    where = parser.add_argument_group("service endpoint (one of)")
    where.add_argument("-r", "--region", help="AWS region of the tunnel, e.g. us-east-1")
    where.add_argument(
        "-e", "--proxy-endpoint", metavar="HOST[:PORT]", help="data-plane endpoint (port 443)"
    )
    mode = parser.add_argument_group("mode (one of)")
    mode.add_argument(
        "-s",
        "--source-listen-port",
        metavar="MAP",
        help="source: 5555 or SSH1=5555,SSH2=6666 (0 picks a free port)",
    )
    mode.add_argument(
        "-d",
        "--destination-app",
        metavar="MAP",
        help="destination: 22, host:22, SSH1=22,HTTP=10.0.0.1:80 or a Unix socket path",
    )
    mode.add_argument("-m", "--mode", choices=["src", "source", "dst", "destination"])
    parser.add_argument(
        "-t", "--access-token", help="access token (visible in ps: prefer the environment)"
    )
    parser.add_argument(
        "-i", "--client-token", help="client token [a-zA-Z0-9-]{32,128}: allows reconnecting"
    )
    parser.add_argument(
        "-b",
        "--local-bind-address",
        "--bind-address",
        dest="bind_address",
        default=None,
        metavar="ADDRESS",
        help="source: the address the local ports listen on (default localhost); "
        "destination: the local address connections to the services come from",
    )
    parser.add_argument("-c", "--capath", help="CA certificate file or hashed directory")
    parser.add_argument(
        "-k", "--no-ssl-host-verify", action="store_true", help="do not verify the TLS peer"
    )
    parser.add_argument(
        "-y",
        "--destination-client-type",
        choices=["V1", "V2", "V3"],
        type=str.upper,
        help="message format of a source facing an older destination",
    )
    parser.add_argument(
        "-v", "--verbose", type=int, default=4, choices=range(7), help="0 (off) to 6, default 4"
    )
    parser.add_argument("--config", help="file of 'name = value' lines (long flags)")
    parser.add_argument(
        "--config-dir", help="directory of files with SERVICE=port lines (mappings)"
    )
    parser.add_argument("-V", "--version", action="version", version=f"%(prog)s {__version__}")
    extra = parser.add_argument_group("iot-tunnel-agent extensions")
    extra.add_argument("--no-tls", action="store_true", help="plain ws:// (emulator tests only)")
    extra.add_argument("--ping-interval", type=float, default=20.0, help="seconds (default 20)")
    extra.add_argument(
        "--connect-retries", type=int, default=5, help="local connect attempts (destination)"
    )
    extra.add_argument(
        "--connect-retry-delay", type=float, default=2.5, help="seconds between local attempts"
    )
    # Hidden: the agent passes the tokens on an inherited pipe (agent/common/secretpipe.py).
    extra.add_argument("--token-fd", type=int, default=None, help=argparse.SUPPRESS)
    # Hidden: a pipe whose write end only the agent holds; end of file means the agent is gone.
    extra.add_argument("--lifeline-fd", type=int, default=None, help=argparse.SUPPRESS)
    # Hidden: the descriptor of a pipe from whoever started us (agent/protocol/report.py).
    extra.add_argument("--report-fd", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _read_text(path: str) -> str:
    # os and open, not pathlib: pathlib and what it imports cost the proxy 0.3 MB and 5 ms.
    with open(path, encoding="utf-8") as file:  # noqa: PTH123
        return file.read()


def _config_file(path: str) -> dict[str, str]:
    """
    Read ``name = value`` lines (``#`` comments), the AWS localproxy's ``--config`` format.
    """
    values: dict[str, str] = {}
    for line in _read_text(path).splitlines():
        stripped = line.split("#", 1)[0].strip()
        if stripped:
            name, sep, value = stripped.partition("=")
            if not sep:
                raise UsageError(f"{path}: expected name = value, got {stripped!r}")
            values[name.strip().replace("_", "-")] = value.strip()
    return values


def _config_dir(path: str) -> str:
    entries: list[str] = []
    for name in sorted(os.listdir(path)):  # noqa: PTH208
        file = os.path.join(path, name)  # noqa: PTH118
        if os.path.isfile(file):  # noqa: PTH113
            entries.extend(line.strip() for line in _read_text(file).splitlines() if "=" in line)
    return ",".join(entries)


def _tokens(
    args: argparse.Namespace, config: dict[str, str], env: dict[str, str]
) -> tuple[str, str | None]:
    token = args.access_token or config.get("access-token") or env.get("AWSIOT_TUNNEL_ACCESS_TOKEN")
    if args.access_token:
        log.warning("the access token was given on the command line; use the environment")
    if not token:
        raise UsageError("no access token: set AWSIOT_TUNNEL_ACCESS_TOKEN")
    if len(token) > MAX_TOKEN_LENGTH or not token.isprintable():
        raise UsageError("the access token is malformed")
    client_token = (
        args.client_token
        or config.get("client-token")
        or env.get("AWSIOT_TUNNEL_CLIENT_TOKEN")
        or env.get("AWSIOT_CLIENT_TOKEN")
    )
    if client_token and not CLIENT_TOKEN.fullmatch(client_token):
        raise UsageError("the client token must match [a-zA-Z0-9-]{32,128}")
    return token, client_token or None


def _endpoint(
    args: argparse.Namespace, config: dict[str, str], env: dict[str, str]
) -> tuple[str, int]:
    if args.region and args.proxy_endpoint:
        raise UsageError("give either -r/--region or -e/--proxy-endpoint, not both")
    region = args.region or config.get("region") or env.get("AWSIOT_TUNNEL_REGION")
    endpoint = (
        args.proxy_endpoint or config.get("proxy-endpoint") or env.get("AWSIOT_TUNNEL_ENDPOINT")
    )
    try:
        if endpoint and not args.region:
            return parse_endpoint(endpoint)
        if region:
            return endpoint_for_region(region)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    raise UsageError("no endpoint: give -r REGION or -e HOST[:PORT]")


def _maps(
    args: argparse.Namespace, config: dict[str, str]
) -> tuple[Mode, dict[str, int], dict[str, Target]]:
    source = args.source_listen_port or config.get("source-listen-port")
    destination = args.destination_app or config.get("destination-app")
    mode_flag = args.mode or config.get("mode")
    if args.config_dir and not (source or destination):
        mapped = _config_dir(args.config_dir)
        if mode_flag in {"src", "source"}:
            source = mapped
        else:
            destination = mapped
    if source and destination:
        raise UsageError("-s and -d are exclusive")
    try:
        if source or mode_flag in {"src", "source"}:
            return SOURCE, parse_source_map(source or "0"), {}
        if destination:
            return DESTINATION, {}, parse_destination_map(destination)
    except MappingError as exc:
        raise UsageError(str(exc)) from exc
    if mode_flag in {"dst", "destination"}:
        raise UsageError("a destination needs -d MAP")
    raise UsageError("give -s MAP (source) or -d MAP (destination)")


def options_from_args(args: argparse.Namespace, env: dict[str, str]) -> ProxyOptions:
    """
    Combine flags, ``--config`` and the environment (in that order of precedence).

    Raises:
        UsageError: If anything is missing, contradictory or malformed.
    """
    config = _config_file(args.config) if args.config else {}
    token, client_token = _tokens(args, config, env)
    host, port = _endpoint(args, config, env)
    mode, ports, targets = _maps(args, config)
    if len(ports or targets) > 3:
        log.warning("more than 3 services mapped; a tunnel carries at most 3")
    version_flag = args.destination_client_type or config.get("destination-client-type")
    return ProxyOptions(
        mode=mode,
        host=host,
        port=port,
        token=token,
        client_token=client_token,
        source_ports=ports,
        targets=targets,
        bind_address=(
            args.bind_address or config.get("local-bind-address") or config.get("bind-address")
        ),
        version=ProtocolVersion[version_flag] if version_flag else ProtocolVersion.V3,
        tls=not args.no_tls,
        verify=not args.no_ssl_host_verify,
        ca_path=args.capath or config.get("capath"),
        ping_interval=args.ping_interval,
        tcp_connect_retries=args.connect_retries,
        tcp_connect_delay=args.connect_retry_delay,
        report_fd=args.report_fd,
    )


def setup_logging(verbosity: int, stream: TextIO | None = None) -> logging.StreamHandler[TextIO]:
    """
    Send the proxy's log to ``stream`` (stderr by default) at the ``-v`` level; returns the handler.
    """
    handler: logging.StreamHandler[TextIO] = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger("agent.proxy")
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[verbosity])
    root.propagate = False
    return handler


def _watch_lifeline(loop: asyncio.AbstractEventLoop, fd: int, stop: asyncio.Event) -> None:
    def readable() -> None:
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            log.info("the agent is gone: stopping")
            stop.set()

    os.set_blocking(fd, False)
    loop.add_reader(fd, readable)


async def _run(options: ProxyOptions, lifeline: int | None = None) -> int:
    from agent.proxy.runner import run_proxy  # noqa: PLC0415 - keeps --help fast

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if lifeline is not None:
        _watch_lifeline(loop, lifeline, stop)
    return await run_proxy(options, stop)


class _DeferredModule(types.ModuleType):
    """
    Stands in for a module until one of its attributes is used, then loads the real one.
    """

    def __getattr__(self, attribute: str) -> object:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, real)
        return getattr(real, attribute)


def defer_unused_imports() -> None:
    """
    Defer ``importlib.metadata``: websockets imports it only to read its own version.

    It drags in the ``email`` and ``csv`` packages: about 3 MB of a proxy's 30 MB memory budget
    and 20 ms of its start. A stand-in module loads the real one on first attribute access, so
    anything that does use it still works. (``importlib.util.LazyLoader`` cannot do this: the
    import system reads ``__spec__`` on every import, which triggers the load.)
    """
    if "importlib.metadata" not in sys.modules:
        stand_in = _DeferredModule("importlib.metadata")
        sys.modules["importlib.metadata"] = stand_in
        importlib.metadata = stand_in


def environment_with_tokens(args: argparse.Namespace) -> dict[str, str]:
    """
    Our environment, plus the tokens of ``--token-fd`` when given (read first, fd closed).

    The tokens only go into the returned dictionary, never into the process' environment.

    Raises:
        UsageError: The descriptor cannot be read or holds no valid document.
    """
    env = dict(os.environ)
    if args.token_fd is not None:
        try:
            token, client_token = read_tokens(args.token_fd)
        except TokenPipeError as exc:
            raise UsageError(str(exc)) from None
        env["AWSIOT_TUNNEL_ACCESS_TOKEN"] = token
        if client_token:
            env["AWSIOT_TUNNEL_CLIENT_TOKEN"] = client_token
    return env


def main(argv: list[str] | None = None, *, tokens: tuple[str, str | None] | None = None) -> int:
    """
    Run the local proxy; returns the exit status.

    Args:
        argv: The arguments; ``sys.argv[1:]`` by default.
        tokens: Access and client token handed over in memory (a launcher's fork).
    """
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        env = environment_with_tokens(args)
        if tokens is not None:
            env["AWSIOT_TUNNEL_ACCESS_TOKEN"] = tokens[0]
            if tokens[1]:
                env["AWSIOT_TUNNEL_CLIENT_TOKEN"] = tokens[1]
        options = options_from_args(args, env)
    except (UsageError, OSError) as exc:
        print(f"tunnel-localproxy: {exc}", file=sys.stderr)  # noqa: T201 - CLI error output
        return EXIT_USAGE
    # Children we might start must not inherit the token.
    for name in ("AWSIOT_TUNNEL_ACCESS_TOKEN", "AWSIOT_TUNNEL_CLIENT_TOKEN", "AWSIOT_CLIENT_TOKEN"):
        os.environ.pop(name, None)
    return run_options(options, args.lifeline_fd)


def run_options(options: ProxyOptions, lifeline: int | None = None) -> int:
    """
    Run the proxy for ``options`` already parsed (by ``main``, or by a launcher before its fork).
    """
    defer_unused_imports()
    return run(_run(options, lifeline))


if __name__ == "__main__":
    sys.exit(main())
