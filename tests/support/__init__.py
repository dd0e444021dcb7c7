"""Shared helpers for pop3shield's test suites.

* :mod:`tests.support.messages` -- deterministic test messages and a Maildir writer.
* :mod:`tests.support.dovecot` -- a private, throw-away Dovecot POP3 server.
* :mod:`tests.support.pop3shield_server` -- pop3shield run as a subprocess.
* :mod:`tests.support.clients` -- drive real POP3 clients (poplib, curl, fetchmail,
  mpop, getmail6) and a transcript-recording TCP relay.
"""

import os
import shutil
from pathlib import Path

import pytest

#: the checkout this suite belongs to (the worktree, wherever it is)
REPO_ROOT = Path(__file__).resolve().parents[2]


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


def shared_path(*parts: str) -> Path:
    """A path in the maintainers' notes, ``../shared`` next to the checkout (no check)."""
    return REPO_ROOT.parent.joinpath("shared", *parts)


def shared_dir(*parts: str) -> Path:
    """The maintainers' notes (``REPO_ROOT.parent / "shared"``, or a path inside it).

    Found relative to the checkout, never by an absolute path. When it is missing the test
    is skipped, or failed under ``CI=true``: CI must compare against the notes, not skip.
    """
    path = shared_path(*parts)
    if not path.exists():
        skip_or_fail(f"the maintainers' notes are not at {path} (../shared next to the checkout)")
    return path


class ChildServer:
    """A test-owned server process in ``self.proc``: stopped by its PID (SIGTERM, then SIGKILL),
    and usable as a context manager."""

    proc = None

    def stop(self) -> None:
        import contextlib
        import signal
        import subprocess

        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
