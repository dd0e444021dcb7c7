"""Shared helpers for pop3shield's test suites.

* :mod:`tests.support.messages` -- deterministic test messages and a Maildir writer.
* :mod:`tests.support.dovecot` -- a private, throw-away Dovecot POP3 server.
* :mod:`tests.support.pop3shield_server` -- pop3shield run as a subprocess.
* :mod:`tests.support.clients` -- drive real POP3 clients (poplib, curl, fetchmail,
  mpop, getmail6) and a transcript-recording TCP relay.
"""

import os
import shutil

import pytest


def in_ci() -> bool:
    """True when running under CI (``CI=true``): missing tools must fail, not skip."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip the current test with *reason*, or fail it when running in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: missing prerequisites are failures, not skips)",
                    pytrace=False)
    pytest.skip(reason)


def require_binary(name: str, *extra_dirs: str) -> str:
    """Return the absolute path of executable *name*.

    If it is missing, the calling test is skipped -- or failed when ``CI=true``.
    *extra_dirs* are searched in addition to ``$PATH`` (e.g. ``/usr/sbin``, which
    is not on a normal user's PATH).
    """
    path = os.environ.get("PATH", os.defpath)
    search = os.pathsep.join([path, *extra_dirs, "/usr/sbin", "/usr/local/sbin", "/sbin"])
    found = shutil.which(name, path=search)
    if found is None:
        skip_or_fail(f"required program {name!r} is not installed")
    return found  # type: ignore[return-value]
