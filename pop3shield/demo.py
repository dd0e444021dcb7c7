"""The zero-configuration demo: one user, a Maildir with a few messages, on 127.0.0.1:1110.

So a newcomer sees mail within a minute of installing. The password is new on every start and
printed once; only its hash is written to disk.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pop3shield.config import AuthConfig, BackendConfig, Config, EventsConfig, ServerConfig
from pop3shield.maildir import Maildir
from pop3shield.passwd import format_entry, hash_password

DEMO_USER = "demo"
DEMO_LISTEN = "tcp:1110:interface=127.0.0.1"

_MESSAGES = (
    b"From: pop3shield <postmaster@localhost>\nTo: demo@localhost\nSubject: Welcome to pop3shield\n"
    b"Date: Thu, 26 Nov 2026 12:00:00 +0000\nMessage-ID: <welcome@pop3shield.invalid>\n\n"
    b"This message came to you through pop3shield.\n"
    b"Every line your client sent was checked by the protections first.\n",
    b"From: pop3shield <postmaster@localhost>\nTo: demo@localhost\nSubject: Dots are safe\n"
    b"Date: Thu, 26 Nov 2026 12:01:00 +0000\nMessage-ID: <dots@pop3shield.invalid>\n\n"
    b"The next line is a single dot, and it does not end this message:\n.\n"
    b".and this line starts with one.\nThe end.\n",
)


def default_demo_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "pop3shield-demo"


def prepare(directory: Path, listen: str = DEMO_LISTEN) -> tuple[Config, str]:
    """Create (or reuse) the demo tree; returns the config and this run's password."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    maildir_path = directory / DEMO_USER / "Maildir"
    fresh = not maildir_path.exists()
    (directory / DEMO_USER).mkdir(exist_ok=True, mode=0o700)
    store = Maildir(maildir_path, create=True)
    if fresh:
        for message in _MESSAGES:
            store.deliver(message)
    password = secrets.token_urlsafe(12)
    passwd_file = directory / "users.passwd"
    temporary = passwd_file.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(format_entry(DEMO_USER, hash_password(password)) + "\n")
    os.replace(temporary, passwd_file)
    config = Config(
        server=ServerConfig(listen=(listen,), hostname="localhost"),
        auth=AuthConfig(passwd_file=str(passwd_file)),
        backend=BackendConfig(maildir=str(directory / "{user}" / "Maildir")),
        events=EventsConfig(path=str(directory / "events.jsonl")),
        source="<demo>",
    )
    return config, password
