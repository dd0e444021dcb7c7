"""What the session asks its I/O layer to do.

The session never touches a socket, a file or a clock. It returns these values in order; the
Twisted layer carries them out and reports results back through the session's methods
(``login_succeeded``, ``stream_finished``, ``listing_sent``, ``commit_finished``,
``analysis_finished``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Hashable

from pop3shield.core.protections import SecurityEvent


@dataclass(frozen=True)
class Send:
    """Write these bytes to the client."""

    data: bytes


@dataclass(frozen=True)
class SendListing:
    """Write these chunks to the client in order, each only when the client has taken the ones
    before (backpressure), then answer with listing_sent.

    A multi-line LIST or UIDL of a large maildrop: the chunks (status line, a few hundred
    lines each, the terminator) are made as they are pulled, never the whole listing at once.
    """

    chunks: Iterator[bytes] = field(repr=False, compare=False)


@dataclass(frozen=True)
class Close:
    """Close the connection once everything sent so far is flushed."""

    reason: str


@dataclass(frozen=True)
class Authenticate:
    """Check credentials and open the maildrop; answer with login_succeeded/login_failed.

    ``mechanism`` is ``USER`` (USER/PASS), ``PLAIN``, ``LOGIN``, ``APOP``, ``XOAUTH2`` or
    ``OAUTHBEARER``. For APOP, ``secret`` is the client's digest and ``challenge`` the greeting's
    timestamp; for the OAuth mechanisms (upstream mode only) it is the decoded SASL message.
    """

    username: str
    secret: bytes = field(repr=False)
    mechanism: str
    challenge: bytes | None = None


@dataclass(frozen=True)
class StreamMessage:
    """Open the message, send ``status``, then the dot-stuffed body; answer with stream_finished.

    If the message cannot be opened, send nothing and call stream_failed instead.
    """

    key: Hashable
    status: bytes
    #: None for RETR; the TOP line count otherwise
    body_lines: int | None
    #: the next live message, which clients that walk the maildrop will ask for next
    prefetch: Hashable | None = None


@dataclass(frozen=True)
class Commit:
    """The UPDATE state: remove these messages, release the maildrop; answer with commit_finished."""

    delete: tuple[Hashable, ...]


@dataclass(frozen=True)
class Analyze:
    """Run the slow malicious-code analysis on these arguments; answer with analysis_finished."""

    arguments: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True)
class Report:
    """Log this security event."""

    event: SecurityEvent


@dataclass(frozen=True)
class LoggedIn:
    """The client is authenticated and its maildrop is open (for the server log)."""

    username: str
    mechanism: str
    messages: int
    octets: int


@dataclass(frozen=True)
class StartTLS:
    """Start the TLS handshake now (the ``+OK`` before it is already sent); answer with tls_started.

    Everything the client sent after the STLS line is already discarded (CVE-2011-0411): the
    next bytes the session sees must come through TLS.
    """


Action = Send | SendListing | Close | Authenticate | StreamMessage | Commit | Analyze | Report | LoggedIn | StartTLS
