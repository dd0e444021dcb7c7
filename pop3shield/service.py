"""Building the running server from a validated :class:`~pop3shield.config.Config`.

Used by both the ``pop3shield run`` command and the twistd plugin, so the two start the same
server. Anything that can fail at start-up (the passwd file, the realm, a listen endpoint) fails
loudly with a message naming what is wrong.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

from twisted.application import service
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from pop3shield.analysis import Analyzer
from pop3shield.checker import PasswdFileChecker
from pop3shield.config import Config, ConfigError
from pop3shield.events import EventLog
from pop3shield.protocol import POP3ServerFactory
from pop3shield.realm import MaildirRealm

log = Logger(namespace="pop3shield.server")


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


def preflight(config: Config) -> int:
    """Everything start-up would trip over, checked without listening; returns the user count.

    Raises ConfigError or PasswdError with the file, key (or line) and problem.
    """
    from pop3shield.passwd import load_passwd

    load_realm(config)
    if not config.auth.passwd_file:
        return 0
    return len(load_passwd(config.auth.passwd_file, allow_plaintext=config.auth.allow_plaintext))


def build_portal(config: Config, reactor: Any) -> Portal:
    """A portal with the configured realm and the passwd-file checker (verifying in threads)."""
    portal = Portal(load_realm(config))
    if config.auth.passwd_file:
        checker = PasswdFileChecker(config.auth.passwd_file, allow_plaintext=config.auth.allow_plaintext,
                                    threadpool=reactor.getThreadPool(), reactor=reactor)
        portal.registerChecker(checker)
        if config.auth.allow_plaintext:
            log.warn("auth.allow_plaintext is on: {path} may hold plaintext passwords", path=config.auth.passwd_file)
    return portal


def quick_check() -> Callable[[bytes, str], Any] | None:
    """The detector's fast tier (pure Python, on the reactor)."""
    from pop3shield.mcp import quick_check as check

    return check


class ListenService(service.Service):
    """Listens on one endpoint string; reports the real address (port 0 picks a free one)."""

    def __init__(self, description: str, factory: Any, reactor: Any,
                 announce: Callable[[str], None] | None = None) -> None:
        self.description = description
        self.factory = factory
        self.reactor = reactor
        self.announce = announce
        self.port: Any = None
        self.listening: defer.Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        endpoint = serverFromString(self.reactor, self.description)
        self.listening = endpoint.listen(self.factory)
        self.listening.addCallbacks(self._listening, self._failed)

    def _listening(self, port: Any) -> Any:
        self.port = port
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


def _stop_with_error(reactor: Any) -> None:
    reactor.pop3shield_exit_code = 1
    if reactor.running:
        reactor.stop()


class _Lifecycle(service.Service):
    """Starts and stops the analysis pool and closes the event file with the server."""

    def __init__(self, analyzer: Analyzer, events: EventLog) -> None:
        self.analyzer = analyzer
        self.events = events

    def startService(self) -> None:
        super().startService()
        self.analyzer.start()

    def stopService(self) -> None:
        super().stopService()
        self.analyzer.stop()
        self.events.close()


def make_service(config: Config, reactor: Any = None,
                 announce: Callable[[str], None] | None = None) -> service.MultiService:
    """Everything the server runs, as one Twisted service."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    reactor.suggestThreadPoolSize(config.server.thread_pool_size)
    portal = build_portal(config, reactor)
    events = EventLog(config.events.path, config.events.rate_limit,
                      global_rate_limit=config.events.global_rate_limit)
    analyzer = Analyzer(reactor)
    server = config.server
    factory = POP3ServerFactory(
        config.session_settings(), portal, events,
        reactor=reactor, threadpool=reactor.getThreadPool(), analyzer=analyzer,
        login_timeout=server.login_timeout, idle_timeout=server.idle_timeout,
        greeting_delay=server.greeting_delay,
        max_connections=server.max_connections, max_connections_per_ip=server.max_connections_per_ip,
        auth_failure_delay=server.auth_failure_delay, auth_failure_delay_max=server.auth_failure_delay_max,
        quick_check=quick_check(),
        log_rate_limit=config.logging.rate_limit, log_global_rate_limit=config.logging.global_rate_limit,
    )
    top = service.MultiService()
    _Lifecycle(analyzer, events).setServiceParent(top)
    for description in server.listen:
        ListenService(description, factory, reactor, announce).setServiceParent(top)
    top.factory = factory  # type: ignore[attr-defined]
    return top
