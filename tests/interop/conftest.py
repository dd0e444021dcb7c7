"""Fixtures: a real POP3 server (Dovecot or pop3shield) over a known Maildir.

``server_kind`` is parametrized over ``dovecot`` and ``pop3shield``; the
pop3shield parameter is skipped until ``pop3shield.__main__`` exists.

* ``shared_mailbox`` (module scope): one server per kind with the standard
  messages, for read-only tests (every client retrieves with keep/no-delete).
* ``fresh_mailbox`` (function scope): a new server + Maildir per test, for
  tests that DELE.

On a failing test, the server's log tails are attached to the report.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:  # plain `pytest` (not `python -m pytest`)
    sys.path.insert(0, str(_REPO_ROOT))

from tests.support.dovecot import DovecotServer  # noqa: E402
from tests.support.messages import MESSAGES, TestMessage, write_maildir  # noqa: E402
from tests.support.pop3shield_server import Pop3ShieldServer  # noqa: E402


SERVER_KINDS = [
    pytest.param("dovecot", id="dovecot"),
    pytest.param("pop3shield", id="pop3shield"),
]

USER = "alice"
PASSWORD = "s3cret-pass"


@dataclass
class Mailbox:
    """A running server over one user's Maildir with known messages."""

    kind: str
    host: str
    port: int
    user: str
    password: str
    server: object
    maildir: Path
    messages: tuple[TestMessage, ...]
    workdir: Path
    #: per-server behaviour that legitimately differs (see expected_size)
    quirks: dict = field(default_factory=dict)

    def expected_size(self, msg: TestMessage) -> int:
        """Octets the server should report in LIST/STAT for *msg*.

        pop3shield: exactly the wire size (what RETR transmits, including the
        CRLF it must add to a file without a final newline).  Dovecot counts
        the stored message with LF->CRLF but *without* that added CRLF, so its
        LIST is 2 smaller for such messages (RFC 1939 only says "exact size";
        both readings exist in the wild).
        """
        size = len(msg.wire)
        if self.quirks.get("size_excludes_added_crlf") and not msg.raw.endswith(b"\n") \
                and msg.raw:
            size -= 2
        return size

    def diagnostics(self) -> str:
        return self.server.diagnostics()  # type: ignore[attr-defined]


QUIRKS = {
    "dovecot": {"size_excludes_added_crlf": True},
    "pop3shield": {},
}


def _start(kind: str, workdir: Path, messages=MESSAGES) -> Mailbox:
    maildir_root = workdir / "mail"
    maildir = maildir_root / USER / "Maildir"
    write_maildir(maildir, messages)
    server = DovecotServer() if kind == "dovecot" else Pop3ShieldServer()
    try:
        host, port = server.start(workdir / "server", {USER: PASSWORD}, maildir_root)
    except BaseException:
        server.stop()
        raise
    return Mailbox(kind=kind, host=host, port=port, user=USER, password=PASSWORD,
                   server=server, maildir=maildir, messages=tuple(messages),
                   workdir=workdir, quirks=dict(QUIRKS[kind]))


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server_kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def shared_mailbox(server_kind, tmp_path_factory):
    """Module-scoped server; tests must not change the mailbox."""
    box = _start(server_kind, tmp_path_factory.mktemp(f"shared-{server_kind}"))
    try:
        yield box
    finally:
        box.server.stop()
    assert_no_security_events(box)


@pytest.fixture
def fresh_mailbox(server_kind, tmp_path, request):
    box = _start(server_kind, tmp_path)
    request.node._interop_mailbox = box  # for the failure report hook
    try:
        yield box
    finally:
        box.server.stop()
    assert_no_security_events(box)


def assert_no_security_events(box: Mailbox) -> None:
    """Real clients must never trip a protection (every protection is at its default, prevent)."""
    if box.kind != "pop3shield":
        return
    events = [e for e in box.server.events() if e.get("type") == "security"]  # type: ignore[attr-defined]
    assert events == [], f"legitimate clients produced security events: {events}"


@pytest.fixture
def client_home(tmp_path) -> Path:
    """An empty private HOME for one client run."""
    home = tmp_path / "client-home"
    home.mkdir()
    os.chmod(home, 0o700)
    return home


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    box = getattr(item, "_interop_mailbox", None)
    if box is None and "shared_mailbox" in getattr(item, "funcargs", {}):
        box = item.funcargs["shared_mailbox"]
    if box is not None:
        report.sections.append((f"{box.kind} server diagnostics", box.diagnostics()))
