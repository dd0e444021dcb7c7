"""Operational logging: text or JSON lines, to stderr or a file, through twisted.logger only.

``pop3shield run`` calls :func:`begin_logging`; under twistd, twistd owns the observers and the
plugin only installs the bridge (:func:`install_stdlib_bridge`). Security events have their own
file (``pop3shield.events``) and also pass through here.

Every value in a log line may come from a client or the disk (user names, message file names,
exception texts), so the observers built here escape C0 and C1 controls, DEL, Unicode line and
paragraph separators, bidi overrides and lone surrogates in everything they write (``\\x1b``,
``\\n``, ``\\u2028``): whatever the source, one record is one line and no terminal escape reaches
the file. Modules that use the standard :mod:`logging` module (``maildir.py``, ``mcp/deep.py``)
reach the same observers through :class:`TwistedLoggerHandler`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
from collections.abc import Mapping
from typing import IO, Any, Callable

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    formatEvent,
    formatTime,
    globalLogBeginner,
)
from twisted.python.failure import Failure
from zope.interface import implementer

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error, "critical": LogLevel.critical}

#: code points written as escapes: C0, DEL, C1, line/paragraph separators, bidi embeddings,
#: overrides and isolates, and lone surrogates (undecodable bytes of file names)
_UNSAFE = [*range(0x00, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F),
           *range(0x2066, 0x206A), *range(0xD800, 0xE000)]
_ESCAPES = {cp: chr(cp).encode("unicode_escape", "backslashreplace").decode("ascii") for cp in _UNSAFE}
_ESCAPES.update({cp: f"\\u{cp:04x}" for cp in range(0xD800, 0xE000)})


def escape(text: str) -> str:
    """``text`` with every unsafe character as a Python-style escape (``\\x1b``, ``\\n``)."""
    return text.translate(_ESCAPES)


def open_log(path: str) -> IO[str]:
    """The log stream: stderr for ``-``, else a file opened for append (created 0640)."""
    if path == "-":
        return sys.stderr
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8", errors="backslashreplace")


# --------------------------------------------------------------------------- formatting


def _traceback(event: Mapping[str, Any]) -> str | None:
    failure = event.get("log_failure")
    if failure is None and event.get("log_namespace") == "log_legacy" and "log_text" not in event:
        failure = event.get("failure")  # twisted.python.log.err() with a format of its own
    if failure is None or not hasattr(failure, "getTraceback"):
        return None
    try:
        return str(failure.getTraceback())
    except Exception:  # a broken failure must not cost the record
        return "(traceback unavailable)"


def format_text(event: Mapping[str, Any]) -> str | None:
    """``TIME [namespace#level] message`` (Twisted's classic layout), escaped, on one line."""
    text = formatEvent(event)
    traceback = _traceback(event)
    if traceback is not None:
        text = f"{text} | {traceback}" if text else traceback
    if not text:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
    return escape(f"{formatTime(event.get('log_time'))} [{system}] {text.rstrip()}") + "\n"


#: keys a JSON record sets itself; an event field with one of these names is written as ``field_<name>``
JSON_KEYS = ("time", "level", "namespace", "session", "message", "failure")
#: the security event record is already in the event file, and its fields are passed on their own
_SKIPPED_FIELDS = frozenset({"event_record"})
#: what twisted.python.log (legacy) events carry besides their text
_LEGACY_FIELDS = frozenset({"message", "format", "time", "system", "isError", "logLevel", "failure", "why"})


def _jsonable(value: Any, depth: int = 0) -> Any:
    """A JSON value for a field: strings escaped, containers walked, everything else ``str()``."""
    if value is None or isinstance(value, bool) or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return escape(value)
    if depth < 8 and isinstance(value, Mapping):
        return {escape(str(k)): _jsonable(v, depth + 1) for k, v in value.items()}
    if depth < 8 and isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v, depth + 1) for v in value]
    try:
        return escape(str(value))
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _rfc3339(when: float | None) -> str:
    from pop3shield.events import rfc3339

    return rfc3339(when if when is not None else 0.0)


def format_json(event: Mapping[str, Any]) -> str:
    """One JSON Lines record: time, level, namespace, session, message, fields, failure."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _rfc3339(event.get("log_time")),
        "level": level.name if level is not None else None,
        "namespace": _jsonable(event.get("log_namespace")),
    }
    if event.get("session") is not None:
        record["session"] = _jsonable(event["session"])
    record["message"] = escape(formatEvent(event))
    skipped = _SKIPPED_FIELDS | _LEGACY_FIELDS if event.get("log_namespace") == "log_legacy" else _SKIPPED_FIELDS
    for key, value in event.items():
        if key.startswith("log_") or key in skipped or key == "session":
            continue
        name = f"field_{key}" if key in JSON_KEYS else escape(str(key))
        record[name] = _jsonable(value)
    traceback = _traceback(event)
    if traceback is not None:
        record["failure"] = escape(traceback)
    return json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"


# --------------------------------------------------------------------------- observers


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as one formatted line; events come from the reactor and from threads."""

    def __init__(self, stream: IO[str], formatter: Callable[[Mapping[str, Any]], str | None]) -> None:
        self.stream = stream
        self.formatter = formatter
        self._lock = threading.Lock()

    def __call__(self, event: Mapping[str, Any]) -> None:
        line = self.formatter(event)
        if not line:
            return
        with self._lock:
            self.stream.write(line)
            self.stream.flush()


def make_observer(path: str, fmt: str, level: str, stream: IO[str] | None = None) -> ILogObserver:
    """The observer for ``logging.path/format/level``: the level filter runs before formatting."""
    line = LineObserver(stream if stream is not None else open_log(path),
                        format_json if fmt == "json" else format_text)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    return FilteringLogObserver(line, [predicate])


# --------------------------------------------------------------------------- under twistd


@implementer(ILogObserver)
class FieldEscaper:
    """Escapes, in place, the string fields of every event it sees, and its format (not the
    other ``log_*`` internals).

    Under twistd, twistd's own observers (``--logfile``, ``--logger``) write the log, not the
    ones above. Registered on the log publisher *before* twistd begins logging, this observer
    runs first for every event, and the observers after it see the same event dictionary: so a
    message file name with ESC or a newline in it cannot forge lines in twistd's log either.
    """

    def __call__(self, event: dict[str, Any]) -> None:
        for key, value in event.items():
            if key.startswith("log_") and key != "log_format":
                continue  # log_format: the stdlib bridge puts a record's message there
            if isinstance(value, str):
                event[key] = escape(value)
            elif isinstance(value, (tuple, list)) and any(isinstance(item, str) for item in value):
                event[key] = type(value)(escape(item) if isinstance(item, str) else item for item in value)


def install_field_escaper(publisher: Any = None) -> FieldEscaper:
    """Put a :class:`FieldEscaper` first in line on ``publisher`` (twisted.logger's global one)."""
    from twisted.logger import globalLogPublisher

    publisher = globalLogPublisher if publisher is None else publisher
    for observer in [o for o in getattr(publisher, "_observers", ()) if isinstance(o, FieldEscaper)]:
        publisher.removeObserver(observer)
    escaper = FieldEscaper()
    publisher.addObserver(escaper)
    return escaper


# --------------------------------------------------------------------------- stdlib bridge

_STDLIB_LEVELS = ((logging.CRITICAL, LogLevel.critical), (logging.ERROR, LogLevel.error),
                  (logging.WARNING, LogLevel.warn), (logging.INFO, LogLevel.info))
_TO_STDLIB = {LogLevel.debug: logging.DEBUG, LogLevel.info: logging.INFO, LogLevel.warn: logging.WARNING,
              LogLevel.error: logging.ERROR, LogLevel.critical: logging.CRITICAL}


def twisted_level(levelno: int) -> LogLevel:
    for threshold, level in _STDLIB_LEVELS:
        if levelno >= threshold:
            return level
    return LogLevel.debug


class TwistedLoggerHandler(logging.Handler):
    """Hands stdlib ``logging`` records to twisted.logger: same level, the logger name as the
    namespace, the %-arguments as the ``args`` field, ``exc_info`` as the failure."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            fields: dict[str, Any] = {"args": record.args if isinstance(record.args, Mapping)
                                      else tuple(record.args or ())}
            if record.exc_info and record.exc_info[1] is not None:
                _, value, tb = record.exc_info
                fields["log_failure"] = Failure(value, type(value), tb)
            Logger(namespace=record.name).emit(twisted_level(record.levelno),
                                               message.replace("{", "{{").replace("}", "}}"), **fields)
        except Exception:
            self.handleError(record)


def install_stdlib_bridge(level: str = "info") -> TwistedLoggerHandler:
    """Route the root stdlib logger (and so ``pop3shield.*``) into twisted.logger, once."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, TwistedLoggerHandler)]:
        root.removeHandler(handler)
    handler = TwistedLoggerHandler()
    root.addHandler(handler)
    root.setLevel(_TO_STDLIB[LEVELS[level]])
    return handler


def begin_logging(path: str, fmt: str, level: str) -> None:
    """Send everything logged (twisted.logger and stdlib logging) to the configured place."""
    install_stdlib_bridge(level)
    globalLogBeginner.beginLoggingTo([make_observer(path, fmt, level)], redirectStandardIO=False)
