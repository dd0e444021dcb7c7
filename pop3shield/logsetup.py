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

import atexit
import json
import logging
import math
import os
import sys
import threading
import time
from collections import deque
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

#: False once :func:`begin_logging` set a level above debug: no observer takes debug lines
_debug_wanted = True


class QuietDebugLogger(Logger):
    """A :class:`twisted.logger.Logger` whose ``debug()`` costs one check while the server logs
    above debug. twisted.logger builds the whole event before the level filter drops it, and a
    session logs a few debug lines (connect, login, update, close): on a busy server that is
    work for nothing. Under twistd, or before :func:`begin_logging`, every line is emitted."""

    def debug(self, format: str | None = None, **kwargs: Any) -> None:
        if _debug_wanted:
            self.emit(LogLevel.debug, format, **kwargs)

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


# --------------------------------------------------------------------------- writer thread

#: lines (or records) a writer queue holds before it drops new ones
DEFAULT_QUEUE_LIMIT = 10000
#: how long close() waits for a slow disk to take what is queued
DEFAULT_FLUSH_TIMEOUT = 5.0


class QueuedWriter:
    """Writes text to a stream from one thread of its own, fed through a bounded queue.

    ``write`` never waits for the disk: it appends to the queue and returns, or, when ``limit``
    lines are already waiting, drops the line and counts it in ``dropped``. The first drop of
    a run and the end of the run (the next line admitted) are reported: ``on_notice(state,
    count)`` is called on the writing thread (``"started"``, 0) and (``"ended"``, lines dropped
    in the run), and ``notice_line(state, count)``, if given, is a line the writer thread
    writes into the stream itself at that point, so the file says where lines are missing.
    Lines are written in the order ``write`` was called. ``swap`` hands over a new stream
    (SIGHUP reopen) through the same queue: what was queued before goes to the old stream,
    everything after to the new one, and the thread closes the old one. ``close`` waits, at
    most ``timeout`` seconds, for the queue to drain; writes after it go straight to the stream.
    """

    def __init__(self, stream: IO[str], *, limit: int = DEFAULT_QUEUE_LIMIT, name: str = "pop3shield-writer",
                 notice_line: Callable[[str, int], str | None] | None = None,
                 on_notice: Callable[[str, int], None] | None = None) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.stream = stream
        self.limit = limit
        self.notice_line = notice_line
        self.on_notice = on_notice
        #: lines dropped because the queue was full, since start
        self.dropped = 0
        #: lines (and records) the thread could not write (OSError from the stream)
        self.errors = 0
        self._run_dropped = 0
        self._lines = 0  # lines in the queue (notices and swaps do not count toward the limit)
        self._items: deque[tuple[str, Any]] = deque()
        self._cond = threading.Condition()
        self._busy = False
        self._idle = False  # the thread waits for work: only then does a write wake it
        self._closing = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Lines waiting for the thread."""
        return self._lines

    def write(self, text: str) -> None:
        notice: tuple[str, int] | None = None
        with self._cond:
            if self._closed:  # the thread is gone: write it here
                direct = True
            else:
                direct = False
                if self._lines >= self.limit:
                    self.dropped += 1
                    self._run_dropped += 1
                    if self._run_dropped == 1:
                        notice = ("started", 0)
                        self._items.append(("notice", notice))
                        if self._idle:
                            self._cond.notify()
                else:
                    if self._run_dropped:
                        notice = ("ended", self._run_dropped)
                        self._run_dropped = 0
                        self._items.append(("notice", notice))
                    self._items.append(("line", text))
                    self._lines += 1
                    if self._idle:  # a busy thread takes it with the rest of its next batch
                        self._cond.notify()
        if direct:
            self._write_now(text)
        if notice is not None and self.on_notice is not None:
            self.on_notice(*notice)

    def swap(self, stream: IO[str]) -> None:
        """From now on write to ``stream``; the old one is closed once what is queued is in it."""
        with self._cond:
            if not self._closed:
                self._items.append(("swap", stream))
                self._cond.notify()
                return
        old, self.stream = self.stream, stream
        self._close_stream(old)

    def flush(self, timeout: float = DEFAULT_FLUSH_TIMEOUT) -> bool:
        """Wait (at most ``timeout`` seconds) until everything queued is written; True if it was."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._items or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = DEFAULT_FLUSH_TIMEOUT) -> bool:
        """Write what is queued (waiting at most ``timeout``) and stop the thread; True if drained.

        The stream stays open (its owner closes it); later writes go to it directly.
        """
        with self._cond:
            if self._closed:
                return True
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        with self._cond:
            drained = self._closed
            if drained and self._run_dropped:
                run, self._run_dropped = self._run_dropped, 0
            else:
                run = 0
        if run:
            self._write_notice("ended", run)
            if self.on_notice is not None:
                self.on_notice("ended", run)
        return drained

    def _loop(self) -> None:
        """Takes everything queued at once and writes its lines with one write and one flush (a
        busy server's lines cost one wake-up and one system call per batch, not per line)."""
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._idle = True
                    self._cond.wait()
                self._idle = False
                if not self._items:
                    self._closed = True
                    self._cond.notify_all()
                    return
                batch = list(self._items)
                self._items.clear()
                self._lines -= sum(1 for kind, _ in batch if kind == "line")  # as before: in flight, not queued
                self._busy = True
            written = 0
            try:
                lines: list[str] = []
                for kind, value in batch:
                    if kind == "line":
                        lines.append(value)
                        continue
                    written += self._write_lines(lines)
                    lines = []
                    if kind == "notice":
                        self._write_notice(*value)
                    else:
                        old, self.stream = self.stream, value
                        self._close_stream(old)
                written += self._write_lines(lines)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _write_lines(self, lines: list[str]) -> int:
        if lines:
            self._write_now("".join(lines), len(lines))
        return len(lines)

    def _write_notice(self, state: str, count: int) -> None:
        if self.notice_line is None:
            return
        line = self.notice_line(state, count)
        if line:
            self._write_now(line)

    def _write_now(self, text: str, lines: int = 1) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # disk full, or closed under us: the lines are lost, counted
            self.errors += lines

    @staticmethod
    def _close_stream(stream: IO[str]) -> None:
        if stream in (sys.stderr, sys.stdout):
            return
        try:
            stream.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- observers


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as one formatted line; events come from the reactor and from threads.

    With ``queue_limit`` the lines go through a :class:`QueuedWriter` (one thread, a bounded
    queue): a slow disk never blocks the reactor, and a full queue drops lines, counts them
    (``writer.dropped``) and says so in the log itself. Without it, each line is written at once.
    """

    def __init__(self, stream: IO[str], formatter: Callable[[Mapping[str, Any]], str | None],
                 path: str | None = None, queue_limit: int | None = None) -> None:
        self.stream = stream
        self.formatter = formatter
        self.path = path  # the file it writes, to reopen; None for stderr or a given stream
        self._lock = threading.Lock()
        self.writer: QueuedWriter | None = None
        if queue_limit is not None:
            self.writer = QueuedWriter(stream, limit=queue_limit, name="pop3shield-log-writer",
                                       notice_line=self._notice_line)

    def _notice_line(self, state: str, count: int) -> str | None:
        text = ("log writer queue full: dropping lines" if state == "started"
                else "log writer queue: {count} lines dropped")
        return self.formatter({"log_namespace": "pop3shield.logwriter", "log_level": LogLevel.warn,
                               "log_format": text, "log_time": time.time(), "count": count,
                               "state": state})

    def reopen(self) -> None:
        """Open ``path`` again (SIGHUP after logrotate renamed it); the old file is closed.

        If it cannot be opened the lines keep going to the old file, and the error is raised.
        With a writer thread, the switch goes through its queue: lines logged before it are in
        the old file, lines after it in the new one.
        """
        if self.path is None:
            return
        new = open_log(self.path)
        if self.writer is not None:
            self.stream = new
            self.writer.swap(new)
            return
        with self._lock:
            old, self.stream = self.stream, new
        old.close()

    def close(self, timeout: float = DEFAULT_FLUSH_TIMEOUT) -> bool:
        """Write what is queued (bounded wait); True if nothing was left behind."""
        return self.writer.close(timeout) if self.writer is not None else True

    def __call__(self, event: Mapping[str, Any]) -> None:
        line = self.formatter(event)
        if not line:
            return
        if self.writer is not None:
            self.writer.write(line)
            return
        with self._lock:
            self.stream.write(line)
            self.stream.flush()


#: the observer of :func:`begin_logging` that has a writer thread, for metrics and shutdown
_queued_observer: LineObserver | None = None


def log_writer() -> QueuedWriter | None:
    """The writer thread of the server log, when :func:`begin_logging` made one."""
    return _queued_observer.writer if _queued_observer is not None else None


#: the observer writing ``logging.path`` (made by :func:`make_observer`), for :func:`reopen_log`
_file_observer: LineObserver | None = None


def reopen_log() -> None:
    """Reopen the log file of the last :func:`make_observer` (nothing for stderr)."""
    if _file_observer is not None:
        _file_observer.reopen()


def make_observer(path: str, fmt: str, level: str, stream: IO[str] | None = None,
                  queue_limit: int | None = None) -> ILogObserver:
    """The observer for ``logging.path/format/level``: the level filter runs before formatting.

    ``queue_limit``: write through a writer thread with a queue of that many lines.
    """
    global _file_observer, _queued_observer
    line = LineObserver(stream if stream is not None else open_log(path),
                        format_json if fmt == "json" else format_text,
                        path=path if stream is None and path != "-" else None, queue_limit=queue_limit)
    if line.path is not None:
        _file_observer = line
    if line.writer is not None:
        _queued_observer = line
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


def begin_logging(path: str, fmt: str, level: str, queue_limit: int | None = DEFAULT_QUEUE_LIMIT) -> None:
    """Send everything logged (twisted.logger and stdlib logging) to the configured place.

    The lines go through a writer thread (a slow disk or a stalled stderr pipe never blocks the
    reactor); at exit what is still queued is written, waiting at most
    :data:`DEFAULT_FLUSH_TIMEOUT` seconds.
    """
    global _debug_wanted
    install_stdlib_bridge(level)
    _debug_wanted = level == "debug"
    globalLogBeginner.beginLoggingTo([make_observer(path, fmt, level, queue_limit=queue_limit)],
                                     redirectStandardIO=False)
    if _queued_observer is not None:
        atexit.register(_queued_observer.close)
