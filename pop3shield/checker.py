"""A ``twisted.cred`` checker backed by a Dovecot passwd file.

Hash verification is slow on purpose, so it runs in a thread pool and never on the reactor
thread.  Unknown users are verified against a dummy entry as costly as the file's costliest
kind, and the protocol answers every failed login at a deadline fixed on arrival, so the reply
time does not reveal which accounts exist.  The file is re-read when it changes (cheap ``os.stat`` per
request, in the worker thread); a broken new version is logged and the last good one kept, so a
half-saved file cannot lock everybody out or let anybody in.

The entries' extra fields decide who may log in, checked only after the password verified, in
Dovecot's order (so a guesser learns nothing from them): ``allow_nets`` refuses other client
addresses exactly like a wrong password; ``nologin`` (and ``fail``) refuses with
:class:`LoginDisabled`, whose ``reason`` is the operator's text for the client and whose
``nodelay`` asks for the answer without the failure delay.  The client address comes from the
credentials' ``client_address`` attribute (:class:`AddressedCredentials`); credentials without
one cannot pass an ``allow_nets`` entry.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from pop3shield.credentials import AddressedCredentials
from pop3shield.hashpool import CLEAN, HashPool
from pop3shield.passwd import (
    PLAIN,
    PasswdEntry,
    PasswdError,
    dummy_entry_costliest,
    load_passwd,
    verify_password,
)

__all__ = ["AddressedCredentials", "LoginDisabled", "PasswdFileChecker"]


class LoginDisabled(UnauthorizedLogin):
    """The password verified but the account may not log in (``nologin``/``fail``)."""

    def __init__(self, reason: str | None = None, nodelay: bool = False) -> None:
        super().__init__("invalid credentials")
        #: operator-written text for the client (printable ASCII, checked at load), or None
        self.reason = reason
        self.nodelay = nodelay


#: "the credentials did not say where the client is": never matches allow_nets
_UNKNOWN_ADDRESS = object()


class _Refused:
    """A worker-thread verdict: the password was right, the account's policy said no.

    ``disabled`` is the entry when it is a nologin/fail refusal (:class:`LoginDisabled`); None
    for one that must look exactly like a wrong password (allow_nets).
    """

    def __init__(self, user: str, why: str, disabled: PasswdEntry | None = None) -> None:
        self.user = user
        self.why = why
        self.disabled = disabled


#: the file's identity and version: replaced (new inode), rewritten (mtime) or resized
_Stamp = tuple[int, int, int, int]


def _stamp(path: str) -> _Stamp:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _username(value: Any) -> str | None:
    """User names are compared as str; undecodable bytes cannot match any entry."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def _password(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value) if isinstance(value, (bytes, bytearray)) else b""


@implementer(ICredentialsChecker)
class PasswdFileChecker:
    """Checks IUsernamePassword credentials against a passwd file; avatar id = UTF-8 user name."""

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)
    log = Logger()

    def __init__(
        self,
        path: str,
        *,
        allow_plaintext: bool = False,
        threadpool: Any = None,
        reactor: Any = None,
    ) -> None:
        self.path = os.fspath(path)
        self._allow_plaintext = allow_plaintext
        self._threadpool = threadpool
        self._reactor = reactor
        self._lock = threading.Lock()
        self._failed_stamp: _Stamp | None = None
        # Load now so a bad file stops start-up (raises PasswdError).
        stamp = _stamp_or_error(self.path)
        self._install(load_passwd(self.path, allow_plaintext=allow_plaintext), stamp)

    # ------------------------------------------------------------------ public API

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[bytes]:
        """Verify in the thread pool; fire with the user name as bytes or UnauthorizedLogin."""
        user = _username(getattr(credentials, "username", None))
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor  # noqa: PLC0415 - the global one, only if asked
        pool = self._threadpool if self._threadpool is not None else reactor.getThreadPool()
        address = getattr(credentials, "client_address", _UNKNOWN_ADDRESS)
        if IUsernamePassword.providedBy(credentials):
            password = _password(getattr(credentials, "password", None))
            d = _in_pool(reactor, pool, credentials, self._check, user, password, address)
        else:
            d = _in_pool(reactor, pool, credentials, self._check_hashed, user, credentials, address)
        d.addCallback(self._result, address)
        return d

    def reload(self) -> int:
        """BLOCKING (call it in a thread): re-read the file now, changed or not (SIGHUP); the user count.

        A broken file raises PasswdError and the previous users stay.
        """
        with self._lock:
            stamp = _stamp_or_error(self.path)
            try:
                entries = load_passwd(self.path, allow_plaintext=self._allow_plaintext)
            except PasswdError:
                self._failed_stamp = stamp  # reported by the caller: the next login does not log it again
                raise
            self._install(entries, stamp)
        return len(entries)

    def verify_then(self, credentials: Any, then: Any) -> defer.Deferred[tuple[bytes, Any]]:
        """:meth:`requestAvatarId` for USER/PASS credentials, plus ``then(user)`` in the same
        worker thread once the password verified and the entry may log in (a login that opens its
        mailbox is one thread hop, not two); fires with ``(avatar id, what then returned)``."""
        user = _username(getattr(credentials, "username", None))
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor  # noqa: PLC0415 - the global one, only if asked
        pool = self._threadpool if self._threadpool is not None else reactor.getThreadPool()
        address = getattr(credentials, "client_address", _UNKNOWN_ADDRESS)
        password = _password(getattr(credentials, "password", None))

        def blocking() -> tuple[str | _Refused | None, Any]:
            verdict = self._check(user, password, address)
            return verdict, (then(verdict) if isinstance(verdict, str) else None)
        d = _in_pool(reactor, pool, credentials, blocking)
        d.addCallback(lambda pair: (self._result(pair[0], address), pair[1]))
        return d

    @property
    def users(self) -> frozenset[str]:
        """The user names currently loaded (for diagnostics; never exposes hashes)."""
        return frozenset(self._state[0])

    # ------------------------------------------------------------------ worker thread

    def _check(self, user: str | None, password: bytes,
               address: Any = _UNKNOWN_ADDRESS) -> str | _Refused | None:
        """Runs in a worker thread: BLOCKING hash verification, then the entry's login policy."""
        self._reload_if_changed()
        entries, dummy = self._state
        entry = entries.get(user) if user is not None else None
        if entry is None:
            verify_password(dummy, password)  # same cost as a real user: no enumeration oracle
            return None
        return _policy(entry, address) if verify_password(entry, password) else None

    def _check_hashed(self, user: str | None, credentials: Any,
                      address: Any = _UNKNOWN_ADDRESS) -> str | _Refused | None:
        """APOP and the like: only a plaintext entry can answer a challenge-response digest."""
        self._reload_if_changed()
        entries, dummy = self._state
        entry = entries.get(user) if user is not None else None
        # one path for every kind of entry: the dummy's hash is paid by unknown, hashed and
        # {PLAIN} entries alike, so the cost of an APOP says nothing about the account
        verify_password(dummy, b"")
        if entry is None or entry.scheme != PLAIN:
            return None
        try:
            matched = bool(credentials.checkPassword(entry.hash.encode("utf-8")))
        except Exception:  # noqa: BLE001 - a broken credentials object is a failed login
            matched = False
        return _policy(entry, address) if matched else None

    def _reload_if_changed(self) -> None:
        try:
            stamp = _stamp(self.path)
        except OSError as exc:
            self._report_failure(None, f"{self.path}: cannot stat: {exc.strerror or exc}")
            return
        if self._failed_stamp == _GONE:
            self._failed_stamp = None  # it is back: a later disappearance is news again
        if stamp == self._loaded_stamp:
            return
        with self._lock:
            if stamp in (self._loaded_stamp, self._failed_stamp):
                return
            try:
                entries = load_passwd(self.path, allow_plaintext=self._allow_plaintext)
            except PasswdError as exc:
                self._report_failure(stamp, str(exc))
                return
            self._install(entries, stamp)
            self.log.info("reloaded {path}: {count} users", path=self.path, count=len(entries))

    def _install(self, entries: dict[str, PasswdEntry], stamp: _Stamp) -> None:
        """Swap in a new user table in one assignment, so readers never see a mix."""
        disabled = sum(1 for entry in entries.values() if entry.nologin)
        restricted = sum(1 for entry in entries.values() if entry.allow_nets is not None)
        if disabled or restricted:
            self.log.info("{path}: {disabled} users with nologin, {restricted} with allow_nets",
                          path=self.path, disabled=disabled, restricted=restricted)
        # the costliest kind of the file (a failed login's deadline hides the rest of the timing)
        self._state = (entries, dummy_entry_costliest(entries.values()))
        self._loaded_stamp = stamp
        self._failed_stamp = None

    def _report_failure(self, stamp: _Stamp | None, message: str) -> None:
        """Log once per broken version; keep serving the last good table."""
        if stamp is not None and stamp == self._failed_stamp:
            return
        if stamp is None and self._failed_stamp == _GONE:
            return
        self._failed_stamp = stamp if stamp is not None else _GONE
        self.log.error("passwd file not reloaded, keeping the previous users: {problem}", problem=message)

    # ------------------------------------------------------------------ reactor thread

    def _result(self, user: str | _Refused | None, address: Any) -> bytes:
        if isinstance(user, _Refused):
            where = address if isinstance(address, str) else (
                "a connection without an IP address" if address is None else "an unknown address")
            self.log.info("login refused for user={user} from {address}: {why}", user=user.user,
                          address=where, why=user.why)
            if user.disabled is not None:
                raise LoginDisabled(user.disabled.reason, user.disabled.nodelay)
            user = None
        if user is None:
            # One message for unknown user and wrong password alike.
            raise UnauthorizedLogin("invalid credentials")
        return user.encode("utf-8")


def _in_pool(reactor: Any, pool: Any, credentials: Any, function: Any, *args: Any) -> defer.Deferred[Any]:
    """``function(*args)`` in the hashing threads; a :class:`~pop3shield.hashpool.HashPool` serves
    them by ``credentials.standing``."""
    if isinstance(pool, HashPool):
        return pool.run(getattr(credentials, "standing", CLEAN), function, *args)
    return deferToThreadPool(reactor, pool, function, *args)


def _policy(entry: PasswdEntry, address: Any) -> str | _Refused:
    """After the password verified: may this entry log in from this address? (Dovecot's order)"""
    if entry.allow_nets is not None:
        if address is _UNKNOWN_ADDRESS or not entry.allows_address(address):
            return _Refused(entry.user, "address not in allow_nets")  # answered as a wrong password
    if entry.nologin:
        return _Refused(entry.user, "fail" if "fail" in entry.extra else "nologin", entry)
    return entry.user


#: marks "the file could not even be stat'ed" so that, too, is logged only once
_GONE: _Stamp = (-1, -1, -1, -1)


def _stamp_or_error(path: str) -> _Stamp:
    try:
        return _stamp(path)
    except OSError as exc:
        raise PasswdError(path, None, f"cannot read: {exc.strerror or exc}") from None
