"""The local Maildir backend: a ``twisted.cred`` portal in front of blocking maildrops.

:class:`MaildirBackend` logs in through the portal (the passwd-file checker, the realm, or a
custom ``auth.realm``) and opens the :class:`~pop3shield.realm.IMaildrop` the realm returns. The
maildrop's methods block (disk, locks), so every one of them runs through ``offload`` (the thread
pool), never on the reactor. The passwd file's refusals become :class:`LoginRefused`
(``nologin reason=`` as its ``reason``, ``nodelay``), a held lock :class:`MailboxInUse`, a
missing or unsafe Maildir :class:`Unavailable`.

:class:`MaildirMailbox` streams messages with :class:`~pop3shield.streaming.MessageSender`: a push
producer with backpressure, one message opened ahead (:class:`~pop3shield.streaming.Prefetch`), and
the size guarantee: a RETR sends exactly the size the listing announced, or fails before its
first byte (:class:`MessageUnavailable`), or is cut off mid-message (any other failure).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import LoginFailed, UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pop3shield.backends import (
    ClientInfo,
    Credentials,
    IBackend,
    IMailbox,
    LoginRefused,
    MailboxInUse,
    MessageUnavailable,
    Unavailable,
)
from pop3shield.checker import LoginDisabled, PasswdFileChecker
from pop3shield.core.dotstuff import DotStuffer
from pop3shield.credentials import AddressedCredentials, APOPCredentials
from pop3shield.maildir import MailboxError
from pop3shield.maildir import MailboxInUse as MaildirLocked
from pop3shield.realm import IMaildrop, MaildirRealm, UnsafeUsername
from pop3shield.streaming import MessageSender, Offload, Prefetch, SizeMismatch

__all__ = ["MaildirBackend", "MaildirMailbox"]

log = Logger(namespace="pop3shield.server")

#: what the portal's checkers and realm raise for credentials that do not open a maildrop
_REFUSALS = (UnauthorizedLogin, UnhandledCredentials, LoginFailed, UnsafeUsername)


@implementer(IBackend)
class MaildirBackend:
    """Logins through a ``twisted.cred`` portal whose realm provides :class:`IMaildrop`."""

    def __init__(self, portal: Portal, offload: Offload) -> None:
        self.portal = portal
        #: runs a blocking callable in the thread pool, returning a Deferred of its result
        self.offload = offload

    def login(self, credentials: Credentials, client: ClientInfo) -> defer.Deferred[MaildirMailbox]:
        username = credentials.username.encode("utf-8")
        if credentials.mechanism == "APOP":
            checked: Any = APOPCredentials(username, credentials.challenge or b"", credentials.secret, client.address)
            checked.standing = client.standing
        else:
            checked = AddressedCredentials(username, credentials.secret, client.address, client.standing)
        d = self._one_hop(checked)
        if d is None:
            d = self.portal.login(checked, None, IMaildrop)
            d.addCallback(self._open)
        d.addErrback(self._translate)
        return d

    def _one_hop(self, checked: Any) -> defer.Deferred[MaildirMailbox] | None:
        """The default setup (passwd file, Maildir realm, USER/PASS or SASL): verify the password and
        open the maildrop in one thread call. Other checkers, realms and APOP go through the portal."""
        realm = self.portal.realm
        checker = self.portal.checkers.get(IUsernamePassword)
        if type(realm) is not MaildirRealm or not isinstance(checker, PasswdFileChecker) or \
                not IUsernamePassword.providedBy(checked):
            return None

        def open_maildrop(user: str) -> tuple[Any, Any]:  # in the worker thread
            _, maildrop, _ = realm.requestAvatar(user, None, IMaildrop)
            return maildrop, maildrop.open()
        d = checker.verify_then(checked, open_maildrop)
        d.addCallback(lambda verified: MaildirMailbox(verified[1][0], verified[1][1], self.offload))
        return d

    def _open(self, result: tuple[Any, Any, Any]) -> defer.Deferred[MaildirMailbox]:
        _, maildrop, _ = result
        d = self.offload(maildrop.open)
        d.addCallback(lambda entries: MaildirMailbox(maildrop, entries, self.offload))
        return d

    @staticmethod
    def _translate(failure: Failure) -> Failure:
        """The portal's and the Maildir's exceptions as the backend contract's errors."""
        if failure.check(MaildirLocked):
            raise MailboxInUse(str(failure.value) or "mailbox is locked")
        if failure.check(LoginDisabled):
            disabled = failure.value
            raise LoginRefused("login disabled", reason=disabled.reason or None, nodelay=disabled.nodelay)
        if failure.check(*_REFUSALS):
            raise LoginRefused(str(failure.value) or "invalid credentials")
        if failure.check(MailboxError):
            raise Unavailable(f"maildrop unavailable: {failure.value}")
        return failure


@implementer(IMailbox)
class MaildirMailbox:
    """One user's open and locked maildrop; blocking calls go through ``offload``."""

    def __init__(self, maildrop: Any, listing: Sequence[Any], offload: Offload) -> None:
        self.maildrop = maildrop
        self.user = maildrop.user
        self.listing = tuple(listing)
        self.offload = offload
        self._prefetch = Prefetch(offload, maildrop)
        # a RETR must send exactly the size LIST and its status line announce
        self._promised = {entry.key: entry.size for entry in self.listing}
        self._sender: MessageSender | None = None
        self._ended = False

    def send_message(self, key: Hashable, lines: int | None, status: bytes, consumer: IConsumer,
                     prefetch: Hashable | None = None) -> defer.Deferred[int]:
        if self._ended:
            return defer.fail(MessageUnavailable("the maildrop is released"))
        opening = self._prefetch.take(key)
        self._prefetch.start(prefetch)
        done: defer.Deferred[int] = defer.Deferred()
        opening.addCallbacks(self._start, self._open_failed, callbackArgs=(key, lines, status, consumer, done),
                             errbackArgs=(done,))
        return done

    def _start(self, opened: tuple[Any, bytes], key: Hashable, lines: int | None, status: bytes,
               consumer: IConsumer, done: defer.Deferred[int]) -> None:
        source, first = opened
        if self._ended:
            source.close()
            done.errback(MessageUnavailable("the maildrop is released"))
            return
        expected = self._promised.get(key) if lines is None else None  # TOP: no promise
        self._sender = MessageSender(consumer, source, DotStuffer(lines), self.offload, expected=expected)
        d = self._sender.start(first, prefix=status)
        d.addBoth(self._sent)
        d.addErrback(self._send_failed)
        d.chainDeferred(done)

    def _sent(self, result: Any) -> Any:
        self._sender = None
        return result

    @staticmethod
    def _open_failed(failure: Failure, done: defer.Deferred[int]) -> None:
        done.errback(MessageUnavailable(failure.getErrorMessage()))

    @staticmethod
    def _send_failed(failure: Failure) -> Failure:
        """A size mismatch found before the first byte still allows an ``-ERR``; later, nothing does."""
        if failure.check(SizeMismatch) and failure.value.before_first_byte:
            raise MessageUnavailable(f"message changed since login: {failure.getErrorMessage()}")
        return failure

    def commit(self, keys: Iterable[Hashable]) -> defer.Deferred[Sequence[Hashable]]:
        self._ended = True
        self._prefetch.discard()
        keys = tuple(keys)
        if not keys and self._released_inline():
            return defer.succeed([])  # nothing to delete: the lock dropped without a thread hop
        return self.offload(self.maildrop.commit, keys)

    def _released_inline(self) -> bool:
        """A maildrop that can release at once without waiting (ours: close descriptors, drop the flock)."""
        try_release = getattr(self.maildrop, "try_release", None)
        return try_release is not None and try_release()

    def release(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self._sender is not None:
            self._sender.stopProducing()
            self._sender = None
        self._prefetch.discard()
        if self._released_inline():
            return
        self.offload(self.maildrop.release).addErrback(
            lambda failure: log.failure("maildrop release failed for user={user}", failure, user=self.user))

