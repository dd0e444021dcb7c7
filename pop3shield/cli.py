"""The ``pop3shield`` command: ``run``, ``check-config`` and ``passwd``."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path
from typing import Sequence

from pop3shield import __version__


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
    top = make_service(config, reactor, announce)  # type: ignore[arg-type]
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
    """Print (or store in a passwd file) a hashed entry; the password is read, never an argument."""
    from pop3shield.passwd import PasswdError, format_entry, hash_password, load_passwd

    try:
        password = _read_password(args.stdin)
    except ValueError as exc:
        return _fail(str(exc))
    if not password:
        return _fail("empty password refused")
    entry = format_entry(args.user, hash_password(password, args.scheme))
    if not args.file:
        print(entry)
        return 0
    try:
        _store_entry(Path(args.file), args.user, entry)
        load_passwd(args.file)
    except (OSError, PasswdError) as exc:
        return _fail(str(exc))
    print(f"{args.file}: entry for {args.user} written")
    return 0


def _store_entry(path: Path, user: str, entry: str) -> None:
    """Replace the user's line (or append it), atomically, keeping the file private."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    kept = [line for line in lines if line.split(":", 1)[0] != user]
    kept.append(entry)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("\n".join(kept) + "\n")
    os.replace(temporary, path)


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
    pw.set_defaults(func=cmd_passwd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
