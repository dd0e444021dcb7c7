"""The upstream relay backend: each session's mail comes from an existing POP3 server.

pop3shield screens the client's session as always; when the client has authenticated, this
backend connects to the user's upstream (``backend.endpoint`` or the routing map), reads its
greeting and CAPA, optionally starts TLS (STLS, or implicit TLS with a ``tls:`` endpoint) with
certificate and host name verification, tells it the client's address (Dovecot's ``XCLIENT``, or
a PROXY protocol v2 header), and logs in with the client's own credentials: ``AUTH PLAIN`` when
CAPA offers it, else USER/PASS. STAT, LIST and UIDL then give the session its listing; RETR and
TOP are relayed with backpressure through :class:`pop3shield.core.upstream.UpstreamReader`; the
session's UPDATE state becomes DELE for each marked message and QUIT upstream. A session that
ends any other way closes the upstream connection without QUIT, so the upstream deletes nothing.

Errors, as :mod:`pop3shield.backends` defines them: the upstream's ``-ERR [AUTH]`` (or no code)
at login is :class:`LoginRefused`, ``[IN-USE]`` :class:`MailboxInUse`, ``[SYS/TEMP]``,
``[SYS/PERM]`` and ``[LOGIN-DELAY]`` :class:`Unavailable` with that code; anything else that goes
wrong (refused connection, TLS failure, a broken or silent upstream, no answer within
``backend.login_timeout``) is ``Unavailable("SYS/TEMP")`` with one log line naming the reason.
"""

from __future__ import annotations

import base64
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from pop3shield.backends import (
    BackendBroken,
    ClientInfo,
    Credentials,
    IBackend,
    IMailbox,
    ListedMessage,
    LoginRefused,
    MailboxInUse,
    MessageUnavailable,
    Unavailable,
)
from pop3shield.backends._upstream_client import (
    PausingProducer,
    UpstreamFailure,
    UpstreamProtocol,
    proxy_v2_header,
)
from pop3shield.backends.routing import Endpoint, RouteMap
from pop3shield.core.upstream import DEFAULT_MAX_LINE, Expect, Kind, parse_capabilities

__all__ = ["UpstreamBackend", "UpstreamMailbox", "UpstreamSettings", "settings_from_config", "tls_options"]

log = Logger(namespace="pop3shield.upstream")

CLIENT_ADDRESS_MODES = ("none", "xclient", "proxy")
#: a listing line: "n size" / "n uid"; UIDs are at most 70 octets (RFC 1939)
_MAX_LISTING_LINE = 100
#: CAPA is a handful of lines
_CAPA_BOUND = Expect(Kind.MULTI, max_octets=8192, max_lines=100)
#: codes that pass through to the client as they are
_PASSED_CODES = ("SYS/TEMP", "SYS/PERM", "LOGIN-DELAY")
#: seconds an upstream's CAPA answer is reused for the next logins (also forgotten on any failed
#: login through it and on SIGHUP)
CAPA_TTL = 60.0


@dataclass(frozen=True)
class UpstreamSettings:
    """What the backend needs from ``[backend]`` (see :class:`pop3shield.config.BackendConfig`)."""

    endpoint: Endpoint | None
    routes: str | None = None
    stls: bool = False
    ca_file: str | None = None
    verify: bool = True
    tls_hostname: str | None = None
    client_address: str = "none"
    connect_timeout: float = 10.0
    login_timeout: float = 30.0
    response_timeout: float = 60.0
    max_line: int = DEFAULT_MAX_LINE


def settings_from_config(config: Any) -> UpstreamSettings:
    """:class:`UpstreamSettings` from a validated :class:`pop3shield.config.Config`.

    Raises :class:`pop3shield.config.ConfigError` for what only shows when TLS is set up (a CA
    file without a certificate in it).
    """
    from pop3shield.backends.routing import parse_endpoint
    from pop3shield.config import ConfigError

    b = config.backend
    settings = UpstreamSettings(
        endpoint=parse_endpoint(b.endpoint) if b.endpoint else None, routes=b.routes, stls=b.stls,
        ca_file=b.ca_file, verify=b.verify, tls_hostname=b.tls_hostname,
        client_address=b.client_address, connect_timeout=b.connect_timeout,
        login_timeout=b.login_timeout, response_timeout=b.response_timeout)
    if settings.endpoint is not None and (settings.stls or settings.endpoint.implicit_tls):
        try:
            tls_options(settings, settings.endpoint.host)
        except (OSError, ValueError) as exc:
            raise ConfigError(config.source, "backend.ca_file" if b.ca_file else "backend.tls_hostname",
                              str(exc)) from None
    return settings


def tls_options(settings: UpstreamSettings, host: str | None) -> Any:
    """``optionsForClientTLS`` with the configured CA file (or the system's trust store)."""
    from twisted.internet import ssl

    if not settings.verify:
        return ssl.CertificateOptions(raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
    name = settings.tls_hostname or host
    if not name:
        raise ValueError("TLS to a unix socket needs backend.tls_hostname")
    trust = None
    if settings.ca_file:
        with open(settings.ca_file, "rb") as handle:
            pem = handle.read()
        trust = ssl.trustRootFromCertificates(_certificates(pem))
    return ssl.optionsForClientTLS(name, trustRoot=trust)


def _certificates(pem: bytes) -> list[Any]:
    from twisted.internet import ssl

    marker = b"-----END CERTIFICATE-----"
    certs = []
    for block in pem.split(marker)[:-1]:
        certs.append(ssl.Certificate.loadPEM(block + marker + b"\n"))
    if not certs:
        raise ValueError("no PEM certificate in the CA file")
    return certs


@implementer(IBackend)
class UpstreamBackend:
    """Relays each session to its upstream POP3 server; one instance serves the whole server."""

    def __init__(self, settings: UpstreamSettings, reactor: Any, *, checker: Any = None,
                 threadpool: Any = None, metrics: Any = None) -> None:
        self.settings = settings
        self.reactor = reactor
        #: ``observe_upstream(seconds)`` / ``upstream_error(reason)`` (pop3shield.metrics.UpstreamMetrics)
        self.metrics = metrics
        self.checker = checker
        self.threadpool = threadpool if threadpool is not None else reactor.getThreadPool()
        self.routes = RouteMap(settings.endpoint, settings.routes, log=log)
        if not settings.verify:
            log.warn("backend.verify = false: upstream TLS certificates are NOT verified; anyone "
                     "on the path to the upstream can read and change the relayed sessions")
        self._tls_cache: dict[str | None, Any] = {}
        #: endpoint description -> the Twisted client endpoint made from it
        self._endpoints: dict[str, Any] = {}
        #: (endpoint, "plain" or "tls") -> (the time it was read, its CAPA): a login costs
        #: no CAPA round trip while the upstream's answer is fresh
        self._capa_cache: dict[tuple[Endpoint, str], tuple[float, dict[str, tuple[str, ...]]]] = {}

    # -- the CAPA cache --------------------------------------------------------------------

    def cached_capabilities(self, endpoint: Endpoint, phase: str) -> dict[str, tuple[str, ...]] | None:
        """A copy of the upstream's CAPA read less than CAPA_TTL ago (None: ask it)."""
        entry = self._capa_cache.get((endpoint, phase))
        if entry is None:
            return None
        read, caps = entry
        if not 0 <= self.reactor.seconds() - read < CAPA_TTL:
            del self._capa_cache[(endpoint, phase)]
            return None
        return dict(caps)

    def remember_capabilities(self, endpoint: Endpoint, phase: str, caps: dict[str, tuple[str, ...]]) -> None:
        self._capa_cache[(endpoint, phase)] = (self.reactor.seconds(), dict(caps))

    def forget_capabilities(self, endpoint: Endpoint | None = None) -> None:
        """Ask the upstream (or every upstream) for its CAPA again at the next login."""
        if endpoint is None:
            self._capa_cache.clear()
            return
        for key in [k for k in self._capa_cache if k[0] == endpoint]:
            del self._capa_cache[key]

    # -- IBackend --------------------------------------------------------------------------

    def login(self, credentials: Credentials, client: ClientInfo) -> defer.Deferred[IMailbox]:
        started = self.reactor.seconds()
        d = defer.ensureDeferred(self._login(credentials, client))
        d.addTimeout(self.settings.login_timeout, self.reactor)
        d.addCallback(self._logged_in, started)
        d.addErrback(self._login_failed, credentials, client)
        return d

    def _logged_in(self, mailbox: UpstreamMailbox, started: float) -> UpstreamMailbox:
        """Connect, login and listing took this long (the upstream's share of a login)."""
        if self.metrics is not None:
            self.metrics.observe_upstream(self.reactor.seconds() - started)
        mailbox.metrics = self.metrics
        return mailbox

    def _count_error(self, error: BaseException) -> None:
        """One upstream failure for the metrics, by kind; refusals decided here are not counted."""
        if self.metrics is None:
            return
        text = str(error)
        if isinstance(error, defer.TimeoutError) or "no connection within" in text or "no login answer" in text:
            reason = "timeout"
        elif isinstance(error, UpstreamFailure):
            reason = "protocol" if error.violation else "closed"
        elif isinstance(error, LoginRefused):
            if text != "the upstream refused the credentials":
                return  # APOP, no route, the local passwd file: the upstream was not asked
            reason = "auth"
        elif isinstance(error, MailboxInUse):
            return
        elif "cannot connect" in text:
            reason = "connect"
        elif "TLS" in text or "certificate" in text.lower():
            reason = "tls"
        elif isinstance(error, Unavailable) and error.broken:
            reason = "protocol"
        else:
            reason = "other"
        self.metrics.upstream_error(reason)

    async def _login(self, credentials: Credentials, client: ClientInfo) -> UpstreamMailbox:
        if credentials.mechanism == "APOP":
            raise LoginRefused("APOP cannot be relayed")
        if self.checker is not None:
            await self._check_locally(credentials, client)
        if self.routes.path is None:  # no map file: nothing to stat, no thread hop
            endpoint = self.routes.default
        else:
            endpoint = await deferToThreadPool(self.reactor, self.threadpool, self.routes.lookup,
                                               credentials.username)
        if endpoint is None:
            raise LoginRefused("no route for this user")
        protocol = await self._connect(endpoint, client)
        session = _Session(self, protocol, endpoint, credentials, client)
        try:
            return await session.open()
        except BaseException:
            protocol.abort()
            # whatever went wrong may be the CAPA answer going stale (a mechanism withdrawn,
            # PIPELINING turned off): the next login through this upstream asks again
            self.forget_capabilities(endpoint)
            raise

    async def _check_locally(self, credentials: Credentials, client: ClientInfo) -> None:
        from pop3shield.checker import AddressedCredentials, LoginDisabled

        creds = AddressedCredentials(credentials.username.encode("utf-8"), credentials.secret,
                                     client.address, client.standing)
        try:
            await self.checker.requestAvatarId(creds)
        except LoginDisabled as exc:
            raise LoginRefused("refused by the local passwd file", reason=exc.reason,
                               nodelay=exc.nodelay) from None
        except UnauthorizedLogin:
            raise LoginRefused("refused by the local passwd file") from None

    async def _connect(self, endpoint: Endpoint, client: ClientInfo) -> UpstreamProtocol:
        settings = self.settings
        tls = self._options(endpoint) if endpoint.implicit_tls else None
        header = None
        if settings.client_address == "proxy":
            header = proxy_v2_header(client.address, client.port, client.server_address,
                                     client.server_port)
        factory = Factory.forProtocol(lambda: UpstreamProtocol(
            reactor=self.reactor, response_timeout=settings.response_timeout,
            max_line=settings.max_line, tls_options=tls, proxy_header=header,
            name=endpoint.text))
        factory.noisy = False  # no "Starting factory" / "Stopping factory" log lines per session
        client_endpoint = self._endpoints.get(endpoint.description)
        if client_endpoint is None:  # parsed once: an endpoint object connects any number of times
            if len(self._endpoints) >= 1024:  # routing maps reloaded with ever new endpoints
                self._endpoints.clear()
            client_endpoint = self._endpoints[endpoint.description] = clientFromString(
                self.reactor, endpoint.description)
        connecting = client_endpoint.connect(factory)
        connecting.addTimeout(settings.connect_timeout, self.reactor)
        try:
            protocol = await connecting
        except defer.TimeoutError:
            raise Unavailable(f"{endpoint.text}: no connection within {settings.connect_timeout:g} s") from None
        except Exception as exc:  # noqa: BLE001 - refused, unreachable, DNS: one log line each
            raise Unavailable(f"{endpoint.text}: cannot connect: {exc}") from None
        return protocol

    def _options(self, endpoint: Endpoint) -> Any:
        key = self.settings.tls_hostname or endpoint.host
        if key not in self._tls_cache:
            self._tls_cache[key] = tls_options(self.settings, endpoint.host)
        return self._tls_cache[key]

    def _login_failed(self, failure: Any, credentials: Credentials, client: ClientInfo) -> Any:
        error = failure.value
        self._count_error(error)
        if isinstance(error, defer.TimeoutError):
            error = Unavailable(f"no login answer within {self.settings.login_timeout:g} s")
        elif isinstance(error, UpstreamFailure):
            error = Unavailable(str(error), broken=error.violation)
        elif not isinstance(error, (LoginRefused, MailboxInUse, Unavailable)):
            log.failure("upstream login for user={user} failed unexpectedly", failure,
                        user=credentials.username)
            error = Unavailable(f"internal error: {type(error).__name__}")
        # an Unavailable's text names the upstream and the reason: the session logs it, once
        if isinstance(error, MailboxInUse):
            log.info("upstream says the mailbox of user={user} is in use", user=credentials.username)
        raise error


class _Session:
    """The login dialogue with one upstream."""

    def __init__(self, backend: UpstreamBackend, protocol: UpstreamProtocol, endpoint: Endpoint,
                 credentials: Credentials, client: ClientInfo) -> None:
        self.backend = backend
        self.settings = backend.settings
        self.protocol = protocol
        self.endpoint = endpoint
        self.credentials = credentials
        self.client = client

    async def open(self) -> UpstreamMailbox:
        p = self.protocol
        try:
            greeting = await p.greeting
            if not greeting.status.ok:
                raise Unavailable(f"{self.endpoint.text}: greeting is -ERR", _code(greeting.status))
            caps = await self._capa("plain")
            if greeting.status.code == "XCLIENT":  # Dovecot offers it in the greeting
                caps.setdefault("XCLIENT", ())
            if self.settings.stls and not self.endpoint.implicit_tls:
                if "STLS" not in caps:
                    raise Unavailable(f"{self.endpoint.text}: backend.stls is set but CAPA offers no STLS")
                reply = await p.request(b"STLS", Expect(Kind.SINGLE, discard_after=True),
                                        start_tls=self.backend._options(self.endpoint))
                if not reply.status.ok:
                    raise Unavailable(f"{self.endpoint.text}: STLS refused")
                xclient = "XCLIENT" in caps
                caps = await self._capa("tls")
                if xclient:
                    caps.setdefault("XCLIENT", ())
            await self._client_address(caps)
            listing = await self._login_and_list(caps)
        except UpstreamFailure as exc:
            raise Unavailable(f"{self.endpoint.text}: {exc}") from None
        return UpstreamMailbox(self.credentials.username, listing, p, "PIPELINING" in caps,
                               self.endpoint.text)

    async def _capa(self, phase: str) -> dict[str, tuple[str, ...]]:
        """The upstream's CAPA (``phase``: before TLS, or after STLS), from the backend's cache
        while it is fresh; a -ERR (no CAPA) is not cached, so such an upstream is asked each time."""
        caps = self.backend.cached_capabilities(self.endpoint, phase)
        if caps is not None:
            return caps
        reply = await self.protocol.request(b"CAPA", _CAPA_BOUND)
        if not reply.status.ok:
            return {}
        caps = parse_capabilities(reply.body or b"")
        self.backend.remember_capabilities(self.endpoint, phase, caps)
        return caps

    async def _client_address(self, caps: dict[str, tuple[str, ...]]) -> None:
        if self.settings.client_address != "xclient":
            return
        if "XCLIENT" not in caps:
            log.warn("{endpoint}: backend.client_address = 'xclient' but the upstream does not "
                     "offer XCLIENT (is pop3shield in its login_trusted_networks?)",
                     endpoint=self.endpoint.text)
            return
        address, port = self.client.address, self.client.port
        if not address:
            return
        fields = [f"ADDR={address}"]
        if port:
            fields.append(f"PORT={port}")
        fields.append(f"SESSION={_atom(self.client.session)}")
        reply = await self.protocol.request(("XCLIENT " + " ".join(fields)).encode("ascii"))
        if not reply.status.ok:
            raise Unavailable(f"{self.endpoint.text}: XCLIENT refused")

    def _auth_requests(self, caps: dict[str, tuple[str, ...]]) -> tuple[list[defer.Deferred[Any]], bool]:
        """Send the login (AUTH PLAIN / the OAuth mechanism / USER+PASS); its replies' Deferreds,
        and whether commands may be pipelined behind it (not after a SASL continuation)."""
        c = self.credentials
        user = c.username.encode("utf-8")
        mechanisms = {m.upper() for m in caps.get("SASL", ())}
        if c.mechanism in ("XOAUTH2", "OAUTHBEARER"):
            if c.mechanism not in mechanisms:
                raise LoginRefused(f"the upstream does not offer {c.mechanism}")
            # the client's SASL message as it decoded it, re-encoded: the token passes unchanged
            return self._sasl(c.mechanism.encode(), base64.b64encode(c.secret))
        if "PLAIN" in mechanisms:
            return self._sasl(b"PLAIN", base64.b64encode(b"\0" + user + b"\0" + c.secret))
        if any(ch in user + c.secret for ch in (0, 10, 13)):
            raise LoginRefused("credentials cannot be sent as USER/PASS")
        if "PIPELINING" in caps:
            return [self.protocol.request(b"USER " + user), self.protocol.request(b"PASS " + c.secret)], True
        return [self.protocol.request(b"USER " + user)], False

    def _sasl(self, mechanism: bytes, response: bytes) -> tuple[list[defer.Deferred[Any]], bool]:
        """AUTH with an initial response when the line stays within 255 octets (RFC 5034 and
        2449), else the response on its own line after the upstream's ``+``."""
        line = b"AUTH " + mechanism + b" " + response
        if len(line) + 2 <= 255:
            return [self.protocol.request(line, Kind.SASL)], True
        return [self.protocol.request(b"AUTH " + mechanism, Kind.SASL, responses=[response])], False

    def _listing_requests(self) -> list[defer.Deferred[Any]]:
        """STAT, LIST and UIDL; the listings are bound by STAT's count, even when pipelined."""
        bound = Expect(Kind.MULTI, per_message=_MAX_LISTING_LINE)
        return self.protocol.pipeline([(b"STAT", Expect(counts=True)), (b"LIST", bound), (b"UIDL", bound)])

    async def _login_and_list(self, caps: dict[str, tuple[str, ...]]) -> list[ListedMessage]:
        """The login and the listing, pipelined behind it when the upstream offers PIPELINING
        (one round trip for AUTH or USER+PASS, STAT, LIST and UIDL)."""
        pipelining = "PIPELINING" in caps
        self.protocol.cork()  # the login and the listing pipelined behind it: one write
        try:
            auth, may_pipeline = self._auth_requests(caps)
            listing = self._listing_requests() if pipelining and may_pipeline else []
        finally:
            self.protocol.uncork()
        try:
            for d in auth:
                reply = await d
                if not reply.status.ok:
                    _refuse(reply.status)
            if len(auth) == 1 and auth_is_user(self.credentials, caps):  # USER alone: now PASS
                reply = await self.protocol.request(b"PASS " + self.credentials.secret)
                if not reply.status.ok:
                    _refuse(reply.status)
            if not listing:
                listing = self._listing_requests()
            stat, listed, uidl = [await d for d in listing]
        except BaseException:
            for d in [*auth, *listing]:  # answered -ERR or failed with the connection: nobody waits
                d.addErrback(lambda _: None)
            raise
        if not stat.status.ok:
            raise Unavailable(f"{self.endpoint.text}: STAT failed", _code(stat.status))
        try:
            count = int(stat.status.text.split()[0])
        except (ValueError, IndexError):
            raise Unavailable(f"{self.endpoint.text}: unreadable STAT answer") from None
        if not listed.status.ok or not uidl.status.ok:
            raise Unavailable(f"{self.endpoint.text}: LIST or UIDL failed")
        sizes = _numbered(listed.body or b"", count, self.endpoint.text, "LIST")
        uids = _numbered(uidl.body or b"", count, self.endpoint.text, "UIDL")
        result = []
        seen: set[str] = set()
        for number in range(1, count + 1):
            size_text, uid = sizes[number], uids[number]
            if not size_text.isdigit():
                raise Unavailable(f"{self.endpoint.text}: LIST size {size_text!r} is not a number")
            if not valid_uid(uid) or uid in seen:
                raise Unavailable(f"{self.endpoint.text}: UIDL {number} is not a valid unique id")
            seen.add(uid)
            result.append(ListedMessage(number, uid, int(size_text)))
        return result


def auth_is_user(credentials: Credentials, caps: dict[str, tuple[str, ...]]) -> bool:
    """USER/PASS toward this upstream (no SASL mechanism of the client's kind offered)."""
    mechanisms = {m.upper() for m in caps.get("SASL", ())}
    return credentials.mechanism not in ("XOAUTH2", "OAUTHBEARER") and "PLAIN" not in mechanisms


def valid_uid(uid: str) -> bool:
    """1 to 70 characters in 0x21-0x7E (RFC 1939); at C speed (ASCII, printable, no space),
    not a Python step per character."""
    return 0 < len(uid) <= 70 and uid.isascii() and uid.isprintable() and " " not in uid


def _numbered(body: bytes, count: int, where: str, what: str) -> dict[int, str]:
    """``n value`` lines numbered 1..count exactly."""
    out: dict[int, str] = {}
    for line in body.split(b"\r\n")[:-1]:
        parts = line.decode("ascii", "replace").split(" ")
        if len(parts) != 2 or not parts[0].isdigit():
            raise Unavailable(f"{where}: unreadable {what} line")
        out[int(parts[0])] = parts[1]
    if sorted(out) != list(range(1, count + 1)):
        raise Unavailable(f"{where}: {what} does not list messages 1..{count}")
    return out


def _code(status: Any) -> str:
    return status.code if status.code in _PASSED_CODES else "SYS/TEMP"


def _refuse(status: Any) -> None:
    """The upstream's -ERR to a login, as the backend error the session answers with."""
    code = status.code
    if code == "IN-USE":
        raise MailboxInUse("the upstream says the mailbox is in use")
    if code in _PASSED_CODES:
        raise Unavailable(f"the upstream refused the login with [{code}]", code)
    raise LoginRefused("the upstream refused the credentials")


def _atom(text: str) -> str:
    return "".join(ch for ch in text if ch.isalnum() or ch in "-_.")[:64] or "-"


@implementer(IMailbox)
class UpstreamMailbox:
    """One relayed session's maildrop: the upstream connection, logged in, with its listing."""

    def __init__(self, user: str, listing: Sequence[ListedMessage], protocol: UpstreamProtocol,
                 pipelining: bool, name: str) -> None:
        self.user = user
        self.listing = tuple(listing)
        self.protocol = protocol
        self.pipelining = pipelining
        self.name = name
        self._sizes = {m.key: m.size for m in self.listing}
        #: the Expect of each RETR, made once per message (immutable)
        self._retr_expect: dict[Hashable, Expect] = {}
        #: registered with the client's transport while a message streams (one per mailbox)
        self._producer: PausingProducer | None = None
        self._released = False
        #: set by the backend: pop3shield.metrics.UpstreamMetrics, or None
        self.metrics: Any = None

    def send_message(self, key: Hashable, lines: int | None, status: bytes,
                     consumer: Any, prefetch: Hashable | None = None) -> defer.Deferred[int]:
        """RETR or TOP upstream, passed through as it arrives (``prefetch`` is not used: the
        upstream reads its own disk)."""
        size = self._sizes.get(key)
        if size is None or self._released:
            return defer.fail(MessageUnavailable(f"no message {key!r}"))
        if lines is None:
            # the listed size, or two more when the upstream ends an unterminated last line
            expect = self._retr_expect.get(key)
            if expect is None:
                expect = self._retr_expect[key] = Expect(Kind.MULTI, exact_octets=size, final_crlf=True)
            command = b"RETR %d" % key
        else:
            # TOP sends a prefix of the message (plus a CRLF when it does not end in one)
            command, expect = b"TOP %d %d" % (key, lines), Expect(Kind.MULTI, max_octets=size + 2)
        if self._producer is None:
            self._producer = PausingProducer(self.protocol)
        relayed = _Relayed(self, command, status, consumer)
        d = self.protocol.request(command, expect, on_body=relayed.held.append, on_status=relayed.started)
        d.addCallbacks(relayed.finished, relayed.failed)
        return d

    def _unregister(self, consumer: Any) -> None:
        try:
            consumer.unregisterProducer()
        finally:
            self.protocol.resume()

    def commit(self, keys: Iterable[Hashable]) -> defer.Deferred[Sequence[Hashable]]:
        return defer.ensureDeferred(self._commit(tuple(keys)))

    async def _commit(self, keys: tuple[Hashable, ...]) -> Sequence[Hashable]:
        p = self.protocol
        failed: list[Hashable] = []
        self._released = True
        try:
            if self.pipelining:  # every DELE and the QUIT in one write
                *requests, quit_d = p.pipeline([*((b"DELE %d" % k, Kind.SINGLE) for k in keys),
                                                (b"QUIT", Kind.SINGLE)])
                replies = [await r for r in requests]
            else:
                replies = []
                for k in keys:
                    replies.append(await p.request(b"DELE %d" % k))
                quit_d = p.request(b"QUIT")
            failed = [k for k, r in zip(keys, replies) if not r.status.ok]
            bye = await quit_d
            if not bye.status.ok:
                log.warn("{name}: QUIT answered -ERR: the upstream may not have removed the messages",
                         name=self.name)
                failed = list(keys)
        except UpstreamFailure as exc:
            log.warn("{name}: UPDATE failed: {reason}", name=self.name, reason=str(exc))
            failed = list(keys)
        finally:
            p.close()
        return failed

    def release(self) -> None:
        """Close the upstream connection WITHOUT QUIT: the upstream deletes nothing."""
        self._released = True
        self.protocol.abort()


class _Relayed:
    """One RETR or TOP passing through: what one upstream read gave (status line, body pieces,
    terminator) goes to the client in one write, after the reader has checked all of it."""

    __slots__ = ("mailbox", "command", "consumer", "held", "written", "is_started", "asked")

    def __init__(self, mailbox: UpstreamMailbox, command: bytes, status: bytes, consumer: Any) -> None:
        self.mailbox = mailbox
        self.command = command
        self.consumer = consumer
        #: the client's status line first; the upstream's own is checked, not passed on
        self.held: list[bytes] = [status]
        self.written = 0
        self.is_started = False
        self.asked = mailbox.protocol.reactor.seconds() if mailbox.metrics is not None else 0.0

    def flush(self) -> None:
        held = self.held
        if held:
            data = held[0] if len(held) == 1 else b"".join(held)
            held.clear()
            self.consumer.write(data)
            self.written += len(data)

    def started(self, _status: Any) -> None:
        """The upstream said +OK: from now on the client's transport may pause the upstream."""
        box = self.mailbox
        if box.metrics is not None:
            box.metrics.observe_upstream(box.protocol.reactor.seconds() - self.asked)
        self.is_started = True
        self.consumer.registerProducer(box._producer, True)
        box.protocol.after_read = self.flush

    def finished(self, _reply: Any) -> int:
        box = self.mailbox
        if not self.is_started:
            raise MessageUnavailable(f"{box.name}: the upstream answered -ERR to {self.command.decode()}")
        box.protocol.after_read = None
        self.held.append(b".\r\n")
        self.flush()
        box._unregister(self.consumer)
        return self.written

    def failed(self, failure: Any) -> Any:
        box = self.mailbox
        command = self.command.decode()
        box.protocol.after_read = None
        self.held.clear()  # a response cut off: what it held never reaches the client
        if self.is_started:
            box._unregister(self.consumer)
            log.warn("{name}: {command} cut off: {reason}", name=box.name, command=command,
                     reason=failure.getErrorMessage())
        elif failure.check(MessageUnavailable):
            return failure  # the upstream answered -ERR: the session goes on
        else:
            log.warn("{name}: {command} failed: {reason}", name=box.name, command=command,
                     reason=failure.getErrorMessage())
        # a broken, hostile or vanished upstream: the client's session cannot go on either
        if box.metrics is not None:
            error = failure.value
            box.metrics.upstream_error("protocol" if getattr(error, "violation", False) else
                                       "timeout" if "no answer within" in str(error) else "closed")
        box.release()
        raise BackendBroken(f"{box.name}: {command}: {failure.getErrorMessage()}")
