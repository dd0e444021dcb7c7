"""Operational logging for ``pop3shield run``: text or JSON lines, to stderr or a file.

twistd sets up its own observers; this is only for the console command. Security events have
their own file (``pop3shield.events``) and also pass through here.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error, "critical": LogLevel.critical}


def open_log(path: str) -> IO[str]:
    if path == "-":
        return sys.stderr
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8")


def make_observer(path: str, fmt: str, level: str) -> ILogObserver:
    stream = open_log(path)
    observer = jsonFileLogObserver(stream) if fmt == "json" else textFileLogObserver(stream)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    return FilteringLogObserver(observer, [predicate])


def begin_logging(path: str, fmt: str, level: str) -> None:
    """Send everything logged through twisted.logger to the configured place."""
    globalLogBeginner.beginLoggingTo([make_observer(path, fmt, level)], redirectStandardIO=False)
