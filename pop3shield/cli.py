"""The ``pop3shield`` command: ``run``, ``check-config``, ``passwd`` and ``events``."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from pop3shield import __version__
from pop3shield.core.settings import DEFAULT_USERNAME_EXTRA


def _fail(message: str, code: int = 2) -> int:
    print(f"pop3shield: {message}", file=sys.stderr, flush=True)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    """Run the server in the foreground until SIGINT/SIGTERM."""
    from pop3shield.config import ConfigError, load_config
    from pop3shield.passwd import PasswdError
    from pop3shield.service import preflight

    password = None
    try:
        if args.config:
            config = load_config(args.config)
        else:
            from pop3shield import demo

            directory = Path(args.demo_dir) if args.demo_dir else demo.default_demo_dir()
            config, password = demo.prepare(directory, args.listen or demo.DEMO_LISTEN)
        report = preflight(config)
    except (ConfigError, PasswdError) as exc:
        return _fail(str(exc))
    return _serve(config, password, report)


def _serve(config: object, demo_password: str | None, report: object) -> int:
    from twisted.internet import reactor

    from pop3shield.logsetup import begin_logging
    from pop3shield.service import log_warnings, make_service

    def announce(address: str) -> None:
        print(f"pop3shield: listening on {address}", flush=True)
        if demo_password is not None:
            host, _, port = address.rpartition(":")
            print(f"pop3shield: demo login: user 'demo', password '{demo_password}'\n"
                  f"  try: curl -u demo:{demo_password} pop3://{host}:{port}/1\n"
                  f"  or:  python3 -c \"import poplib; p=poplib.POP3('{host}', {port}); "
                  f"p.user('demo'); p.pass_('{demo_password}'); print(p.list())\"", flush=True)

    begin_logging(config.logging.path, config.logging.format, config.logging.level)  # type: ignore[attr-defined]
    log_warnings(report)  # type: ignore[arg-type]
    if config.server.workers > 1:  # type: ignore[attr-defined]
        from pop3shield.workers import run_supervisor

        return run_supervisor(config, announce)
    top = make_service(config, reactor, announce, signals=True)  # type: ignore[arg-type]  # SIGHUP, SIGTERM
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return int(getattr(reactor, "pop3shield_exit_code", 0))


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file the way start-up does (the same preflight), without listening.

    Errors: one line on stderr, exit 2. Warnings (legal but dangerous): one line each on
    stderr, and the file is still OK.
    """
    from pop3shield.config import ConfigError, load_config
    from pop3shield.passwd import PasswdError
    from pop3shield.service import preflight

    try:
        config = load_config(args.file)
        report = preflight(config)
    except (ConfigError, PasswdError) as exc:
        return _fail(str(exc))
    for warning in report.warnings:
        print(f"pop3shield: warning: {warning}", file=sys.stderr, flush=True)
    if config.auth.passwd_file:
        print(f"{args.file}: passwd file {config.auth.passwd_file}: {report.users} users")
    print(f"{args.file}: OK")
    return 0


def _read_password(use_stdin: bool) -> str:
    if use_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise ValueError("the passwords do not match")
    return first


def cmd_passwd(args: argparse.Namespace) -> int:
    """Print (or store in a passwd file) a hashed entry; the password is read, never an argument.

    The user name is checked the way the server checks it, and the file's line for the user
    (fields after the password, extra fields included) before the password is asked for; only
    that line is checked, the others are kept byte for byte.
    """
    from pop3shield.core.grammar import normalise_username
    from pop3shield.passwd import PasswdError, format_entry, hash_password

    args.user = normalise_username(args.user)  # stored as the server compares it: NFC
    problem = _username_problem(args.user, args.username_chars)
    if problem:
        return _fail(f"user name '{_shown(args.user)}': {problem}")
    if args.file:
        try:
            _plan_store(args.file, args.user)  # the problem at hand, before the password is typed
        except PasswdError as exc:
            return _fail(str(exc))
    try:
        password = _read_password(args.stdin)
    except ValueError as exc:
        return _fail(str(exc))
    except (EOFError, KeyboardInterrupt):
        return _fail("no password given")
    if not password:
        return _fail("empty password refused")
    try:
        hashed = hash_password(password, args.scheme)
    except ValueError as exc:  # bcrypt and a password over 72 bytes
        return _fail(str(exc))
    entry = format_entry(args.user, hashed)
    if not args.file:
        print(entry)
        return 0
    try:
        # Read again: the file may have changed while the password was typed.
        _store_entry(_plan_store(args.file, args.user), entry)
    except PasswdError as exc:
        return _fail(str(exc))
    print(f"{args.file}: entry for {args.user} written")
    return 0


def _shown(text: str, limit: int = 64) -> str:
    """Operator input on one line: control characters escaped, cut at ``limit``."""
    return text[:limit].encode("unicode_escape").decode("ascii") + ("..." if len(text) > limit else "")


def _username_problem(user: str, extra_chars: str) -> str | None:
    """The server's rules: the passwd-file format, then the protocol's user-name grammar."""
    from pop3shield.core.grammar import valid_username
    from pop3shield.passwd import user_problem

    problem = user_problem(user)
    if problem:
        return problem
    if not valid_username(user, extra_chars):
        return (f"the server would refuse it: only letters, digits and '{_shown(extra_chars)}', "
                f"not starting with '.' (see --username-chars)")
    return None


def _stored_name(line: bytes) -> str | None:
    """A line's user name as the server compares it (NFC), None if it is not UTF-8."""
    import unicodedata

    try:
        return unicodedata.normalize("NFC", line.split(b":", 1)[0].decode("utf-8"))
    except UnicodeDecodeError:
        return None


class _Plan:
    """What ``passwd --file`` will write: the file read once, where the user's line is."""

    def __init__(self, shown: str, target: Path, data: bytes, st: os.stat_result | None,
                 index: int | None, tail: bytes, lines: list[bytes]) -> None:
        self.shown = shown  # the path as the operator gave it, for messages
        self.target = target  # symlinks resolved: the file that is replaced
        self.data = data
        self.st = st
        self.index = index  # the user's line, or None to append
        self.tail = tail  # the user's line after the password field (":uid:gid:...:extra")
        self.lines = lines


def _plan_store(name: str, user: str) -> _Plan:
    """Read the file and find (and check) the user's line, before the password is asked for."""
    from pop3shield.passwd import DUMMY_ENTRY, PasswdError, line_problem

    target = Path(os.path.realpath(name))
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not hang the command
        with os.fdopen(fd, "rb") as handle:
            st = os.fstat(handle.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise PasswdError(name, None, "not a regular file")
            data = handle.read()
    except FileNotFoundError:
        return _Plan(name, target, b"", None, None, b"", [])
    except OSError as exc:
        raise PasswdError(name, None, f"cannot read: {exc.strerror or exc}") from None
    lines = data.split(b"\n")
    lines = [line + b"\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    found = [i for i, line in enumerate(lines)
             if not line.lstrip().startswith(b"#") and _stored_name(line) == user]
    if len(found) > 1:
        raise PasswdError(name, found[1] + 1, f"user {user!r} appears again (first on line {found[0] + 1})")
    if not found:
        return _Plan(name, target, data, st, None, b"", lines)
    index = found[0]
    body = lines[index].rstrip(b"\n").rstrip(b"\r")
    fields = body.split(b":", 2)
    tail = b":" + fields[2] if len(fields) > 2 else b""
    try:
        text = tail.decode("utf-8")
    except UnicodeDecodeError:
        raise PasswdError(name, index + 1, "not valid UTF-8") from None
    problem = line_problem(f"{user}:{{ARGON2ID}}{DUMMY_ENTRY.hash}{text}")
    if problem:
        raise PasswdError(name, index + 1, problem)
    return _Plan(name, target, data, st, index, tail, lines)


def _store_entry(plan: _Plan, entry: str) -> None:
    """Replace the user's password field (keeping the rest of the line) or append the entry.

    Atomic and through symlinks: a temporary file next to the link's target, with the original's
    owner, group and mode (0600 for a new file), fsync'ed, renamed onto the target, and the
    directory fsync'ed.  Every other line is kept byte for byte.
    """
    from pop3shield.passwd import PasswdError

    line = entry.encode("utf-8")
    if plan.index is not None:
        old = plan.lines[plan.index]
        ending = old[len(old.rstrip(b"\r\n")):]
        lines = list(plan.lines)
        lines[plan.index] = line + plan.tail + ending
        content = b"".join(lines)
    else:
        content = plan.data + (b"\n" if plan.data and not plan.data.endswith(b"\n") else b"") + line + b"\n"
    directory = plan.target.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{plan.target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise PasswdError(plan.shown, None, f"cannot write in {directory}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
            handle.flush()
            if plan.st is not None:
                made = os.fstat(handle.fileno())
                if (made.st_uid, made.st_gid) != (plan.st.st_uid, plan.st.st_gid):
                    os.fchown(handle.fileno(), plan.st.st_uid, plan.st.st_gid)
                os.fchmod(handle.fileno(), stat.S_IMODE(plan.st.st_mode))
            else:
                os.fchmod(handle.fileno(), 0o600)
            os.fsync(handle.fileno())
        os.rename(temporary, plan.target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise PasswdError(plan.shown, None, f"not changed: {exc.strerror or exc}") from None
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise PasswdError(plan.shown, None, f"written, but the directory sync failed: {exc.strerror or exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pop3shield", description="A hardened POP3 server front-end.")
    parser.add_argument("--version", action="version", version=f"pop3shield {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the server in the foreground (no --config: the demo)")
    run.add_argument("--config", help="TOML config file (see etc/pop3shield.toml)")
    run.add_argument("--demo-dir", help="where the demo keeps its Maildir (default ~/.local/share/pop3shield-demo)")
    run.add_argument("--listen", help="demo only: endpoint string (default tcp:1110:interface=127.0.0.1)")
    run.set_defaults(func=cmd_run)
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)
    pw = sub.add_parser("passwd", help="hash a password into a passwd-file entry")
    pw.add_argument("user")
    pw.add_argument("--scheme", default="ARGON2ID", choices=["ARGON2ID", "BLF-CRYPT"])
    pw.add_argument("--file", help="add or replace the entry in this passwd file")
    pw.add_argument("--stdin", action="store_true", help="read the password from standard input")
    pw.add_argument("--username-chars", default=DEFAULT_USERNAME_EXTRA, metavar="CHARS",
                    help="characters allowed in user names besides letters and digits, as the server's "
                         f"username_chars (default {DEFAULT_USERNAME_EXTRA!r})")
    pw.set_defaults(func=cmd_passwd)
    from pop3shield import eventview

    ev = sub.add_parser("events", help="summarise, filter, follow or report the security event file")
    eventview.add_arguments(ev)
    ev.set_defaults(func=eventview.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
