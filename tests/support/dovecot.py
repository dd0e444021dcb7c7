"""A private, throw-away Dovecot POP3 server for tests and benchmarks.

The system Dovecot (``/etc/dovecot``, ``/run/dovecot``, ``/var/lib/dovecot``)
is never read or touched: this module writes its own ``dovecot.conf`` and
passwd-file into a work directory, points ``base_dir``, ``state_dir`` and the
log there, runs ``dovecot -F -c CONF`` in the foreground as a child process
(in its own process group), listens on 127.0.0.1 on a free port, and stops
that one master process (and, if it will not die, its process group) again.

Privileges
----------
Dovecot refuses to run POP3 login processes as root and refuses mail access
as root, so when the tests run as root:

* login processes run as ``dovenull`` (or ``nobody``) and are chrooted into
  ``base_dir/login`` (Dovecot's default), so they need no access to the
  pytest tmp dir;
* mail processes run as ``nobody`` and are *chrooted* into ``maildir_root``
  (home ``maildir_root/./USER``), so the 0700 pytest tmp dir above it does
  not need to be opened up.  ``maildir_root`` is ``chown -R``'d to nobody;
  use :attr:`DovecotServer.mail_owner` for files written after start.

When not root, every Dovecot process simply runs as the current user (no
chroots).  Dovecot's own index/control files live in ``HOME/dovecot-index``
and ``HOME/dovecot-control``, next to (not inside) ``HOME/Maildir``.

Settings worth knowing: ``pop3_lock_session = yes`` (second concurrent
session waits up to 10 s for the lock, then gets
``-ERR [IN-USE] Mailbox is locked by another POP3 session.``),
``pop3_uidl_format = %08Xu%08Xv`` (IMAP UID + UIDVALIDITY; stable across
sessions), ``ssl = no`` + ``disable_plaintext_auth = no`` (2.3) /
``auth_allow_cleartext = yes`` (2.4).  The 2.4 template is best effort: it
was written from the 2.4 docs, only the 2.3 one has been run.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from . import require_binary

__all__ = ["DovecotServer", "DovecotError", "dovecot_version", "free_port",
           "wait_for_pop3_greeting", "tail"]

HOST = "127.0.0.1"


class DovecotError(RuntimeError):
    pass


def tail(path: os.PathLike | str, lines: int = 40) -> str:
    """Last *lines* lines of a text file, or a note that it does not exist."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return f"<{path}: {exc.strerror}>"
    text = data.decode("utf-8", "replace").splitlines()
    return "\n".join(text[-lines:])


def free_port(host: str = HOST) -> int:
    """A TCP port that was free a moment ago (the caller must tolerate races)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_pop3_greeting(host: str, port: int, timeout: float, *,
                           alive=lambda: True, describe=lambda: "") -> bytes:
    """Poll (host, port) until a POP3 ``+OK`` greeting arrives; return it.

    *alive* is called between attempts; when it returns False (the server
    process died) we stop waiting.  *describe* supplies diagnostics (log tails)
    for the exception message.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | str = "no attempt made"
    while time.monotonic() < deadline:
        if not alive():
            raise DovecotError(f"server process exited before it accepted "
                               f"connections on {host}:{port}\n{describe()}")
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(max(0.5, min(5.0, deadline - time.monotonic())))
                greeting = b""
                while not greeting.endswith(b"\n"):
                    chunk = s.recv(512)
                    if not chunk:
                        break
                    greeting += chunk
                if greeting.startswith(b"+OK"):
                    with contextlib.suppress(OSError):
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    return greeting.rstrip(b"\r\n")
                last_error = f"unexpected greeting {greeting!r}"
        except OSError as exc:
            last_error = exc
        time.sleep(0.05)
    raise DovecotError(f"no POP3 greeting from {host}:{port} within {timeout:.0f}s "
                       f"(last error: {last_error})\n{describe()}")


def dovecot_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", out)
    if not m:
        raise DovecotError(f"cannot parse `dovecot --version` output {out!r}")
    return tuple(int(x) for x in m.groups() if x is not None)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


_CONF_23 = """\
# Private test instance -- generated by tests/support/dovecot.py. Dovecot {version}.
protocols = pop3
listen = {host}
base_dir = {base_dir}
state_dir = {state_dir}
instance_name = {instance_name}
log_path = {log_path}
log_timestamp = "%Y-%m-%d %H:%M:%S "
shutdown_clients = yes
{ssl}
disable_plaintext_auth = no
auth_mechanisms = plain login
auth_verbose = yes
verbose_proctitle = yes
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
first_valid_uid = 0
first_valid_gid = 0
{valid_chroot_dirs}
mail_location = maildir:~/Maildir:INDEX=~/dovecot-index:CONTROL=~/dovecot-control
pop3_uidl_format = %08Xu%08Xv
pop3_lock_session = {lock_session}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {passwd_file}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {passwd_file}
}}
service pop3-login {{
{login_chroot}
  inet_listener pop3 {{
    address = {host}
    port = {port}
  }}
{listeners}
}}
{trusted}
{extra}
"""

# Dovecot 2.4 renamed/reshaped most of these; written from the upgrade docs, not run here.
_CONF_24 = """\
dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
# Private test instance -- generated by tests/support/dovecot.py. Dovecot {version}.
protocols = pop3
listen = {host}
base_dir = {base_dir}
state_dir = {state_dir}
instance_name = {instance_name}
log_path = {log_path}
shutdown_clients = yes
{ssl}
auth_allow_cleartext = yes
auth_mechanisms = plain login
auth_verbose = yes
verbose_proctitle = yes
default_internal_user = {internal_user}
default_internal_group = {internal_group}
default_login_user = {login_user}
first_valid_uid = 0
first_valid_gid = 0
{valid_chroot_dirs}
mail_driver = maildir
mail_path = ~/Maildir
mail_index_path = ~/dovecot-index
mail_control_path = ~/dovecot-control
pop3_lock_session = {lock_session}
passdb passwd-file {{
  passwd_file_path = {passwd_file}
  default_password_scheme = PLAIN
}}
userdb passwd-file {{
  passwd_file_path = {passwd_file}
}}
service pop3-login {{
{login_chroot}
  inet_listener pop3 {{
    listen = {host}
    port = {port}
  }}
{listeners}
}}
{trusted}
{extra}
"""


class ServerProcess:
    """What every server fixture shares: a context manager around start/stop, paths, liveness."""

    proc: subprocess.Popen | None
    maildir_root: Path | None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()  # type: ignore[attr-defined]
        return False

    def maildir(self, user: str) -> Path:
        assert self.maildir_root is not None
        return self.maildir_root / user / "Maildir"

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class DovecotServer(ServerProcess):
    """A private Dovecot POP3 server.

    Usage::

        with DovecotServer() as srv:
            host, port = srv.start(tmp_path, {"alice": "secret"}, maildir_root)
            ...                      # alice's Maildir is maildir_root/alice/Maildir

    ``start`` skips the calling test when Dovecot is not installed (fails under
    ``CI=true``).  ``stop`` is idempotent and is also called by ``__exit__``.
    """

    kind = "dovecot"

    def __init__(self, *, lock_session: bool = True, extra_config: str = "",
                 startup_timeout: float = 20.0, stop_timeout: float = 10.0,
                 extra_fields: dict[str, str] | None = None,
                 trusted_networks: str = "", haproxy: bool = False,
                 tls: tuple[str, str] | None = None, port: int | None = None):
        """``trusted_networks``: Dovecot's ``login_trusted_networks`` (they are offered XCLIENT);
        ``haproxy``: a second listener (:attr:`proxy_port`) that takes a PROXY header from
        ``trusted_networks`` (``haproxy_trusted_networks``); ``tls``: (cert PEM, key PEM) files
        turn on STLS on :attr:`port` and an implicit-TLS listener on :attr:`tls_port`."""
        self.trusted_networks = trusted_networks
        #: listen on this port (a restart on the same address) instead of a free one
        self.fixed_port = port
        self.haproxy = haproxy
        self.tls = tls
        self.proxy_port: int | None = None
        self.tls_port: int | None = None
        self.lock_session = lock_session
        self.extra_config = extra_config
        #: user -> passwd-file extra fields (field 8, e.g. "nologin allow_nets=10.0.0.0/8")
        self.extra_fields = dict(extra_fields or {})
        #: the passwd-file written by start()
        self.passwd_path: Path | None = None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.host = HOST
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.workdir: Path | None = None
        self.conf_path: Path | None = None
        self.log_path: Path | None = None
        self.stdout_path: Path | None = None
        self.maildir_root: Path | None = None
        self.version: tuple[int, ...] = ()
        self.greeting: bytes = b""
        #: (uid, gid) that owns the mail files; tests adding files after start must chown to it
        self.mail_owner: tuple[int, int] = (os.getuid(), os.getgid())
        self._short_base_dir: str | None = None

    # -- helpers ---------------------------------------------------------
    def diagnostics(self, lines: int = 40) -> str:
        parts = []
        if self.log_path:
            parts.append(f"--- {self.log_path} (tail) ---\n{tail(self.log_path, lines)}")
        if self.stdout_path:
            parts.append(f"--- {self.stdout_path} (tail) ---\n{tail(self.stdout_path, lines)}")
        return "\n".join(parts)

    # -- lifecycle -------------------------------------------------------
    def start(self, tmpdir: os.PathLike | str, users: dict[str, str],
              maildir_root: os.PathLike | str) -> tuple[str, int]:
        """Configure and start Dovecot; return ``(host, port)`` once it greets.

        *users* maps user name to clear-text password; user U's mailbox is the
        Maildir ``maildir_root/U/Maildir`` (created if missing).
        """
        if self.proc is not None:
            raise DovecotError("already started")
        binary = require_binary("dovecot", "/usr/sbin")
        self.version = dovecot_version(binary)
        self.workdir = Path(tmpdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.maildir_root = Path(maildir_root).resolve()
        for user in users:
            if not re.fullmatch(r"[A-Za-z0-9._@+-]+", user):
                raise ValueError(f"unsupported user name for passwd-file: {user!r}")
            for sub in ("cur", "new", "tmp"):
                (self.maildir_root / user / "Maildir" / sub).mkdir(parents=True, exist_ok=True)
        for user, password in users.items():
            if any(c in password for c in ":\r\n\0"):
                raise ValueError(f"password for {user!r} can't be stored in a passwd-file")

        last_exc: Exception | None = None
        for _attempt in range(3):  # retry if the free port got taken in between
            try:
                return self._start_once(binary, users)
            except DovecotError as exc:
                last_exc = exc
                self._kill()
                if "Address already in use" not in str(exc):
                    raise
        raise DovecotError(f"could not start dovecot: {last_exc}")

    def _start_once(self, binary: str, users: dict[str, str]) -> tuple[str, int]:
        assert self.workdir and self.maildir_root
        w = self.workdir
        state_dir = w / "state"
        state_dir.mkdir(exist_ok=True)
        base_dir = w / "run"
        # unix socket paths are limited to ~107 bytes; Dovecot's longest is
        # base_dir + "/token-login/tokenlogin" etc.  Fall back to a short dir.
        if len(str(base_dir)) > 70:
            if self._short_base_dir is None:
                self._short_base_dir = tempfile.mkdtemp(prefix="dovecot-run-")
            base_dir = Path(self._short_base_dir)
        base_dir.mkdir(exist_ok=True)
        self.log_path = w / "dovecot.log"
        self.stdout_path = w / "dovecot.stdout"
        self.conf_path = w / "dovecot.conf"
        passwd_file = self.passwd_path = w / "dovecot.passwd"
        self.port = self.fixed_port or free_port(self.host)

        me = pwd.getpwuid(os.getuid()).pw_name
        my_group = grp.getgrgid(os.getgid()).gr_name
        if os.getuid() == 0:
            nobody = pwd.getpwnam("nobody") if _user_exists("nobody") else None
            uid, gid = (nobody.pw_uid, nobody.pw_gid) if nobody else (65534, 65534)
            self.mail_owner = (uid, gid)
            login_user = "dovenull" if _user_exists("dovenull") else "nobody"
            internal_user, internal_group = "root", "root"
            login_chroot = ""  # keep Dovecot's default chroot (base_dir/login)
            valid_chroot = f"valid_chroot_dirs = {self.maildir_root}"
            home = lambda u: f"{self.maildir_root}/./{u}"  # noqa: E731  (chroot /./ syntax)
            for dirpath, dirnames, filenames in os.walk(self.maildir_root):
                os.chown(dirpath, uid, gid)
                for name in filenames:
                    os.chown(os.path.join(dirpath, name), uid, gid)
        else:
            uid, gid = os.getuid(), os.getgid()
            self.mail_owner = (uid, gid)
            login_user, internal_user, internal_group = me, me, my_group
            login_chroot = "  chroot ="
            valid_chroot = ""
            home = lambda u: f"{self.maildir_root}/{u}"  # noqa: E731

        with open(passwd_file, "w", encoding="utf-8") as fh:
            for user, password in users.items():
                fh.write(f"{user}:{{PLAIN}}{password}:{uid}:{gid}::{home(user)}::"
                         f"{self.extra_fields.get(user, '')}\n")
        os.chmod(passwd_file, 0o600)

        template = _CONF_24 if self.version[:2] >= (2, 4) else _CONF_23
        listeners, trusted, ssl = [], [], "ssl = no"
        addr_key = "listen" if self.version[:2] >= (2, 4) else "address"
        if self.trusted_networks:
            trusted.append(f"login_trusted_networks = {self.trusted_networks}")
        if self.haproxy:
            self.proxy_port = free_port(self.host)
            trusted.append(f"haproxy_trusted_networks = {self.trusted_networks or self.host}")
            listeners.append(f"  inet_listener pop3_haproxy {{\n    {addr_key} = {self.host}\n"
                             f"    port = {self.proxy_port}\n    haproxy = yes\n  }}")
        if self.tls:
            self.tls_port = free_port(self.host)
            cert, key = self.tls
            ssl = f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}"
            listeners.append(f"  inet_listener pop3s {{\n    {addr_key} = {self.host}\n"
                             f"    port = {self.tls_port}\n    ssl = yes\n  }}")
        conf = template.format(
            listeners="\n".join(listeners), trusted="\n".join(trusted), ssl=ssl,
            version=".".join(map(str, self.version)), host=self.host, port=self.port,
            base_dir=base_dir, state_dir=state_dir,
            instance_name=f"pop3shield-test-{os.getpid()}-{self.port}",
            log_path=self.log_path, internal_user=internal_user,
            internal_group=internal_group, login_user=login_user,
            valid_chroot_dirs=valid_chroot, login_chroot=login_chroot,
            passwd_file=passwd_file, lock_session="yes" if self.lock_session else "no",
            extra=self.extra_config)
        self.conf_path.write_text(conf, encoding="utf-8")
        with contextlib.suppress(FileNotFoundError):
            self.log_path.unlink()

        with open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(
                [binary, "-F", "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
                env={"PATH": os.environ.get("PATH", os.defpath), "LANG": "C"})
        try:
            self.greeting = wait_for_pop3_greeting(
                self.host, self.port, self.startup_timeout,
                alive=self._alive, describe=self.diagnostics)
        except DovecotError:
            self._kill()
            raise
        return self.host, self.port

    def stop(self) -> None:
        """Stop the master (SIGTERM, then SIGKILL to its process group)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self._killpg(proc)
            # children normally exit with the master; sweep our own group anyway
            self._killpg(proc, check_only=True)
        if self._short_base_dir:
            shutil.rmtree(self._short_base_dir, ignore_errors=True)
            self._short_base_dir = None

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            self._killpg(proc)

    @staticmethod
    def _killpg(proc: subprocess.Popen, check_only: bool = False) -> None:
        """SIGKILL what is left of our process group (the master's pid is its id,
        thanks to start_new_session=True, so it only holds processes we started).

        With *check_only*, first give live members up to 5 s to exit on their
        own.  Zombies (children orphaned by the master, waiting for PID 1 to
        reap them) don't count: they are already dead.
        """
        pgid = proc.pid
        if check_only:
            deadline = time.monotonic() + 5
            while _group_has_live_members(pgid):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def _group_has_live_members(pgid: int) -> bool:
    """True if a non-zombie process is in process group *pgid*."""
    proc_dir = Path("/proc")
    if not (proc_dir / "self" / "stat").exists():  # not Linux: ask the kernel
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..." -- comm may contain spaces/parens
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False
