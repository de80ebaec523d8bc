"""
``python -m agent.proxy.launcher``: forks ready-made destination proxies for the agent.

Starting a Python proxy costs an interpreter, imports (asyncio, uvloop, ssl, websockets, the
proxy's modules) and a TLS context: about 130 ms and 15 MB of private memory per tunnel. The
launcher pays that once: it imports everything, rehearses one session on loopback
(``warmup.py``), freezes the garbage collector (so collections in the children do not write to
the shared objects' pages) and then forks one proxy per
request from the agent (``agent/common/launchwire.py``). Each child is a complete
``tunnel-localproxy`` with its own pid and process group, supervised by the agent through a
pidfd; its exit status comes back over the channel.

The children must outlive the launcher (a launcher that dies or is restarted leaves the
tunnels running), so their death signal does not come from it: each watches the agent's
lifeline pipe (``--lifeline-fd``) and stops when it reads end of file, which happens when
the agent is gone, even after ``kill -9``. The launcher itself gets ``PR_SET_PDEATHSIG`` from
the agent, watches the lifeline too, and exits when the agent closes the channel (a reload
re-executes the agent, which closes it). Single-threaded and without an event loop: the
children start from a clean state.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import io
import os
import selectors
import signal
import socket
import sys
import traceback
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, TextIO

from agent.common import launchwire
from agent.proxy import cli


if TYPE_CHECKING:
    import logging
    from types import FrameType

    from agent.proxy.options import ProxyOptions


__all__ = ["main"]

# Received descriptors are first moved this high, so that none is overwritten while the
# child places stdout, stderr and the extra descriptors at their numbers.
_HIGH_FD = 1000
_CHANNEL, _LIFELINE = "channel", "lifeline"
# Built once before the first fork and reused: building it per request writes pages that the
# proxies forked earlier still share, which then become theirs (0.3 MB each).
_PARSER: list[argparse.ArgumentParser] = []
# The proxy's log at INFO during the rehearsal, as the agent runs proxies.
_REHEARSAL_VERBOSITY = 4


class _Stop(Exception):
    pass


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


def _preload() -> None:
    """
    Import what every proxy imports and rehearse a session, before the first fork.

    A module a child imports, or a cache it fills, costs it private memory; so does first-use
    work the rehearsal does here once (agent/proxy/warmup.py).
    """
    cli.defer_unused_imports()
    import agent.proxy.report  # noqa: PLC0415 - preloaded for the children
    import agent.proxy.runner  # noqa: F401, PLC0415 - preloaded for the children
    from agent.proxy import warmup  # noqa: PLC0415 - the launcher's only

    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401, PLC0415 - optional

    # ssl encodes the server name with the idna codec (stringprep, unicodedata): look it up once.
    "localhost".encode("idna")
    _PARSER.append(cli.build_parser())
    try:
        rehearsed = warmup.rehearse(lambda stream: cli.setup_logging(_REHEARSAL_VERBOSITY, stream))
    except Exception as exc:  # best effort: a failure costs memory, never a tunnel
        rehearsed = False
        sys.stderr.write(f"tunnel-proxy-launcher: rehearsal failed: {exc!r}\n")
    if not rehearsed:
        sys.stderr.write("tunnel-proxy-launcher: rehearsal incomplete, proxies start cold\n")


class _Prepared(NamedTuple):
    options: ProxyOptions
    log_handler: logging.StreamHandler[TextIO]
    early_log: io.StringIO


def _prepare(argv: list[str], tokens: tuple[str, str | None]) -> _Prepared | None:
    """
    Do in the launcher what every child would do first: parse, set up logging, build TLS.

    The child starts from the result: argparse, the options and the TLS context are shared,
    copy-on-write, instead of being built again in each child's private memory. What the
    proxy logs meanwhile waits in ``early_log`` for the child's stderr.

    Returns:
        None when the request is not as the agent sends it (a bad command line, a token
        descriptor): the child then runs ``cli.main`` and reports on its own stderr.
    """
    from agent.proxy.runner import ssl_context_for  # noqa: PLC0415 - preloaded

    env = dict(os.environ)
    env["AWSIOT_TUNNEL_ACCESS_TOKEN"] = tokens[0]
    if tokens[1]:
        env["AWSIOT_TUNNEL_CLIENT_TOKEN"] = tokens[1]
    early_log = io.StringIO()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = _PARSER[0].parse_args(argv)
        if args.token_fd is not None:
            return None
        handler = cli.setup_logging(args.verbose, early_log)
        options = cli.options_from_args(args, env)
        if options.tls:
            ssl_context_for(options)
    except (Exception, SystemExit):  # the child reports it
        return None
    return _Prepared(options, handler, early_log)


class _Launcher:
    def __init__(self, channel: socket.socket, lifeline: int) -> None:
        self.channel = channel
        self.lifeline = lifeline
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, int] = {}  # pidfd -> pid

    def serve(self) -> int:
        self.selector.register(self.channel, selectors.EVENT_READ, _CHANNEL)
        self.selector.register(self.lifeline, selectors.EVENT_READ, _LIFELINE)
        try:
            while True:
                for key, _ in self.selector.select():
                    if key.data == _CHANNEL:
                        if not self._request():
                            return 0  # the agent closed the channel: it re-executed
                    elif key.data == _LIFELINE:
                        if not os.read(self.lifeline, 64):
                            self._stop_children()  # the agent is gone
                            return 0
                    else:
                        self._reap(key.fd)
        except _Stop:
            return 0

    def _stop_children(self) -> None:
        for pid in self.children.values():
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGTERM)

    def _reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return
        with contextlib.suppress(OSError):
            launchwire.send(
                self.channel,
                {"op": "exited", "pid": pid, "status": os.waitstatus_to_exitcode(status)},
            )

    def _request(self) -> bool:
        try:
            received = launchwire.receive(self.channel)
        except launchwire.WireError:
            return True
        except OSError:
            return False
        if received is None:
            return False
        message, fds = received
        ident = message.get("id")
        try:
            pid, pidfd = self._start(message, fds)
        except (ValueError, TypeError, OSError) as exc:
            launchwire.send(self.channel, {"op": "failed", "id": ident, "error": str(exc)})
            return True
        finally:
            for fd in fds:
                os.close(fd)
        launchwire.send(self.channel, {"op": "started", "id": ident, "pid": pid}, [pidfd])
        return True

    def _start(self, message: dict[str, Any], fds: list[int]) -> tuple[int, int]:
        argv, tokens, targets = message.get("argv"), message.get("tokens"), message.get("fds")
        if (
            message.get("op") != "start"
            or not isinstance(argv, list)
            or not isinstance(targets, list)
        ):
            raise ValueError("not a start request")
        if not (isinstance(tokens, list) and len(tokens) == 2 and isinstance(tokens[0], str)):
            raise ValueError("bad tokens")
        if len(fds) != 3 + len(targets) or not all(
            isinstance(t, int) and 2 < t < _HIGH_FD for t in targets
        ):
            raise ValueError("bad descriptors")
        args = [str(a) for a in argv]
        client = tokens[1] if isinstance(tokens[1], str) else None
        prepared = _prepare(args, (tokens[0], client))
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        gc.freeze()  # what the request allocated, too: collections in the child skip it
        pid = os.fork()
        if pid == 0:
            self._child(args, (tokens[0], client), prepared, fds, targets)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # also done by the child: whichever runs first
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = pid
        self.selector.register(pidfd, selectors.EVENT_READ, pid)
        return pid, pidfd

    def _child(
        self,
        argv: list[str],
        tokens: tuple[str, str | None],
        prepared: _Prepared | None,
        fds: list[int],
        targets: list[int],
    ) -> NoReturn:
        code = 1
        try:
            os.setpgid(0, 0)
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, signal.SIG_DFL)
            self.selector.close()
            for pidfd in self.children:
                os.close(pidfd)
            os.close(self.channel.detach())
            os.close(self.lifeline)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, _HIGH_FD) for fd in fds]
            for fd in fds:
                os.close(fd)
            stdout, stderr, lifeline, *extra = high
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(stdout, 1)
            os.dup2(stderr, 2)
            for fd, target in zip(extra, targets, strict=True):
                os.dup2(fd, target)
            keep = {0, 1, 2, lifeline, *targets}
            for name in os.listdir("/proc/self/fd"):  # noqa: PTH208 - no pathlib (cli.py)
                if int(name) not in keep:
                    with contextlib.suppress(OSError):
                        os.close(int(name))
            code = _run_child(argv, tokens, prepared, lifeline)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException:  # the child must end here, whatever happened
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)


def _run_child(
    argv: list[str], tokens: tuple[str, str | None], prepared: _Prepared | None, lifeline: int
) -> int:
    if prepared is None:
        return cli.main([*argv, "--lifeline-fd", str(lifeline)], tokens=tokens)
    sys.stderr.write(prepared.early_log.getvalue())
    prepared.log_handler.setStream(sys.stderr)
    return cli.run_options(prepared.options, lifeline)


def main(argv: list[str] | None = None) -> int:
    """
    Serve the agent's requests until it closes the channel or is gone.
    """
    parser = argparse.ArgumentParser(prog="tunnel-proxy-launcher")
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument(
        "--merge-pages",
        action="store_true",
        help="offer the launcher's and its proxies' memory to the kernel's same-page merging",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the agent's
    _preload()
    if args.merge_pages:
        from agent.common.process import share_identical_pages  # noqa: PLC0415 - when asked

        if share_identical_pages() == "unavailable":
            sys.stderr.write("tunnel-proxy-launcher: no same-page merging in this kernel\n")
    channel = socket.socket(fileno=args.channel_fd)
    gc.freeze()
    return _Launcher(channel, args.lifeline_fd).serve()


if __name__ == "__main__":
    sys.exit(main())
