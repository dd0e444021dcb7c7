"""The ``twisted.cred`` realm: an authenticated user name becomes an open maildrop.

The realm is pluggable (``auth.realm = "module:attribute"`` in the config); whatever it returns
for :class:`IMaildrop` must offer the blocking methods below, which the protocol calls in the
thread pool, never on the reactor.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, BinaryIO

from twisted.cred.portal import IRealm
from zope.interface import Attribute, Interface, implementer

from pop3shield.maildir import Maildir, MessageInfo

#: seconds a login waits for the mailbox lock before ``[IN-USE]`` (Dovecot waits up to 10): the
#: client that reconnects at once after its connection ended must not find its own old lock
LOCK_WAIT = 1.0

#: characters that may never appear in a login name used to build a path
_FORBIDDEN = ("/", "\\", "\x00")


class UnsafeUsername(ValueError):
    """A login name that could escape the maildir root."""


class IMaildrop(Interface):
    """A user's mail as a POP3 session needs it. Every method may block."""

    user = Attribute("the login name")

    def open() -> Sequence[MessageInfo]:
        """Lock the maildrop exclusively and list its messages (MailboxInUse if locked)."""

    def open_message(key: Any) -> BinaryIO:
        """A binary file object with the message's raw bytes."""

    def commit(keys: Iterable[Any]) -> list[Any]:
        """Remove these messages, release the lock; return the keys that could not be removed."""

    def release() -> None:
        """Release the lock without removing anything (idempotent)."""


def check_username(name: str) -> str:
    """Refuse any name that could leave the root once put into a path pattern."""
    if not name or name.startswith(".") or ".." in name or any(c in name for c in _FORBIDDEN):
        raise UnsafeUsername("login name is not safe for a path")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise UnsafeUsername("login name has control characters")
    return name


@implementer(IMaildrop)
class MaildirMaildrop:
    """A Maildir under the pattern's root; created on first login as Dovecot does.

    With ``root`` (the directory the pattern puts ``{user}`` in), no directory below the root
    may be a symlink (a symlinked user directory, Maildir, cur/ or new/ refuses the login with
    MailboxError, which the session answers with ``-ERR [SYS/TEMP]``), and only the Maildir
    directory itself is created, never a missing parent.
    """

    def __init__(self, user: str, path: str, root: str | None = None) -> None:
        self.user = user
        self.path = path
        self.root = root
        self._store: Maildir | None = None

    def open(self) -> Sequence[MessageInfo]:
        if self.root is not None:
            store = Maildir(self.path, create=True, root=self.root)
        else:
            parent = os.path.dirname(self.path.rstrip(os.sep))
            create = not os.path.isdir(self.path) and os.path.isdir(parent)
            store = Maildir(self.path, create=create)
        self._store = store
        try:
            store.lock(wait=LOCK_WAIT)
            return store.scan()
        except BaseException:
            store.close()
            raise

    def _opened(self) -> Maildir:
        if self._store is None:
            raise RuntimeError("maildrop is not open")
        return self._store

    def open_message(self, key: Any) -> BinaryIO:
        return self._opened().open_message(key)

    def commit(self, keys: Iterable[Any]) -> list[Any]:
        store = self._opened()
        try:
            return store.delete(keys)
        finally:
            store.close()

    def release(self) -> None:
        if self._store is not None:
            self._store.close()

    def try_release(self) -> bool:
        """:meth:`release` at once if it cannot wait (no other thread in the Maildir); else False."""
        return self._store is None or self._store.try_close()


@implementer(IRealm)
class MaildirRealm:
    """Maps a user to ``pattern.format(user=name)``, refusing names that could escape the root."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    @property
    def root(self) -> str:
        """The directory ``{user}`` is put in: trusted; nothing below it may be a symlink."""
        return os.path.dirname(self.pattern.split("{user}", 1)[0] + "x")

    def path_for(self, name: str) -> str:
        path = self.pattern.replace("{user}", check_username(name))
        root = self.root
        if os.path.commonpath([os.path.abspath(path), os.path.abspath(root)]) != os.path.abspath(root):
            raise UnsafeUsername("login name leaves the maildir root")
        return path

    def requestAvatar(self, avatarId: bytes | str, mind: object, *interfaces: Any) -> tuple[Any, Any, Callable[[], None]]:
        if IMaildrop not in interfaces:
            raise NotImplementedError("MaildirRealm only provides IMaildrop")
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        drop = MaildirMaildrop(name, self.path_for(name), self.root)
        return IMaildrop, drop, drop.release
