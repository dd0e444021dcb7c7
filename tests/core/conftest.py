"""Helpers for driving the sans-I/O core: a session driver, message entries, verdicts.

The helpers are handed to tests through fixtures (``kit``, ``make_driver``) rather than imported
from this module, because ``conftest`` is not a unique module name in this repository.

The :class:`Driver` plays the I/O layer: it feeds bytes, collects every action, keeps a transcript
of what the client would receive, and (unless told otherwise) answers the busy actions the way the
Twisted layer does:

* ``Authenticate`` -> ``login_succeeded(entries)`` for a known user and secret, else
  ``login_failed()``;
* ``StreamMessage`` -> the status line and a dot-stuffed fake body go into the transcript, then
  ``stream_finished()``;
* ``SendListing`` -> every chunk goes into the transcript, then ``listing_sent()``;
* ``Commit`` -> ``commit_finished()``;
* ``Analyze`` -> ``analysis_finished`` with the verdicts of ``analysis`` (clean by default).
"""

from __future__ import annotations

import base64
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from pop3shield.core import actions as A
from pop3shield.core.dotstuff import stuff
from pop3shield.core.session import Session
from pop3shield.core.settings import (
    PROTECTION_KEYS,
    Action,
    ProtectionsConfig,
    ProtectionSettings,
    SessionSettings,
)

USER = "bob"
PASSWORD = b"s3cret-Pa55word"
NOP_MARK = b"\x90\x90\x90\x90"
FORMAT_MARK = b"%n%n%n%n"
SLOW_MARK = b"SLOWPATH"
BUSY_TYPES = (A.Authenticate, A.StreamMessage, A.SendListing, A.Commit, A.Analyze)


@dataclass(frozen=True)
class Entry:
    """A maildrop entry as the session sees it."""

    key: Any
    uid: str
    size: int


@dataclass(frozen=True)
class Verdict:
    """A malicious-code verdict (the shape of pop3shield.mcp.Verdict)."""

    malicious: bool
    reasons: tuple[str, ...] = ()


CLEAN = Verdict(False, ())


def clean_check(arg: bytes, field_: str) -> Verdict:
    """A fast tier that finds nothing."""
    return CLEAN


def marker_check(arg: bytes, field_: str) -> Verdict | None:
    """Flags a NOP sled or a format string; asks for the slow tier on SLOWPATH."""
    if NOP_MARK in arg:
        return Verdict(True, ("nop sled",))
    if FORMAT_MARK in arg:
        return Verdict(True, ("format string",))
    if SLOW_MARK in arg:
        return None
    return CLEAN


def slow_analysis(arguments: Sequence[bytes]) -> list[Any]:
    """The slow tier: malicious when an argument holds the word EVIL."""
    return [Verdict(b"EVIL" in arg, ("shellcode",) if b"EVIL" in arg else ()) for arg in arguments]


def default_entries() -> list[Entry]:
    return [Entry("k1", "uid-1", 10), Entry("k2", "uid-2", 20)]


def protections(default: Action | None = None, /, **overrides: Any) -> ProtectionsConfig:
    """A ProtectionsConfig: every key at ``default`` (if given), then keyword overrides.

    A keyword that names a protection may be an :class:`Action` (wrapped in ProtectionSettings);
    anything else is passed through (thresholds, strict_crlf, ...).
    """
    kwargs: dict[str, Any] = {}
    if default is not None:
        kwargs.update({key: ProtectionSettings(default) for key in PROTECTION_KEYS})
    for key, value in overrides.items():
        if key in PROTECTION_KEYS and isinstance(value, Action):
            value = ProtectionSettings(value)
        kwargs[key] = value
    return ProtectionsConfig(**kwargs)


def make_settings(default: Action | None = None, /, settings: dict[str, Any] | None = None,
                  **overrides: Any) -> SessionSettings:
    return SessionSettings(protections=protections(default, **overrides), **(settings or {}))


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def plain_blob(user: str = USER, password: bytes = PASSWORD, authzid: bytes = b"") -> bytes:
    return b64(authzid + b"\x00" + user.encode() + b"\x00" + password)


@dataclass
class Driver:
    """Runs one Session like the I/O layer would; see the module docstring."""

    settings: SessionSettings = field(default_factory=SessionSettings)
    address: str | None = "192.0.2.10"
    users: dict[str, bytes] = field(default_factory=lambda: {USER: PASSWORD})
    entries: list[Any] = field(default_factory=default_entries)
    challenge: bytes | None = None
    quick_check: Callable[[bytes, str], Any] | None = clean_check
    #: which busy actions are answered automatically (class objects)
    auto: tuple[type, ...] = BUSY_TYPES
    analysis: Callable[[Sequence[bytes]], list[Any]] = slow_analysis
    #: check that a busy action is the last of its batch and nothing follows a Close
    strict: bool = True

    def __post_init__(self) -> None:
        self.session = Session(self.settings, self.address, challenge=self.challenge,
                               quick_check=self.quick_check)
        self.actions: list[Any] = []
        self.transcript = bytearray()
        self.new_actions: list[Any] = []
        self.logins: list[A.Authenticate] = []
        self.streams: list[A.StreamMessage] = []
        self.commits: list[A.Commit] = []
        self.listings: list[A.SendListing] = []
        self.analyses: list[A.Analyze] = []
        self.pending: Any = None  # the unanswered busy action, in manual mode
        self.closed_at: int | None = None  # index in self.actions of the first Close
        self.max_buffered = 0  # the largest session.buffered seen after any call into the session

    # -- inputs -------------------------------------------------------------------------

    def start(self) -> bytes:
        return self._run(lambda: self.session.start())

    def send(self, data: bytes) -> bytes:
        """Feed bytes in one receive_data call; the transcript bytes this produced."""
        return self._run(lambda: self.session.receive_data(data))

    def send_chunks(self, chunks: Iterable[bytes]) -> bytes:
        mark = len(self.transcript)
        new: list[Any] = []
        for chunk in chunks:
            self.send(chunk)
            new.extend(self.new_actions)
        self.new_actions = new
        return bytes(self.transcript[mark:])

    def call(self, method: str, *args: Any) -> bytes:
        """Call a result method of the session (login_succeeded, timed_out, ...) by hand."""
        self.pending = None
        return self._run(lambda: getattr(self.session, method)(*args))

    def login(self, user: str = USER, password: bytes = PASSWORD) -> bytes:
        out = self.send(b"USER " + user.encode() + b"\r\nPASS " + password + b"\r\n")
        assert self.session.state.value == "transaction", out
        return out

    # -- views --------------------------------------------------------------------------

    @property
    def reports(self) -> list[Any]:
        return [a.event for a in self.actions if isinstance(a, A.Report)]

    @property
    def new_reports(self) -> list[Any]:
        return [a.event for a in self.new_actions if isinstance(a, A.Report)]

    @property
    def closes(self) -> list[A.Close]:
        return [a for a in self.actions if isinstance(a, A.Close)]

    @property
    def new_closes(self) -> list[A.Close]:
        return [a for a in self.new_actions if isinstance(a, A.Close)]

    @property
    def closed(self) -> bool:
        return bool(self.closes)

    def kinds(self, actions: Iterable[Any] | None = None) -> list[str]:
        return [type(a).__name__ for a in (self.new_actions if actions is None else actions)]

    # -- the I/O layer ------------------------------------------------------------------

    def _run(self, step: Callable[[], list[Any]]) -> bytes:
        mark = len(self.transcript)
        new: list[Any] = []
        queue = list(step())
        self._measure()
        while queue:
            batch, queue = queue, []
            new.extend(batch)
            answer = self._record(batch)
            if answer is not None:
                queue = list(answer())
                self._measure()
        self.new_actions = new
        return bytes(self.transcript[mark:])

    def _measure(self) -> None:
        self.max_buffered = max(self.max_buffered, self.session.buffered)

    def _record(self, batch: list[Any]) -> Callable[[], list[Any]] | None:
        """Carry out one batch of actions; the call that answers its busy action, if any."""
        answer = None
        for index, action in enumerate(batch):
            if self.strict:
                assert self.closed_at is None, f"{action!r} after Close"
                if isinstance(action, BUSY_TYPES):
                    assert index == len(batch) - 1, f"{action!r} is not the last of {batch!r}"
            self.actions.append(action)
            if isinstance(action, A.Send):
                self.transcript += action.data
            elif isinstance(action, A.Close):
                if self.closed_at is None:
                    self.closed_at = len(self.actions) - 1
            elif isinstance(action, A.Authenticate):
                self.logins.append(action)
                answer = self._answer(action, self._login)
            elif isinstance(action, A.StreamMessage):
                self.streams.append(action)
                answer = self._answer(action, self._stream)
            elif isinstance(action, A.SendListing):
                self.listings.append(action)
                answer = self._answer(action, self._listing)
            elif isinstance(action, A.Commit):
                self.commits.append(action)
                answer = self._answer(action, lambda a: self.session.commit_finished())
            elif isinstance(action, A.Analyze):
                self.analyses.append(action)
                answer = self._answer(
                    action, lambda a: self.session.analysis_finished(self.analysis(a.arguments)))
        return answer

    def _answer(self, action: Any, respond: Callable[[Any], list[Any]]) -> Callable[[], list[Any]] | None:
        if isinstance(action, self.auto):
            return lambda: respond(action)
        self.pending = action
        return None

    def _login(self, action: A.Authenticate) -> list[Any]:
        if self.users.get(action.username) == action.secret:
            return self.session.login_succeeded(self.entries)
        return self.session.login_failed()

    def _listing(self, action: A.SendListing) -> list[Any]:
        for chunk in action.chunks:
            self.transcript += chunk
        return self.session.listing_sent()

    def _stream(self, action: A.StreamMessage) -> list[Any]:
        self.transcript += action.status
        self.transcript += stuff(fake_body(action.key), action.body_lines)
        return self.session.stream_finished()


def fake_body(key: Any) -> bytes:
    return (f"Subject: message {key}\r\n\r\nline one of {key}\r\n.dotted line\r\nline three\r\n").encode()


@pytest.fixture(scope="session")
def kit() -> types.SimpleNamespace:
    """Everything above, for tests (and hypothesis tests, which need a non-function scope)."""
    return types.SimpleNamespace(
        Driver=Driver, Entry=Entry, Verdict=Verdict, CLEAN=CLEAN, clean_check=clean_check,
        marker_check=marker_check, slow_analysis=slow_analysis, default_entries=default_entries,
        protections=protections, make_settings=make_settings, b64=b64, plain_blob=plain_blob,
        fake_body=fake_body, USER=USER, PASSWORD=PASSWORD, NOP_MARK=NOP_MARK,
        FORMAT_MARK=FORMAT_MARK, SLOW_MARK=SLOW_MARK, BUSY_TYPES=BUSY_TYPES,
    )


@pytest.fixture
def make_driver() -> Callable[..., Driver]:
    """``make_driver(settings=..., address=..., quick_check=..., ...)``; started unless start=False."""

    def make(settings: SessionSettings | None = None, *, start: bool = True, **kwargs: Any) -> Driver:
        driver = Driver(settings=settings or SessionSettings(), **kwargs)
        if start:
            driver.start()
        return driver

    return make
