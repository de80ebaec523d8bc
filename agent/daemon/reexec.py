"""
Reload by re-executing the agent in place: same pid, new code and configuration.

``systemctl reload`` (SIGHUP) must pick up an upgraded package and a changed
configuration without dropping a session: the proxies carrying them must survive, and
they can only be supervised by their parent. So the agent ``execv``s itself with its
own command line; the pid does not change, the proxies stay its children, and the next
image adopts them from the hand-off (:mod:`agent.daemon.handoff`).

Nothing irreversible happens before the new code has proven it can start: a preflight
runs it (``check-config`` with the same flags, after importing the daemon, the
notification sources and the proxy), and only if
that exits 0 are notifications stopped and the proxies detached. If ``execv`` itself
fails, the caller adopts its proxies back and carries on with the old code.

SIGHUP, SIGTERM and SIGINT are blocked across the exec (the mask survives it): until the
new image has installed its handlers, a second reload or a stop waits instead of killing
the process with the default action. :func:`unblock_signals` releases them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from agent.daemon.handoff import HANDOFF_ENV


if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path


__all__ = [
    "HELD_SIGNALS",
    "ReexecPlan",
    "execute",
    "hold_signals",
    "preflight",
    "stop_pending",
    "unblock_signals",
]

log = structlog.get_logger("agent.daemon.reexec")

#: Held (blocked) from just before the exec until the new image handles them.
HELD_SIGNALS = frozenset({signal.SIGHUP, signal.SIGTERM, signal.SIGINT})
# The preflight imports what the daemon and a new proxy import (both notification
# sources: the configuration picks one), then validates the configuration exactly as
# `tunnel-agent check-config` would with the daemon's flags.
_PREFLIGHT_CODE = (
    "import sys\n"
    "import agent.daemon.lifecycle, agent.notify.mqtt, agent.notify.greengrass, agent.proxy.cli\n"
    "from agent.cli import main\n"
    "raise SystemExit(main(sys.argv[1:]))\n"
)
# Variables the preflight must not see: it is not the service's main process.
_PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", HANDOFF_ENV)
_OUTPUT_TAIL = 2000


@dataclass(frozen=True, slots=True)
class ReexecPlan:
    """
    How this process re-executes itself.

    Attributes:
        executable: The program to exec (:data:`sys.executable`).
        argv: Its argument vector, program name first (:data:`sys.orig_argv`).
        preflight: A command that must exit 0 before the exec.
        runtime_dir: Where the anonymous hand-off file is created.
        preflight_timeout: Seconds the preflight may take.
    """

    executable: str
    argv: tuple[str, ...]
    preflight: tuple[str, ...]
    runtime_dir: Path
    preflight_timeout: float = 60.0

    @classmethod
    def for_cli(cls, run_args: Sequence[str], *, runtime_dir: Path) -> ReexecPlan:
        """
        The plan of ``tunnel-agent run RUN_ARGS``: this very command line again.

        Args:
            run_args: The arguments after ``run``.
            runtime_dir: The runtime directory.
        """
        return cls(
            executable=sys.executable,
            argv=tuple(sys.orig_argv),
            preflight=(sys.executable, "-c", _PREFLIGHT_CODE, "check-config", *run_args),
            runtime_dir=runtime_dir,
        )


async def preflight(plan: ReexecPlan, environ: Mapping[str, str] | None = None) -> str | None:
    """
    Run the new code's preflight.

    Args:
        plan: The re-exec plan.
        environ: Base environment; :data:`os.environ` by default.

    Returns:
        ``None`` if it exited 0, else why not (with the end of its output).
    """
    base = os.environ if environ is None else environ
    env = {k: v for k, v in base.items() if k not in _PRIVATE_ENV}
    try:
        process = await asyncio.create_subprocess_exec(
            *plan.preflight,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        return f"cannot run {plan.preflight[0]}: {exc.strerror}"
    try:
        async with asyncio.timeout(plan.preflight_timeout):
            output, _ = await process.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return f"no answer within {plan.preflight_timeout:g} s"
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    if process.returncode == 0:
        return None
    tail = output.decode("utf-8", "replace").strip()[-_OUTPUT_TAIL:]
    return f"exit status {process.returncode}: {tail}"


def execute(plan: ReexecPlan, handoff_fd: int) -> None:
    """
    Replace this program image with a fresh one; returns only if ``execv`` failed.

    Call :func:`hold_signals` first: the mask survives the exec.

    Args:
        plan: The re-exec plan.
        handoff_fd: The inheritable hand-off descriptor; its number goes into the environment.

    Raises:
        OSError: ``execv`` failed; the environment is restored (signals are still held).
    """
    os.environ[HANDOFF_ENV] = str(handoff_fd)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        os.execv(plan.executable, plan.argv)  # noqa: S606 - our own command line
    except OSError:
        os.environ.pop(HANDOFF_ENV, None)
        raise


def hold_signals() -> None:
    """
    Block SIGHUP, SIGTERM and SIGINT in this thread: they wait for the next image.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)


def stop_pending() -> bool:
    """
    Whether a SIGTERM or SIGINT is waiting behind the mask.
    """
    return bool(signal.sigpending() & {signal.SIGTERM, signal.SIGINT})


def unblock_signals() -> None:
    """
    Deliver the signals held across a re-exec (a no-op after a plain start).
    """
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
