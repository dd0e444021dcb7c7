"""Mail backends: where a logged-in session's mail comes from.

The sans-I/O session owns the POP3 dialogue. It screens every line, renders STAT, LIST, UIDL and
the ``+OK n octets`` line of RETR from the listing, keeps the deletion marks, and only after QUIT
asks for a commit. A backend supplies what the session cannot know:

* :meth:`IBackend.login`: check the credentials (or let the upstream check them) and open the
  user's maildrop exclusively, with its listing;
* :meth:`IMailbox.send_message`: one message (RETR) or its head (TOP) as final wire bytes;
* :meth:`IMailbox.commit`: the UPDATE state; :meth:`IMailbox.release`: the end without it.

Every call is asynchronous (Deferreds, push producers): a backend never blocks the reactor. Two
implementations: :mod:`pop3shield.backends.maildir` (a local Maildir, disk work in threads) and
:mod:`pop3shield.backends.upstream` (relayed to an upstream POP3 server).

Errors a backend raises, and what the client is told:

=====================  ===============================================================
:class:`LoginRefused`  ``-ERR [AUTH]`` after the failure delay (wrong password, no route)
:class:`MailboxInUse`  ``-ERR [IN-USE]``
:class:`Unavailable`   ``-ERR [code] text`` (``SYS/TEMP``, ``SYS/PERM``, ``LOGIN-DELAY``)
=====================  ===============================================================
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:  # pragma: no cover
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IConsumer

__all__ = [
    "BackendBroken",
    "BackendError",
    "ClientInfo",
    "Credentials",
    "IBackend",
    "IMailbox",
    "ListedMessage",
    "LoginRefused",
    "MailboxInUse",
    "MessageUnavailable",
    "Unavailable",
]


@dataclass(frozen=True)
class Credentials:
    """What the client sent to prove who it is; the secret never reaches a repr or a log."""

    username: str
    #: the password (USER/PASS, PLAIN, LOGIN), the APOP digest, or a SASL token (XOAUTH2, OAUTHBEARER)
    secret: bytes = field(repr=False)
    #: ``USER``, ``PLAIN``, ``LOGIN``, ``APOP``, ``XOAUTH2`` or ``OAUTHBEARER``
    mechanism: str
    #: the greeting's timestamp, for APOP only
    challenge: bytes | None = None


@dataclass(frozen=True)
class ClientInfo:
    """Who is connected, for access rules, routing and the upstream (XCLIENT, PROXY protocol)."""

    session: str
    address: str | None
    port: int | None
    server_address: str | None = None
    server_port: int | None = None
    #: the attempt's place in the hashing queue (pop3shield.hashpool): 0 this user logged in from
    #: this address lately, 1 no failures, 2 its address or pair has recent failures
    standing: int = 1


@dataclass(frozen=True)
class ListedMessage:
    """One message of the listing: what the session needs to answer STAT, LIST, UIDL and RETR."""

    #: what the backend finds the message by (a Maildir key, the upstream's message number)
    key: Hashable
    #: the UIDL, 1-70 characters in 0x21-0x7E
    uid: str
    #: octets RETR delivers (CRLF line ends, before dot-stuffing), as LIST announces them
    size: int


class BackendError(Exception):
    """Base of what a backend reports; its text is for the operator's log, never for the client."""


class LoginRefused(BackendError):
    """The credentials do not open a maildrop: answered like a wrong password.

    ``reason`` is operator-written text that may be shown (a passwd file's ``nologin reason=``);
    ``nodelay`` skips the failure delay (the password was right).
    """

    def __init__(self, message: str = "invalid credentials", *, reason: str | None = None,
                 nodelay: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.nodelay = nodelay


class MailboxInUse(BackendError):
    """Another session holds the maildrop (RFC 2449 ``[IN-USE]``)."""


class Unavailable(BackendError):
    """The backend cannot serve now or ever; ``code`` is the RFC 2449/3206 response code.

    ``text`` is what the client is told, safe to send (printable ASCII, no internal detail).
    """

    def __init__(self, message: str, code: str = "SYS/TEMP",
                 text: str = "Temporary server problem, try again later.", *, broken: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.text = text
        #: the backend broke the protocol (an upstream's malformed or unsolicited response):
        #: besides the log line, a ``backend`` record goes to the event file
        self.broken = broken


class MessageUnavailable(BackendError):
    """A message cannot be sent as listed; raised before its first byte (``-ERR [SYS/TEMP]``)."""


class BackendBroken(MessageUnavailable):
    """The backend broke off or broke the protocol while sending a message (a relay's upstream
    sent a malformed, oversized or unsolicited response, stalled or went away).

    The session cannot go on: before the first byte the client gets ``-ERR [SYS/TEMP]`` and the
    connection is closed, after it the connection is cut; either way a ``backend`` record goes
    to the event file, so that a hostile upstream is as visible as a hostile client.
    """


class IBackend(Interface):
    """Opens maildrops. One instance serves every connection of the server."""

    def login(credentials: Credentials, client: ClientInfo) -> Deferred[IMailbox]:
        """Authenticate and open the user's maildrop exclusively, with its listing.

        Fails with :class:`LoginRefused`, :class:`MailboxInUse` or :class:`Unavailable`. An
        unknown user and a wrong password fail alike, in text and in time.
        """


class IMailbox(Interface):
    """One user's maildrop, open and locked for one session."""

    user = Attribute("the login name the maildrop belongs to")
    listing = Attribute("Sequence[ListedMessage] in message-number order, fixed for the session")

    def send_message(key: Hashable, lines: int | None, status: bytes,
                     consumer: IConsumer, prefetch: Hashable | None = None) -> Deferred[int]:
        """Write ``status``, then the message (``lines`` is None for RETR, else TOP's line count)
        as final wire bytes (CRLF, dot-stuffed, terminated by ``.`` CRLF) to ``consumer``.

        ``prefetch`` is a hint: the key of the next live message, which clients that walk the
        maildrop ask for next (the Maildir opens it ahead; a backend may ignore it).

        Honours backpressure (a registered push producer for anything large). Fires with the
        octets written. Fails with :class:`MessageUnavailable` when nothing was written (the
        session then answers ``-ERR [SYS/TEMP]``); any failure after the first byte means the
        response cannot be completed, and the connection is aborted. A RETR never writes a body
        of another size than :attr:`ListedMessage.size` promised.
        """

    def commit(keys: Iterable[Hashable]) -> Deferred[Sequence[Hashable]]:
        """The UPDATE state: remove these messages and release the maildrop.

        Fires with the keys that could not be removed (the session then answers ``-ERR``).
        """

    def release() -> None:
        """End the session without UPDATE: nothing is removed (idempotent)."""

