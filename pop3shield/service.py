"""Building the running server from a validated :class:`~pop3shield.config.Config`.

Used by both the ``pop3shield run`` command and the twistd plugin, so the two start the same
server. Anything that can fail at start-up (the passwd file, the realm, the log and event files,
the Maildir base, a listen endpoint) fails loudly with a message naming what is wrong, and
:func:`preflight` checks all but the endpoints the same way for ``check-config``.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import socket
import stat
import sys
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application import service
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from pop3shield.analysis import Analyzer
from pop3shield.backends import IBackend
from pop3shield.backends.maildir import MaildirBackend
from pop3shield.backends.routing import split_endpoint
from pop3shield.checker import PasswdFileChecker
from pop3shield.config import Config, ConfigError
from pop3shield.events import EventLog
from pop3shield.hashpool import HashPool
from pop3shield.metrics import Metrics, metrics_site
from pop3shield.protocol import POP3ServerFactory
from pop3shield.realm import MaildirRealm
from pop3shield.state import build_state

log = Logger(namespace="pop3shield.server")

#: security event records queued for the event file's writer thread before new ones are dropped
EVENT_QUEUE_LIMIT = 10000


def load_realm(config: Config) -> Any:
    """The configured realm: ``module:attribute`` naming an IRealm or a factory taking the Config."""
    if not config.auth.realm:
        return MaildirRealm(config.backend.maildir)
    module_name, _, attribute = config.auth.realm.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(config.source, "auth.realm", f"cannot load {config.auth.realm!r}: {exc}") from None
    realm = target if IRealm.providedBy(target) else target(config)
    if not IRealm.providedBy(realm):
        raise ConfigError(config.source, "auth.realm", f"{config.auth.realm!r} does not provide IRealm")
    return realm


@dataclass(frozen=True)
class Preflight:
    """What start-up found: the user count and warnings (``FILE: key: problem`` lines)."""

    users: int
    warnings: tuple[str, ...] = ()


def preflight(config: Config) -> Preflight:
    """Open everything ``run`` will open, without listening; shared by check-config, run and twistd.

    Raises ConfigError (or PasswdError, naming the line) on what would stop start-up: the realm,
    the log file and the event file (opened for append and created, as start-up does), the fixed
    part of the Maildir path pattern, the passwd file. Returns warnings for what is legal but
    dangerous: a passwd file other users may read or write, ``{PLAIN}`` entries, a listener on
    every interface, the event file being another configured file.
    """
    from pop3shield.logsetup import open_log
    from pop3shield.passwd import PLAINTEXT_SCHEMES, load_passwd

    warnings: list[str] = []

    def warn(key: str, problem: str) -> None:
        warnings.append(str(ConfigError(config.source, key, problem)))

    upstream = config.backend.type == "upstream"
    if upstream:
        from pop3shield.backends.upstream import settings_from_config

        settings_from_config(config)  # the endpoint, the routing map, the CA file
        if not config.backend.verify:
            warn("backend.verify", "false: upstream TLS certificates are not verified")
    else:
        load_realm(config)
    if config.state.redis:
        try:
            import redis  # noqa: F401
        except ImportError:
            raise ConfigError(config.source, "state.redis", "the 'redis' Python package is not installed "
                                                             "(pip install 'pop3shield[redis]')") from None
    if config.logging.path != "-":
        _try_open(config, "logging.path", config.logging.path, open_log)
    if config.events.path:
        _try_open(config, "events.path", config.events.path, EventLog._open)
    if not config.auth.realm and not upstream:
        _check_maildir_base(config)
    users = 0
    if config.auth.passwd_file:
        path = config.auth.passwd_file
        entries = load_passwd(path, allow_plaintext=config.auth.allow_plaintext)
        users = len(entries)
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise ConfigError(config.source, "auth.passwd_file", f"cannot stat {path}: {exc.strerror}") from None
        if mode & 0o006:
            warn("auth.passwd_file", f"{path} is {_other_access(mode)} by other users "
                                     f"(mode {stat.S_IMODE(mode):04o}; chmod o-rw)")
        plain = sum(1 for entry in entries.values() if entry.scheme in PLAINTEXT_SCHEMES)
        if plain:
            warn("auth.allow_plaintext", f"{path} has {plain} {{PLAIN}} "
                                         f"{'entry' if plain == 1 else 'entries'}: a stolen copy is a list of "
                                         f"working passwords")
    for index, description in enumerate(config.server.listen):
        if _listens_everywhere(description):
            warn(f"server.listen[{index}]", f"{description!r} listens on every interface "
                                            f"(give interface= the address clients should reach)")
    if config.metrics.enabled and _listens_everywhere(config.metrics.listen):
        warn("metrics.listen", f"{config.metrics.listen!r} serves the metrics on every interface "
                               f"(give interface= the address the scraper comes from)")
    _check_same_files(config, warn)
    if config.tls.certificate is not None:
        load_tls(config)
        if (config.protections.stls.action.value == "prevent" and not config.protections.stls.overrides
                and not any(uses_tls_section(item) for item in config.server.listen)):
            warn("protections.stls.action", "prevent: STLS is never offered, the tls.certificate is unused "
                                            "(set it to detect or inactive)")
    if config.auth.disable_plaintext_auth and config.tls.certificate is None and not any(
            item.split(":", 1)[0].strip().lower() == "ssl" for item in config.server.listen):
        warn("auth.disable_plaintext_auth", "no tls.certificate and no ssl: listener: only loopback clients "
                                            "can log in" if config.auth.plaintext_auth_loopback
                                            else "no tls.certificate and no ssl: listener: nobody can log in")
    return Preflight(users, tuple(warnings))


def load_tls(config: Config) -> Any:
    """The STLS certificate (``[tls]``), read and checked now; a problem is a ConfigError naming its key."""
    from pop3shield.tls import CertificateError, ServerTLS

    try:
        return ServerTLS(config.tls)
    except CertificateError as exc:
        raise ConfigError(config.source, exc.key, exc.problem) from None


def _try_open(config: Config, key: str, path: str, opener: Callable[[str], Any]) -> None:
    try:
        opener(path).close()
    except OSError as exc:
        raise ConfigError(config.source, key, f"cannot open {path} for appending: {exc.strerror or exc}") from None


def _check_maildir_base(config: Config) -> None:
    """The part of the pattern before ``{user}`` is fixed: its directory must exist."""
    prefix = config.backend.maildir.split("{user}", 1)[0]
    base = prefix if prefix.endswith("/") else os.path.dirname(prefix)
    base = base.rstrip("/") or "/"
    if not os.path.isdir(base):
        problem = "is not a directory" if os.path.exists(base) else "does not exist"
        raise ConfigError(config.source, "backend.maildir", f"{base} {problem} (the fixed part of "
                                                            f"{config.backend.maildir!r})")


def _other_access(mode: int) -> str:
    return {0o004: "readable", 0o002: "writable"}.get(mode & 0o006, "readable and writable")


def _endpoint_parts(description: str) -> tuple[list[str], dict[str, str]]:
    """Twisted's endpoint string syntax: positional fields and ``key=value`` names."""
    parts = split_endpoint(description)
    args = [part for part in parts if "=" not in part]
    kwargs = dict(part.split("=", 1) for part in parts if "=" in part)
    return args, kwargs


#: where a positional interface sits in each endpoint type (tcp:PORT:INTERFACE, tcp6:PORT:BACKLOG:INTERFACE)
_INTERFACE_POSITION = {"tcp": 2, "tcp6": 3, "ssl": None}


def _listens_everywhere(description: str) -> bool:
    kind, _, rest = description.partition(":")
    kind = kind.strip().lower()
    if kind == "haproxy":
        return _listens_everywhere(rest)
    if kind not in _INTERFACE_POSITION:
        return False  # unix sockets, systemd-passed sockets: not ours to judge
    args, kwargs = _endpoint_parts(description)
    position = _INTERFACE_POSITION[kind]
    interface = kwargs.get("interface")
    if interface is None:
        interface = args[position] if position is not None and len(args) > position else ""
    interface = interface.strip().strip("[]")
    if not interface:
        return True
    try:
        return ipaddress.ip_address(interface).is_unspecified
    except ValueError:
        return False


def _check_same_files(config: Config, warn: Callable[[str, str], None]) -> None:
    """Two keys naming one file interleave their writes (or append events to the passwd file)."""
    files = [("events.path", config.events.path), ("logging.path", None if config.logging.path == "-"
                                                   else config.logging.path),
             ("auth.passwd_file", config.auth.passwd_file)]
    named = [(key, os.path.realpath(path)) for key, path in files if path]
    for index, (key, resolved) in enumerate(named):
        for other, other_resolved in named[index + 1:]:
            if resolved == other_resolved:
                warn(key, f"{resolved} is also {other}")


def hash_pool(reactor: Any) -> Any:
    """The threads that verify password hashes, apart from the mailbox I/O ones (``server.hash_threads``).

    A login flood fills this pool's queue, never the reactor's pool that reads messages, so the
    sessions already logged in keep streaming. Made by :func:`make_service`; without it
    (a test building a backend alone) the reactor's pool is used.
    """
    return getattr(reactor, "pop3shield_hash_pool", None) or reactor.getThreadPool()


def build_portal(config: Config, reactor: Any) -> Portal:
    """A portal with the configured realm and the passwd-file checker (verifying in threads)."""
    portal = Portal(load_realm(config))
    if config.auth.passwd_file:
        checker = PasswdFileChecker(config.auth.passwd_file, allow_plaintext=config.auth.allow_plaintext,
                                    threadpool=hash_pool(reactor), reactor=reactor)
        portal.registerChecker(checker)
    return portal


def thread_offload(reactor: Any) -> Callable[..., defer.Deferred[Any]]:
    """Runs blocking work (disk, hashing) in the reactor's thread pool, never on the reactor."""
    def offload(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)
    return offload


def _maildir_backend(config: Config, reactor: Any, metrics: Metrics | None = None) -> IBackend:
    """The local Maildir behind the portal (passwd-file checker, configured realm)."""
    return MaildirBackend(build_portal(config, reactor), thread_offload(reactor))


def _upstream_backend(config: Config, reactor: Any, metrics: Metrics | None = None) -> IBackend:
    """The relay to an upstream POP3 server; the passwd file, if any, is checked first."""
    from pop3shield.backends.upstream import UpstreamBackend, settings_from_config

    checker = None
    if config.auth.passwd_file:
        checker = PasswdFileChecker(config.auth.passwd_file, allow_plaintext=config.auth.allow_plaintext,
                                    threadpool=hash_pool(reactor), reactor=reactor)
    return UpstreamBackend(settings_from_config(config), reactor, checker=checker,
                           threadpool=reactor.getThreadPool(),
                           metrics=metrics.upstream if metrics is not None else None)


#: ``backend.type`` -> the function that builds that backend from the config (and the metrics)
BACKEND_BUILDERS: dict[str, Callable[[Config, Any, Metrics | None], IBackend]] = {
    "maildir": _maildir_backend,
    "upstream": _upstream_backend,
}


def build_backend(config: Config, reactor: Any, metrics: Metrics | None = None) -> IBackend:
    """The configured backend (``backend.type``), the one place a new backend type is added."""
    try:
        builder = BACKEND_BUILDERS[config.backend.type]
    except KeyError:
        raise ConfigError(config.source, "backend.type", f"unknown backend type {config.backend.type!r} "
                                                         f"(known: {', '.join(sorted(BACKEND_BUILDERS))})") from None
    return builder(config, reactor, metrics)


def quick_check() -> Callable[[bytes, str], Any] | None:
    """The detector's fast tier (pure Python, on the reactor)."""
    from pop3shield.mcp import quick_check as check

    return check


#: the listen backlog unless the endpoint string gives ``backlog=`` (Twisted's default, 50, drops
#: the SYNs of a burst of connections, and each dropped one costs its client a second or more)
LISTEN_BACKLOG = 1024


def raise_backlog(port: Any, description: str) -> None:
    """``listen()`` again with :data:`LISTEN_BACKLOG` (Linux caps it at net.core.somaxconn)."""
    if "backlog=" in description.replace(" ", "").lower():
        return
    sock = getattr(port, "socket", None)
    if sock is not None and sock.type == socket.SOCK_STREAM:
        try:
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            pass


class ListenService(service.Service):
    """Listens on one endpoint string; reports the real address (port 0 picks a free one)."""

    def __init__(self, description: str, factory: Any, reactor: Any,
                 announce: Callable[[str], None] | None = None, tls: Any = None,
                 adopt: tuple[int, int] | None = None) -> None:
        self.description = description
        self.factory = factory
        #: ``[tls]``'s certificate, for an ``ssl:`` endpoint that names no key file of its own
        self.tls = tls
        self.reactor = reactor
        self.announce = announce
        #: (descriptor, address family) of a listening socket inherited from the supervisor
        self.adopt = adopt
        self.port: Any = None
        self.listening: defer.Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        try:
            factory = self.factory
            description = self.description
            if self.tls is not None and uses_tls_section(description):
                # implicit TLS with [tls]'s certificate, re-read on SIGHUP like STLS's
                from twisted.protocols.tls import TLSMemoryBIOFactory

                description = "tcp:" + description.split(":", 1)[1]
                factory = TLSMemoryBIOFactory(self.tls, False, factory)
            if self.adopt is not None:
                from pop3shield.workers import adopt_port

                self.listening = defer.succeed(adopt_port(self.reactor, description, *self.adopt, factory))
            else:
                endpoint = serverFromString(self.reactor, description)
                self.listening = endpoint.listen(factory)
        except Exception as exc:  # e.g. systemd:index=N with no socket N passed: fail the same way
            if isinstance(exc, IndexError) and self.description.lower().startswith("systemd:"):
                exc = RuntimeError("systemd passed no such socket (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES)")
            self.listening = defer.fail(exc)
        self.listening.addCallbacks(self._listening, self._failed)

    def _listening(self, port: Any) -> Any:
        self.port = port
        if self.adopt is None:
            raise_backlog(port, self.description)
        address = port.getHost()
        text = f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}".rstrip(":")
        log.info("listening on {address} ({description})", address=text, description=self.description)
        if self.announce is not None:
            self.announce(text)
        return port

    def _failed(self, failure: Any) -> None:
        """A port that cannot be opened stops the server: failing closed, and loudly."""
        message = f"cannot listen on {self.description!r}: {failure.getErrorMessage()}"
        log.critical(message)
        print(f"pop3shield: {message}", file=sys.stderr, flush=True)
        self.reactor.callLater(0, _stop_with_error, self.reactor)

    def stopService(self) -> defer.Deferred[Any] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)
        return None


def uses_tls_section(description: str) -> bool:
    """An ``ssl:`` endpoint without ``privateKey=``/``certKey=``/``extraCertChain=``: it takes ``[tls]``."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind != "ssl":
        return False
    _, kwargs = _endpoint_parts(description)
    return not {"privateKey", "certKey", "extraCertChain"} & set(kwargs)


class MetricsService(ListenService):
    """The Prometheus endpoint (``[metrics] listen``): a listener like the others, said in the log."""

    def _listening(self, port: Any) -> Any:
        self.port = port
        address = port.getHost()
        text = f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}".rstrip(":")
        log.info("metrics on http://{address}/metrics ({description})", address=text,
                 description=self.description)
        return port


def _stop_with_error(reactor: Any) -> None:
    reactor.pop3shield_exit_code = 1
    if reactor.running:
        reactor.stop()


class _Lifecycle(service.Service):
    """Starts and stops the analysis pool and the shared state, and closes the event file with the
    server (writing what its writer thread still has queued, waiting a bounded time).

    Stopping waits first for the sessions (``server.shutdown_grace``, see :mod:`pop3shield.lifecycle`),
    which still need the pools, the state and the event file; the listeners stop at once beside it.
    """

    def __init__(self, analyzer: Analyzer, events: EventLog, state: Any, pools: tuple[Any, ...] = (),
                 connections: Any = None, grace: float = 0.0, signals: Any = None) -> None:
        self.analyzer = analyzer
        self.events = events
        self.state = state
        self.pools = pools
        self.connections = connections
        self.grace = grace
        self.signals = signals

    def startService(self) -> None:
        super().startService()
        for pool in self.pools:
            pool.start()
        self.analyzer.start()
        self.state.start()
        if self.signals is not None:
            self.signals.install()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()  # the signal handlers stay: a 2nd SIGTERM ends the grace, a HUP still reloads
        d: defer.Deferred[None] = (self.connections.drain(self.grace) if self.connections is not None
                                   else defer.succeed(None))
        d.addCallback(lambda _: self._stop())
        return d

    def _stop(self) -> None:
        for pool in self.pools:
            pool.stop()
        self.analyzer.stop()
        self.state.stop()
        self.events.close()


def log_warnings(report: Preflight) -> None:
    """Start-up says what preflight found dangerous, one warning each."""
    for warning in report.warnings:
        log.warn("config warning: {warning}", warning=warning)


def _reloadables(backend: Any) -> tuple[list[Any], list[Any]]:
    """The passwd-file checkers and routing maps a backend reads, which SIGHUP re-reads."""
    checkers = list(getattr(getattr(backend, "portal", None), "checkers", {}).values())
    if getattr(backend, "checker", None) is not None:
        checkers.append(backend.checker)
    routes = [backend.routes] if getattr(backend, "routes", None) is not None else []
    return [c for c in dict.fromkeys(checkers) if hasattr(c, "reload")], routes


def untrusted_hash_threads(config: Config, *, workers: bool) -> int:
    """``server.hash_threads_untrusted``, or (0) half this process's share of the cores (at least
    one): the cores divided among ``server.workers`` in a worker, all of them in a single process
    (twistd). A flood of first guesses from fresh addresses then holds at most half the cores, and
    the memory of that many argon2id checks, however many addresses it comes from."""
    if config.server.hash_threads_untrusted:
        return config.server.hash_threads_untrusted
    processes = config.server.workers if workers else 1
    return max(1, (os.cpu_count() or 1) // processes // 2)


def make_service(config: Config, reactor: Any = None,
                 announce: Callable[[str], None] | None = None, *, signals: bool = True, state: Any = None,
                 adopted: Any = None) -> service.MultiService:
    """Everything the server runs, as one Twisted service.

    ``signals``: the service installs the SIGHUP (reload) and SIGTERM (grace period) handlers when it
    starts in the main thread (``pop3shield run``, the twistd plugin, each worker); False for a server
    embedded in another program.

    A worker of :mod:`pop3shield.workers` passes the supervisor's ``state`` and the listening
    sockets it inherited (``adopted``: endpoint string, descriptor, family per listener); then
    the supervisor serves the metrics and tells systemd, not the worker.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    reactor.suggestThreadPoolSize(config.server.thread_pool_size)
    # known pairs hash on threads of their own; the others (clean, then suspect, which hold one
    # thread at most) on low-priority ones, no more than half this process's share of the cores
    hashing = HashPool(reactor, config.server.hash_threads,
                       untrusted_threads=untrusted_hash_threads(config, workers=adopted is not None))
    reactor.pop3shield_hash_pool = hashing  # the checkers built below verify in it
    metrics = Metrics()
    backend = build_backend(config, reactor, metrics)
    events = EventLog(config.events.path, config.events.rate_limit,
                      global_rate_limit=config.events.global_rate_limit,
                      queue_limit=EVENT_QUEUE_LIMIT)  # a writer thread: a slow disk never blocks the reactor
    analysis = config.analysis
    analyzer = Analyzer(reactor, threads=analysis.threads, max_pending=analysis.max_queue,
                        source_running=analysis.source_threads, source_queue=analysis.source_queue,
                        wait=analysis.wait, ipv4_prefix=analysis.ipv4_prefix, ipv6_prefix=analysis.ipv6_prefix,
                        observe_wait=metrics.analysis_waited)
    from pop3shield.logsetup import log_writer

    metrics.watch(pools=[("reactor", reactor.getThreadPool), ("analysis", lambda: analyzer.pool),
                         ("hash", lambda: hashing.gauges(trusted=True)),
                         ("hash_untrusted", lambda: hashing.gauges(trusted=False))],
                  writers=[("events", lambda: events.writer), ("server", log_writer)])
    if config.server.workers > 1 and adopted is None:  # twistd (pop3shield run starts a supervisor instead)
        log.info("twistd runs one process: server.workers = {workers} is ignored (pop3shield run starts workers)",
                 workers=config.server.workers)
    if state is None:
        state = build_state(config, reactor)
    tls = load_tls(config) if config.tls.certificate is not None else None
    server = config.server
    factory = POP3ServerFactory(
        config.session_settings(), backend, events,
        reactor=reactor, analyzer=analyzer,
        login_timeout=server.login_timeout, login_deadline=server.login_deadline, idle_timeout=server.idle_timeout,
        greeting_delay=server.greeting_delay,
        max_connections=server.max_connections, max_connections_per_ip=server.max_connections_per_ip,
        new_connections_per_ip=server.new_connections_per_ip, new_connections_burst=server.new_connections_burst,
        connection_limits=server.connection_limits,
        max_connections_per_user_ip=server.max_connections_per_user_ip, state=state,
        auth_failure_delay=server.auth_failure_delay, auth_failure_delay_max=server.auth_failure_delay_max,
        auth_penalty_thresholds=(server.auth_unchecked_address, server.auth_unchecked_user,
                                 server.auth_unchecked_pair),
        quick_check=quick_check(),
        log_rate_limit=config.logging.rate_limit, log_global_rate_limit=config.logging.global_rate_limit,
        proxy_protocol_networks=server.proxy_protocol_networks, proxy_protocol_timeout=server.proxy_protocol_timeout,
        metrics=metrics, tls=tls,
        output_buffer_limit=server.output_buffer_limit, write_stall_timeout=server.write_stall_timeout,
    )
    top = service.MultiService()
    from pop3shield.lifecycle import Reloader, SignalHandlers
    from pop3shield.logsetup import reopen_log

    checkers, routes = _reloadables(backend)
    forget = [backend.forget_capabilities] if hasattr(backend, "forget_capabilities") else []
    reloader = Reloader(reactor, config, events=events, checkers=checkers, routes=routes, tls=tls,
                        reopen_log=reopen_log, forget=forget)
    handlers = SignalHandlers(reactor, reloader, factory.connections) if signals else None
    _Lifecycle(analyzer, events, state, (hashing,), factory.connections, server.shutdown_grace,
               handlers).setServiceParent(top)
    if adopted is not None:
        listeners = [ListenService(description, factory, reactor, tls=tls, adopt=(fd, family))
                     for description, fd, family in adopted]
    else:
        listeners = [ListenService(description, factory, reactor, announce, tls) for description in server.listen]
    if config.metrics.enabled and adopted is None:
        listeners.append(MetricsService(config.metrics.listen, metrics_site(metrics), reactor))
    for listener in listeners:
        listener.setServiceParent(top)
    if adopted is None:
        from pop3shield.sdnotify import ReadyNotifier

        ReadyNotifier(listeners).setServiceParent(top)  # READY=1 to systemd (Type=notify) once all listen
    top.listeners = listeners  # type: ignore[attr-defined]
    top.factory = factory  # type: ignore[attr-defined]
    top.events = events  # type: ignore[attr-defined]  # reopened on SIGHUP (cli._serve)
    top.metrics = metrics  # type: ignore[attr-defined]
    top.reloader = reloader  # type: ignore[attr-defined]  # what SIGHUP runs
    return top
