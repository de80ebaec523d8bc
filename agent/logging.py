"""
structlog setup, configured once by the CLI, and the redaction processor.

Three sinks, chosen at start:

* under systemd (``$JOURNAL_STREAM`` names our stdout), the journal's native
  protocol: one datagram per event, with a ``PRIORITY`` from the event's level
  and every key as a journal field (``journalctl -p warning``,
  ``journalctl TUNNEL_KEY=...``); ``MESSAGE`` stays the JSON line;
* elsewhere, when stdout is not a terminal, JSON lines (with ``dict_tracebacks``);
* on a terminal, the ``ConsoleRenderer``.

Routing and rotation are journald's job. Records from the standard library's
``logging`` (asyncio, SDKs) go through the same processors.

Redaction runs after exceptions are rendered and before the renderer: it masks
any key matching ``token|secret|password|authorization|cookie`` and any
occurrence of a *registered* secret (each tunnel's access and client tokens)
inside any value, so even a proxy's stderr line echoing a token is masked.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import struct
import sys
import threading
from typing import TYPE_CHECKING, Any, Literal, TextIO

import structlog


if TYPE_CHECKING:
    from structlog.typing import EventDict, Processor, WrappedLogger


__all__ = [
    "JOURNAL_SOCKET",
    "MASK",
    "SECRET_KEY",
    "JournalLogger",
    "SecretRegistry",
    "configure_logging",
    "journal_fields",
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
JOURNAL_SOCKET = "/run/systemd/journal/socket"
# syslog priorities of structlog's levels (sd-daemon(3)).
_PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "warn": 4, "info": 6}
_FIELD = re.compile(r"[^A-Z0-9_]")


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


def journal_fields(event_dict: EventDict, message: str) -> bytes:
    """
    Encode one event as a journal native-protocol datagram.

    Every key becomes an upper-case field (``tunnel_key`` -> ``TUNNEL_KEY``);
    values that are not strings are JSON. A value holding a newline uses the
    protocol's length-prefixed form, so no value can inject a field.

    Args:
        event_dict: The event, already redacted.
        message: The rendered line, stored as ``MESSAGE``.

    Returns:
        The datagram.
    """
    fields: dict[str, str] = {
        "MESSAGE": message,
        "PRIORITY": str(_PRIORITY.get(str(event_dict.get("level", "info")), 7)),
        "SYSLOG_IDENTIFIER": "tunnel-agent",
    }
    for key, value in event_dict.items():
        name = _FIELD.sub("_", str(key).upper()).lstrip("_")[:64]
        if name and name not in fields:
            fields[name] = value if isinstance(value, str) else json.dumps(value, default=str)
    out = bytearray()
    for name, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalLogger:
    """
    A structlog logger that sends each datagram to journald's native socket.

    A datagram journald refuses (too large for one, journald gone) is written to
    the fallback stream instead, so no event is lost.

    Args:
        path: The journal socket.
        fallback: Where an event goes when the socket refuses it.
    """

    def __init__(self, path: str, fallback: TextIO) -> None:
        """
        Open an unconnected datagram socket.
        """
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._path = path
        self._fallback = fallback
        self._lock = threading.Lock()

    def msg(self, rendered: str) -> None:
        """
        Send one event (the datagram's bytes as a latin-1 string).
        """
        datagram = rendered.encode("latin-1")
        try:
            self._sock.sendto(datagram, self._path)
        except OSError:
            with self._lock:
                line = datagram.partition(b"\n")[0].removeprefix(b"MESSAGE=")
                self._fallback.write(line.decode("utf-8", "replace") + "\n")
                self._fallback.flush()

    debug = info = warning = warn = error = critical = exception = fatal = log = msg

    def close(self) -> None:
        """
        Close the socket; later events go to the fallback stream.
        """
        self._sock.close()


class _JournalHandler(logging.Handler):
    # Records of the standard library's logging, formatted into datagrams by structlog.
    def __init__(self, journal: JournalLogger) -> None:
        super().__init__()
        self._journal = journal

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._journal.msg(self.format(record))
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._journal.close()
        super().close()


def _journal_renderer(renderer: Processor) -> Processor:
    # A str carrying the datagram's bytes one to one (latin-1): structlog's stdlib
    # formatter only passes strings on.
    def render(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        message = renderer(logger, method_name, dict(event_dict))
        return journal_fields(event_dict, str(message)).decode("latin-1")

    return render


def _journal_stream(out: TextIO) -> bool:
    # systemd sets JOURNAL_STREAM=dev:ino of the stream it connected; a child that
    # redirected its output must not write to the journal behind its caller's back.
    value = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(out.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{device}:{inode}"


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
    journal_socket: str | None = None,
) -> None:
    """
    Configure structlog and the standard library's logging; call once at startup.

    Args:
        level: Minimum level: ``debug``, ``info``, ``warning`` or ``error``.
        fmt: ``json``, ``console``, or ``auto`` (JSON unless ``stream`` is a TTY).
        stream: Where lines go; ``sys.stdout`` by default.
        journal_socket: Send events to this journal socket; by default the
            journal's own when ``$JOURNAL_STREAM`` names ``stream`` and ``fmt`` is
            ``auto``, else none.
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
    if journal_socket is None and fmt == "auto" and _journal_stream(out):
        journal_socket = JOURNAL_SOCKET
    if journal_socket is not None:
        structlog_renderer = _journal_renderer(structlog.processors.JSONRenderer())
        journal = JournalLogger(journal_socket, out)
        factory: Any = lambda *_args: journal  # noqa: E731 - one shared socket
        exceptions = structlog.processors.dict_tracebacks
    else:
        structlog_renderer = renderer
        factory = structlog.WriteLoggerFactory(file=out)
    structlog.configure(
        processors=[*_shared_processors(), exceptions, redact, structlog_renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            exceptions,
            redact,
            structlog_renderer,
        ],
    )
    handler: logging.Handler = (
        logging.StreamHandler(out) if journal_socket is None else _JournalHandler(journal)
    )
    handler.setFormatter(formatter)
    root = logging.getLogger()
    # Named, so a second configure_logging() (tests, reload) replaces it, not stacks it.
    handler.set_name(_HANDLER_NAME)
    for old in root.handlers[:]:
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    # asyncio's debug mode reports every subprocess and pipe at INFO: noise, not events.
    logging.getLogger("asyncio").setLevel(max(numeric, logging.WARNING))
