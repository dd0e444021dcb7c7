"""The server's life cycle: SIGTERM's grace period and SIGHUP's reload.

SIGTERM (and SIGINT, and ``reactor.stop``) stops the listeners at once; the sessions then have
``server.shutdown_grace`` seconds to finish. When that is over, each one still open is told
``-ERR [SYS/TEMP] Server shutting down.`` (mid-message it is just cut) and closed without entering
UPDATE, so nothing is deleted; a client that does not read that line is aborted
:data:`FLUSH_GRACE` seconds later. A second SIGTERM ends the grace period at once.

SIGHUP reopens the log and the event file, re-reads the passwd file, the STLS certificate and
the routing map (in a thread: they are files), and compares the config file on disk with the
running one; one line says what was reloaded and which changed settings need a restart. A broken
new passwd file, certificate or routing map is logged (naming the file and the problem) and the
previous one kept.

Handlers are Python signal handlers that only hand the work to the reactor
(``reactor.callFromThread``), installed when the service starts, so they work the same under
``pop3shield run`` and ``twistd -n pop3shield``.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger

log = Logger(namespace="pop3shield.server")

#: seconds a session told it is shut down has to read that line before it is aborted
FLUSH_GRACE = 2.0


class Connections:
    """The open client connections of a factory, and the drain that ends them at shutdown.

    Each member has ``shut_down()`` (say so and close, without UPDATE) and ``transport``.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._open: set[Any] = set()
        self._drained: defer.Deferred[None] | None = None
        self._calls: list[Any] = []
        self.draining = False
        self.expired = False

    def __len__(self) -> int:
        return len(self._open)

    def __iter__(self) -> Any:
        return iter(tuple(self._open))

    def add(self, connection: Any) -> None:
        self._open.add(connection)

    def discard(self, connection: Any) -> None:
        self._open.discard(connection)
        if self.draining and not self._open:
            self._done()

    def drain(self, grace: float) -> defer.Deferred[None]:
        """Fires once every connection is gone: by itself within ``grace`` seconds, or closed then."""
        if self._drained is not None:
            return self._drained
        self.draining = True
        self._drained = defer.Deferred()
        if not self._open:
            self._done()
            return self._drained
        log.info("shutting down: {count} sessions have {grace:g} s to finish", count=len(self._open), grace=grace)
        self._calls.append(self.reactor.callLater(grace, self.expire))
        return self._drained

    def expire(self) -> None:
        """The grace period is over (or a second SIGTERM): close what is left."""
        if self.expired or self._drained is None or self._drained.called:
            return
        self.expired = True
        log.info("shutdown grace over: closing {count} sessions (nothing deleted)", count=len(self._open))
        for connection in list(self._open):
            connection.shut_down()
        if self._open:
            self._calls.append(self.reactor.callLater(FLUSH_GRACE, self._abort))

    def _abort(self) -> None:
        for connection in list(self._open):
            connection.transport.abortConnection()

    def _done(self) -> None:
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        if self._drained is not None and not self._drained.called:
            self._drained.callback(None)


def config_changes(running: Any, on_disk: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs (dataclasses, compared field by field)."""
    changed: list[str] = []
    for item in dataclasses.fields(running):
        if not prefix and item.name == "source":
            continue
        old, new = getattr(running, item.name), getattr(on_disk, item.name)
        key = f"{prefix}{item.name}"
        if old == new:
            continue
        if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new) and type(old) is type(new):
            changed.extend(config_changes(old, new, key + "."))
        else:
            changed.append(key)
    return changed


class Reloader:
    """What SIGHUP does; :meth:`reload` returns a Deferred firing with the summary line."""

    def __init__(self, reactor: Any, config: Any, *, events: Any = None, checkers: Iterable[Any] = (),
                 routes: Iterable[Any] = (), tls: Any = None, reopen_log: Callable[[], None] | None = None,
                 threadpool: Any = None, forget: Iterable[Callable[[], None]] = ()) -> None:
        self.reactor = reactor
        self.config = config
        self.events = events
        self.checkers = [checker for checker in checkers if hasattr(checker, "reload")]
        self.routes = [route for route in routes if getattr(route, "path", None)]
        self.tls = tls
        self.reopen_log = reopen_log
        self.threadpool = threadpool
        #: what is cached from outside and asked for again after a HUP (the upstreams' CAPA)
        self.forget = list(forget)
        self._running: defer.Deferred[str] | None = None

    def reload(self) -> defer.Deferred[str]:
        """Reopen the log files now (every HUP: logrotate may have renamed them again), then the rest."""
        done: list[str] = []
        reopen = [("log file", self.reopen_log), ("event file", self.events.reopen if self.events else None)]
        for what, action in reopen:
            if action is None:
                continue
            try:
                action()
            except OSError as exc:
                log.error("cannot reopen the {what}, still writing the old one: {error}", what=what,
                          error=exc.strerror or str(exc))
        done.append("log and event files reopened")
        for forget in self.forget:
            forget()
        if self._running is not None:  # a HUP while one is under way: that one reads the files anyway
            return self._running
        pool = self.threadpool if self.threadpool is not None else self.reactor.getThreadPool()
        d = threads.deferToThreadPool(self.reactor, pool, self._read_files)
        d.addCallback(self._apply, done)
        d.addErrback(self._failed)
        self._running = d

        def finished(line: str) -> str:
            self._running = None
            return line
        d.addCallback(finished)
        return d

    def _read_files(self) -> dict[str, Any]:
        """BLOCKING, in a thread: every file SIGHUP re-reads; problems come back as text."""
        from pop3shield.config import ConfigError, load_config
        from pop3shield.passwd import PasswdError

        result: dict[str, Any] = {"passwd": [], "routes": [], "problems": []}
        for checker in self.checkers:
            try:
                result["passwd"].append((checker.path, checker.reload()))
            except PasswdError as exc:
                result["problems"].append(f"passwd file not reloaded, keeping the previous users: {exc}")
        for route in self.routes:
            try:
                result["routes"].append((route.path, route.reload()))
            except ValueError as exc:
                result["problems"].append(f"routing map not reloaded, keeping the previous routes: {exc}")
        if self.tls is not None:
            from pop3shield.tls import CertificateError, load_options

            try:
                result["tls"] = load_options(self.tls.config)
            except CertificateError as exc:
                result["problems"].append(f"TLS certificate not reloaded, keeping the previous one: "
                                          f"{self.config.source}: {exc.key}: {exc.problem}")
        source = self.config.source
        if os.path.isfile(source):
            try:
                result["changes"] = config_changes(self.config, load_config(source))
            except ConfigError as exc:
                result["problems"].append(f"config file not compared: {exc}")
            except Exception as exc:  # noqa: BLE001 - e.g. a routes file the loader cannot parse
                result["problems"].append(f"config file not compared: {source}: {exc}")
        return result

    def _apply(self, result: dict[str, Any], done: list[str]) -> str:
        for problem in result["problems"]:
            log.error("SIGHUP: {problem}", problem=problem)
        for path, count in result["passwd"]:
            done.append(f"passwd file {path} reloaded ({count} users)")
        if "tls" in result:
            self.tls.replace(result["tls"])
            done.append(f"TLS certificate {self.tls.config.certificate} reloaded")
        for path, count in result["routes"]:
            done.append(f"routing map {path} reloaded ({count} routes)")
        changes = result.get("changes")
        if changes:
            done.append(f"changed in {self.config.source}, needs a restart: {', '.join(changes)}")
        elif changes is not None:
            done.append(f"{self.config.source} unchanged")
        line = "; ".join(done)
        log.info("SIGHUP: {summary}", summary=line)
        return line

    def _failed(self, failure: Any) -> str:
        log.failure("SIGHUP: reload failed", failure)
        return "reload failed"


class SignalHandlers:
    """SIGHUP -> :class:`Reloader`; SIGTERM (and SIGINT) -> ``reactor.stop`` (the drain), a second one
    ends the grace."""

    def __init__(self, reactor: Any, reloader: Reloader, connections: Connections) -> None:
        self.reactor = reactor
        self.reloader = reloader
        self.connections = connections

    def install(self) -> None:
        """Replaces the reactor's SIGTERM handler (which only stops it) for the rest of the process.

        The reactor installs its own handlers when it starts running: twistd starts the services
        before that, so the handlers go in once the reactor runs.
        """
        if threading.current_thread() is not threading.main_thread():
            log.warn("not in the main thread: no SIGHUP reload, SIGTERM stops without a grace period")
            return
        if not self.reactor.running:
            self.reactor.callWhenRunning(self._install)
            return
        self._install()

    def _install(self) -> None:
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)  # Ctrl-C the same: a second one ends the grace

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reloader.reload)

    def _on_term(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._terminate, signal.Signals(signum).name)

    def _terminate(self, name: str = "SIGTERM") -> None:
        if self.connections.draining:
            log.info("{signal} again: ending the shutdown grace now", signal=name)
            self.connections.expire()
            return
        log.info("{signal}: stopping", signal=name)
        if self.reactor.running:
            self.reactor.stop()
