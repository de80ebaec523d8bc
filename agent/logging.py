"""
structlog setup, configured once by the CLI, and the redaction processor.

Output goes to stdout: JSON lines (with ``dict_tracebacks``) when stdout is not
a terminal, so journald stores one structured record per event; the
``ConsoleRenderer`` on a terminal. Routing and rotation are journald's job.
Records from the standard library's ``logging`` (asyncio, SDKs) go
through the same processors.

Redaction runs after exceptions are rendered and before the renderer: it masks
any key matching ``token|secret|password|authorization|cookie`` and any
occurrence of a *registered* secret (each tunnel's access and client tokens)
inside any value, so even a proxy's stderr line echoing a token is masked.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import TYPE_CHECKING, Any, Literal, TextIO

import structlog


if TYPE_CHECKING:
    from structlog.typing import EventDict, Processor, WrappedLogger


__all__ = [
    "MASK",
    "SECRET_KEY",
    "SecretRegistry",
    "configure_logging",
    "redact",
    "register_secret",
    "secrets",
    "unregister_secret",
]

MASK = "**********"
SECRET_KEY = re.compile(r"token|secret|password|authorization|cookie", re.IGNORECASE)
# Registered values shorter than this are not secrets worth a substring scan (and
# would mask ordinary words).
_MIN_SECRET_LENGTH = 8
_HANDLER_NAME = "tunnel-agent"


class SecretRegistry:
    """
    The set of secret values currently alive in the process, masked in every log line.

    Thread-safe: SDK threads may log while the event loop registers a tunnel.
    Registrations are counted, so a value registered twice survives one unregister.
    """

    def __init__(self) -> None:
        """
        Start empty.
        """
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._snapshot: tuple[str, ...] = ()

    def register(self, value: str) -> None:
        """
        Mask ``value`` wherever it appears from now on.

        Args:
            value: The secret; values shorter than 8 characters are ignored.
        """
        if len(value) < _MIN_SECRET_LENGTH:
            return
        with self._lock:
            self._counts[value] = self._counts.get(value, 0) + 1
            self._rebuild()

    def unregister(self, value: str) -> None:
        """
        Stop masking ``value`` once every registration of it is withdrawn.

        Args:
            value: A previously registered secret.
        """
        with self._lock:
            count = self._counts.get(value, 0) - 1
            if count > 0:
                self._counts[value] = count
            else:
                self._counts.pop(value, None)
            self._rebuild()

    def _rebuild(self) -> None:
        # Longest first, so a secret containing another is masked whole.
        self._snapshot = tuple(sorted(self._counts, key=len, reverse=True))

    @property
    def values(self) -> tuple[str, ...]:
        """
        The registered secrets (an immutable snapshot).
        """
        return self._snapshot

    def mask(self, text: str) -> str:
        """
        Replace each registered secret inside ``text`` with :data:`MASK`.

        Args:
            text: Any string.

        Returns:
            ``text`` with every registered secret masked.
        """
        for value in self._snapshot:
            if value in text:
                text = text.replace(value, MASK)
        return text


# Module-level because structlog's configuration is process-global too.
secrets = SecretRegistry()


def register_secret(value: str) -> None:
    """
    Register ``value`` with the process-wide :data:`secrets` registry.

    Args:
        value: A secret that must never reach a log line.
    """
    secrets.register(value)


def unregister_secret(value: str) -> None:
    """
    Withdraw ``value`` from the process-wide :data:`secrets` registry.

    Args:
        value: A secret registered earlier.
    """
    secrets.unregister(value)


def _scrub(value: Any, registered: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        for secret in registered:
            if secret in value:
                value = value.replace(secret, MASK)
        return value
    if isinstance(value, dict):
        return {
            key: MASK
            if isinstance(key, str) and SECRET_KEY.search(key)
            else _scrub(item, registered)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_scrub(item, registered) for item in value)
    if isinstance(value, bytes | bytearray):
        text = bytes(value).decode("utf-8", "replace")
        return _scrub(text, registered) if any(s in text for s in registered) else value
    return value


def redact(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> EventDict:
    """
    Mask secret-looking keys and registered secret values (a structlog processor).

    Args:
        _logger: Unused.
        _method_name: Unused.
        event_dict: The event being logged.

    Returns:
        The event with secrets replaced by :data:`MASK`.
    """
    registered = secrets.values
    for key, value in event_dict.items():
        if SECRET_KEY.search(key):
            event_dict[key] = MASK
        elif registered or isinstance(value, dict | list | tuple):
            event_dict[key] = _scrub(value, registered)
    return event_dict


def _shared_processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def configure_logging(
    *,
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
) -> None:
    """
    Configure structlog and the standard library's logging; call once at startup.

    Args:
        level: Minimum level: ``debug``, ``info``, ``warning`` or ``error``.
        fmt: ``json``, ``console``, or ``auto`` (JSON unless ``stream`` is a TTY).
        stream: Where lines go; ``sys.stdout`` by default.
    """
    out = sys.stdout if stream is None else stream
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    numeric = logging.getLevelNamesMapping()[level.upper()]
    # Exceptions become text or dicts *before* redaction so tracebacks are scrubbed too.
    exceptions: Processor = (
        structlog.processors.dict_tracebacks if use_json else structlog.processors.format_exc_info
    )
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    structlog.configure(
        processors=[*_shared_processors(), exceptions, redact, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            exceptions,
            redact,
            renderer,
        ],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    # Named, so a second configure_logging() (tests, reload) replaces it, not stacks it.
    handler.set_name(_HANDLER_NAME)
    for old in root.handlers[:]:
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    # asyncio's debug mode reports every subprocess and pipe at INFO: noise, not events.
    logging.getLogger("asyncio").setLevel(max(numeric, logging.WARNING))
