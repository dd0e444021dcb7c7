"""Drive real POP3 clients against (host, port, user, password).

Each ``fetch_with_<client>`` function returns the retrieved messages as a list
of bytes **in server order**, normalised back to POP3 wire form (CRLF line
endings, dots un-stuffed) by undoing *only* the documented, deterministic
changes that client makes when it stores a message:

=========  ==================================================================
client     what it changes when storing, and what we undo
=========  ==================================================================
poplib     returns lines without CRLF; we re-join with CRLF (+ final CRLF).
curl       nothing: ``curl pop3://h:p/N`` writes the un-stuffed body with
           CRLF exactly as received.
fetchmail  ``set invisible`` (no ``Received:`` header) and ``no rewrite``
           (addresses untouched) make it add nothing; the MDA is given LF
           line endings (fetchmail strips CR for MDAs).  We undo LF->CRLF.
mpop       ``received_header off``; maildir delivery writes LF line
           endings.  We undo LF->CRLF.
getmail6   ``delivered_to``/``received = false``; it always *prepends*
           ``Return-Path: <sender>`` (we remove exactly that first line),
           re-serialises via Python's ``email`` package (no visible change
           for these messages) and writes LF.  We undo LF->CRLF.
=========  ==================================================================

Converting LF back to CRLF is lossless only because :mod:`messages` contains
no bare CR; a message without a final newline comes back with CRLF appended
(the server must add it on the wire, see :func:`messages.expected_wire`).

Every subprocess has a timeout and runs with a private, empty ``HOME`` (and
client-specific private config/state), so nothing in ``~`` is read or written.
Credentials end up in private (0600) rc files; keep them free of whitespace,
quotes and backslashes (test users only).

:class:`Pop3Relay` is a transparent loopback TCP relay that records what a
client sends, to document and assert on the exact command sequences.
Observed against Dovecot 2.3.19 (CAPA advertises PIPELINING, SASL PLAIN LOGIN):

* poplib (our use): ``USER, PASS, STAT, RETR 1..n, QUIT``
* curl 7.88: per URL a new connection: ``CAPA, AUTH PLAIN <b64>, LIST|RETR n, QUIT``
* fetchmail 6.4.37: ``CAPA, USER, PASS, STAT, (LIST n, RETR n)*, QUIT`` --
  and ``STLS`` right after CAPA if advertised and ``sslproto ''`` is missing
  (aborting on ``-ERR``)
* mpop 1.4.18: ``CAPA, USER, PASS, STAT, LIST, UIDL, RETR 1``, then
  ``RETR 2..n`` pipelined in one write, ``QUIT``
* getmail 6.18.11: no CAPA; ``USER, PASS, UIDL, LIST, UIDL, LIST, RETR 1..n, QUIT``
"""

from __future__ import annotations

import contextlib
import os
import poplib
import re
import selectors
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from . import require_binary

__all__ = [
    "CLIENT_TIMEOUT",
    "ClientError",
    "ClientRun",
    "Pop3Relay",
    "lf_to_crlf",
    "fetch_with_poplib",
    "fetch_with_curl",
    "curl_list",
    "fetch_with_fetchmail",
    "fetch_with_mpop",
    "fetch_with_getmail",
    "FETCHERS",
]

#: Upper bound for any one client invocation, seconds.
CLIENT_TIMEOUT = 60


class ClientError(AssertionError):
    """A client run failed; the message carries its command line and output."""


@dataclass
class ClientRun:
    """Record of one subprocess invocation (for diagnostics)."""

    argv: list[str]
    returncode: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    extra: dict = field(default_factory=dict)

    def describe(self, limit: int = 4000) -> str:
        def clip(b: bytes) -> str:
            t = b.decode("utf-8", "replace")
            return t if len(t) <= limit else "...\n" + t[-limit:]
        return (f"command: {shlex.join(self.argv)}\nexit status: {self.returncode}\n"
                f"--- stdout ---\n{clip(self.stdout)}\n--- stderr ---\n{clip(self.stderr)}")


def lf_to_crlf(data: bytes) -> bytes:
    """Undo a client's CRLF->LF conversion: every LF not preceded by CR gets one."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _private_env(home: Path, **extra: str) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", os.defpath),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "TMPDIR": str(home),
        "USER": os.environ.get("USER", "root"),
        "LOGNAME": os.environ.get("LOGNAME", os.environ.get("USER", "root")),
    }
    env.update(extra)
    return env


def _run(argv: list[str], *, env: dict[str, str], cwd: Path | None = None,
         timeout: float = CLIENT_TIMEOUT, input: bytes | None = None,
         ok_codes: tuple[int, ...] = (0,)) -> ClientRun:
    run = ClientRun(argv=list(argv))
    try:
        proc = subprocess.run(argv, env=env, cwd=cwd, input=input,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        run.stdout, run.stderr = exc.stdout or b"", exc.stderr or b""
        raise ClientError(f"client timed out after {timeout}s\n{run.describe()}") from None
    run.returncode, run.stdout, run.stderr = proc.returncode, proc.stdout, proc.stderr
    if proc.returncode not in ok_codes:
        raise ClientError(f"client failed\n{run.describe()}")
    return run


def _check_rc_safe(user: str, password: str) -> None:
    for value in (user, password):
        if not value or re.search(r"[\s\"'\\#]", value):
            raise ValueError(f"credential {value!r} can't be written safely into client rc files")


def _write_private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, mode)
    return path


_DELIVERY_COUNTER = re.compile(r"\.M\d+P\d+Q(\d+)")


def _maildir_messages(maildir: Path) -> list[bytes]:
    """Messages of a Maildir (new/ and cur/) in delivery order.

    mpop and getmail both deliver strictly in server order and name files
    ``<secs>.M<usecs>P<pid>Q<delivery counter>...``; sort by that counter,
    falling back to (mtime, name).
    """
    files = [p for sub in ("new", "cur") for p in (maildir / sub).iterdir() if p.is_file()]

    def key(p: Path):
        m = _DELIVERY_COUNTER.search(p.name)
        return (int(m.group(1)) if m else 1 << 62, p.stat().st_mtime_ns, p.name)

    files.sort(key=key)
    return [p.read_bytes() for p in files]


# ----------------------------------------------------------------- poplib
def _poplib_message(lines: list[bytes]) -> bytes:
    """poplib strips each line's CRLF (and un-stuffs); put the CRLFs back."""
    return b"".join(line + b"\r\n" for line in lines)


class _SourcedPOP3(poplib.POP3):
    """poplib connecting from a chosen local address (a distinct client behind a proxy)."""

    def __init__(self, host: str, port: int, timeout: float, source: str) -> None:
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):  # type: ignore[override]
        return socket.create_connection((self.host, self.port), timeout, source_address=(self._source, 0))


def fetch_with_poplib(host: str, port: int, user: str, password: str, *,
                      timeout: float = 30, source: str | None = None) -> list[bytes]:
    """USER/PASS, STAT, RETR 1..n, QUIT with Python's poplib (from *source*, if given)."""
    conn = (poplib.POP3(host, port, timeout=timeout) if source is None
            else _SourcedPOP3(host, port, timeout, source))
    try:
        conn.user(user)
        conn.pass_(password)
        count, _size = conn.stat()
        out = [_poplib_message(conn.retr(i)[1]) for i in range(1, count + 1)]
        conn.quit()
        return out
    finally:
        with contextlib.suppress(OSError):
            conn.close()


# ------------------------------------------------------------------- curl
def _curl_argv(curl: str, host: str, port: int, user: str, password: str, path: str,
               login_options: str | None, source: str | None = None) -> list[str]:
    url_host = f"[{host}]" if ":" in host else host
    argv = [curl, "--disable",  # must be first: ignore any .curlrc
            "--silent", "--show-error", "--fail", "--max-time", str(CLIENT_TIMEOUT),
            "--connect-timeout", "10", "--noproxy", "*",
            "--user", f"{user}:{password}"]
    if login_options:
        argv += ["--login-options", login_options]
    if source:
        argv += ["--interface", source]
    return argv + [f"pop3://{url_host}:{port}/{path}"]


def curl_list(host: str, port: int, user: str, password: str, *, home: Path,
              login_options: str | None = None, source: str | None = None) -> list[tuple[int, int]]:
    """``curl pop3://host:port/`` -> LIST; returns [(msgno, octets), ...]."""
    curl = require_binary("curl")
    run = _run(_curl_argv(curl, host, port, user, password, "", login_options, source),
               env=_private_env(home))
    listing = []
    for line in run.stdout.split(b"\r\n"):
        if line.strip():
            num, size = line.split()
            listing.append((int(num), int(size)))
    return listing


def fetch_with_curl(host: str, port: int, user: str, password: str, *, home: Path,
                    login_options: str | None = None, source: str | None = None) -> list[bytes]:
    """One ``curl pop3://host:port/N`` (LIST first, then RETR N) per message.

    curl (7.88) sends CAPA, then ``AUTH PLAIN`` when the server offers SASL
    PLAIN, otherwise USER/PASS; *login_options* (``--login-options``), e.g.
    ``AUTH=+LOGIN``, changes that.  curl un-stuffs dots itself and writes the
    body with the CRLFs as received, so no normalisation is applied.
    """
    curl = require_binary("curl")
    env = _private_env(home)
    out = []
    for num, _size in curl_list(host, port, user, password, home=home,
                                login_options=login_options, source=source):
        run = _run(_curl_argv(curl, host, port, user, password, str(num), login_options, source),
                   env=env)
        out.append(run.stdout)
    return out


# ------------------------------------------------------------- fetchmail
_MDA_SCRIPT = """\
#!{python}
# Test MDA for fetchmail: store stdin verbatim as <dir>/<seq>.eml (seq = 00001, ...).
import os, sys
d = sys.argv[1]
n = len([f for f in os.listdir(d) if f.endswith(".eml")]) + 1
data = sys.stdin.buffer.read()
tmp = os.path.join(d, "%05d.tmp" % n)
with open(tmp, "wb") as fh:
    fh.write(data)
os.rename(tmp, os.path.join(d, "%05d.eml" % n))
"""


def fetch_with_fetchmail(host: str, port: int, user: str, password: str, *,
                         home: Path, extra_options: str = "") -> list[bytes]:
    """``fetchmail --keep --all`` through a trivial MDA that stores stdin.

    Private rc file (mode 0600), ``--fetchmailhome`` and HOME, so neither
    ``~/.fetchmailrc`` nor ``~/.fetchids`` is touched.  rc options and why:

    * ``sslproto ''`` + ``no sslcertck``: fetchmail >= 6.4 otherwise
      negotiates STLS whenever the server advertises it (and would fail
      against a server that refuses it); ``''`` means "no TLS at all";
    * ``keep`` + ``fetchall``: don't DELE, and retrieve old (already-seen)
      messages too;
    * ``no rewrite``: don't rewrite addresses in To/Cc/From headers;
    * ``set invisible`` (== ``--invisible``): no ``Received:`` header;
    * ``mda``: our script stores stdin verbatim.  fetchmail hands the MDA LF
      line endings (``stripcr`` is the default with an MDA); we undo that.
    """
    _check_rc_safe(user, password)
    fetchmail = require_binary("fetchmail")
    home = Path(home)
    fmhome = home / "fetchmailhome"
    fmhome.mkdir(parents=True, exist_ok=True, mode=0o700)
    outdir = home / "delivered"
    outdir.mkdir(parents=True, exist_ok=True)
    mda = home / "mda.py"
    mda.write_text(_MDA_SCRIPT.format(python=sys.executable), encoding="utf-8")
    mda.chmod(stat.S_IRWXU)
    rc = _write_private(home / "fetchmailrc", (
        "set no syslog\n"
        "set invisible\n"
        f"poll {host} with proto POP3 port {port}\n"
        f"  user \"{user}\" there with password \"{password}\" is \"{_local_user()}\" here\n"
        "  options keep fetchall no rewrite sslproto '' no sslcertck\n"
        f"  mda \"{mda} {outdir}\"\n"
        f"  {extra_options}\n"))
    argv = [fetchmail, "--nodetach", "--fetchmailrc", str(rc), "-v",
            "--pidfile", str(fmhome / "fetchmail.pid")]
    env = _private_env(home, FETCHMAILHOME=str(fmhome))
    run = _run(argv, env=env, ok_codes=(0,))  # 1 == "no mail", also a failure here
    files = sorted(outdir.glob("*.eml"))
    if not files:
        raise ClientError(f"fetchmail delivered nothing\n{run.describe()}")
    return [lf_to_crlf(p.read_bytes()) for p in files]


def _local_user() -> str:
    import pwd
    return pwd.getpwuid(os.getuid()).pw_name


# ------------------------------------------------------------------ mpop
def fetch_with_mpop(host: str, port: int, user: str, password: str, *,
                    home: Path) -> list[bytes]:
    """``mpop --keep=on --only-new=off`` delivering to a private Maildir.

    Private config file (mode 0600, passed with ``-C``) holding the
    equivalents of ``--auth=user`` (plain USER/PASS), ``--tls=off``,
    ``--keep=on``, ``--only-new=off`` (also fetch already-seen mail),
    ``--received-header=off``, ``--uidls-file=<private>`` and
    ``--delivery=maildir,<dir>``.  Maildir delivery converts CRLF to LF --
    undone.  mpop pipelines RETR 2..n when the server advertises PIPELINING.
    """
    _check_rc_safe(user, password)
    mpop = require_binary("mpop")
    home = Path(home)
    maildir = home / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    conf = _write_private(home / "mpoprc", (
        "defaults\n"
        "account test\n"
        f"host {host}\n"
        f"port {port}\n"
        f"user {user}\n"
        f"password {password}\n"
        "auth user\n"
        "tls off\n"
        "keep on\n"
        "only_new off\n"
        "received_header off\n"
        f"uidls_file {home / 'mpop_uidls'}\n"
        f"delivery maildir {maildir}\n"
        f"timeout {CLIENT_TIMEOUT}\n"))
    argv = [mpop, "-C", str(conf), "--debug", "test"]
    run = _run(argv, env=_private_env(home))
    msgs = _maildir_messages(maildir)
    if not msgs:
        raise ClientError(f"mpop delivered nothing\n{run.describe()}")
    return [lf_to_crlf(m) for m in msgs]


# --------------------------------------------------------------- getmail6
_GETMAIL_RETURN_PATH = re.compile(rb"\AReturn-Path: <[^>\r\n]*>\r?\n")


def fetch_with_getmail(host: str, port: int, user: str, password: str, *,
                       home: Path) -> list[bytes]:
    """getmail6 ``SimplePOP3Retriever`` -> ``Maildir``, ``read_all``, no delete.

    Private rc file (``--rcfile``) and ``--getmaildir`` (its "oldmail" state).
    getmail re-serialises every message through Python's ``email`` package
    and, unconditionally, *prepends* ``Return-Path: <sender>`` (removing any
    existing Return-Path header; our messages have none) -- we strip that one
    line; ``delivered_to``/``received = false`` suppress the other headers it
    would add.  Maildir files have LF line endings -- undone.

    getmail refuses Maildir delivery as root, so under root the Maildir lives
    in a fresh ``/tmp/getmail-maildir-*`` dir owned by ``nobody`` and the rc
    file says ``user = nobody`` (pytest's 0700 tmp dir is not reachable for
    nobody); it is removed again afterwards.
    """
    _check_rc_safe(user, password)
    getmail = require_binary("getmail")
    home = Path(home)
    rcdir = home / "getmail"
    rcdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    as_root = os.geteuid() == 0
    scratch = None
    try:
        if as_root:
            import pwd
            nobody = pwd.getpwnam("nobody")
            scratch = Path(tempfile.mkdtemp(prefix="getmail-maildir-"))
            os.chmod(scratch, 0o755)
            maildir = scratch / "Maildir"
        else:
            maildir = home / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        if as_root:
            for d in (maildir, maildir / "cur", maildir / "new", maildir / "tmp"):
                os.chown(d, nobody.pw_uid, nobody.pw_gid)
        rc = _write_private(rcdir / "getmailrc", (
            "[retriever]\n"
            "type = SimplePOP3Retriever\n"
            f"server = {host}\n"
            f"port = {port}\n"
            f"username = {user}\n"
            f"password = {password}\n"
            f"timeout = {CLIENT_TIMEOUT}\n"
            "\n[destination]\n"
            "type = Maildir\n"
            f"path = {maildir}/\n"
            + ("user = nobody\n" if as_root else "")
            + "\n[options]\n"
            "read_all = true\n"
            "delete = false\n"
            "delivered_to = false\n"
            "received = false\n"
            "record_mailbox = false\n"
            "message_log_syslog = false\n"
            "verbose = 2\n"))
        argv = [getmail, f"--getmaildir={rcdir}", f"--rcfile={rc}"]
        run = _run(argv, env=_private_env(home))
        msgs = _maildir_messages(maildir)
        if not msgs:
            raise ClientError(f"getmail delivered nothing\n{run.describe()}")
        out = []
        for m in msgs:
            stripped, n = _GETMAIL_RETURN_PATH.subn(b"", m, count=1)
            if n != 1:
                raise ClientError(f"getmail did not prepend the expected Return-Path "
                                  f"header: {m[:200]!r}")
            out.append(lf_to_crlf(stripped))
        return out
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


#: name -> (binary needed, fetch function taking (host, port, user, pw, home=...))
FETCHERS = {
    "poplib": (None, lambda h, p, u, pw, home: fetch_with_poplib(h, p, u, pw)),
    "curl": ("curl", fetch_with_curl),
    "fetchmail": ("fetchmail", fetch_with_fetchmail),
    "mpop": ("mpop", fetch_with_mpop),
    "getmail": ("getmail", fetch_with_getmail),
}


# ------------------------------------------------------------ TCP relay
class Pop3Relay:
    """A transparent loopback TCP relay that records both directions.

    ``with Pop3Relay(host, port) as relay:`` point the client at
    ``relay.host, relay.port``; afterwards ``relay.client_lines()`` lists, per
    connection, the lines the client sent (credentials masked) and
    ``relay.sessions`` holds the raw bytes.  Server->client data is kept up to
    ``keep_server_bytes`` per connection.
    """

    def __init__(self, upstream_host: str, upstream_port: int, *,
                 keep_server_bytes: int = 64 * 1024, idle_timeout: float = 120):
        self.upstream = (upstream_host, upstream_port)
        self.keep_server_bytes = keep_server_bytes
        self.idle_timeout = idle_timeout
        self.sessions: list[dict] = []
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET6 if ":" in upstream_host
                                       else socket.AF_INET)
        self._listener.bind((upstream_host, 0))
        self._listener.listen(16)
        self.host = upstream_host
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True,
                                          name="pop3-relay-accept")

    def __enter__(self):
        self._acceptor.start()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._acceptor.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)

    def _accept_loop(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _addr = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._pump, args=(client,), daemon=True,
                                 name="pop3-relay-pump")
            self._threads.append(t)
            t.start()

    def _pump(self, client: socket.socket) -> None:
        record = {"c2s": bytearray(), "c2s_chunks": [], "s2c": bytearray(), "s2c_total": 0}
        with self._lock:
            self.sessions.append(record)
        try:
            server = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, (server, "c2s"))
        sel.register(server, selectors.EVENT_READ, (client, "s2c"))
        open_ends = 2
        try:
            while open_ends and not self._stop.is_set():
                events = sel.select(timeout=self.idle_timeout)
                if not events:
                    break  # idle too long
                for key, _ in events:
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    dst, direction = key.data
                    try:
                        data = src.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(src)
                        open_ends -= 1
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_WR)
                        continue
                    if direction == "c2s":
                        record["c2s"] += data
                        record["c2s_chunks"].append(bytes(data))
                    else:
                        record["s2c_total"] += len(data)
                        room = self.keep_server_bytes - len(record["s2c"])
                        if room > 0:
                            record["s2c"] += data[:room]
                    try:
                        dst.sendall(data)
                    except OSError:
                        open_ends = 0
                        break
        finally:
            sel.close()
            for s in (client, server):
                with contextlib.suppress(OSError):
                    s.close()

    def client_lines(self, *, mask_secrets: bool = True) -> list[list[str]]:
        """Per connection, the command lines the client sent."""
        out = []
        with self._lock:
            sessions = list(self.sessions)
        for rec in sessions:
            lines = bytes(rec["c2s"]).decode("utf-8", "replace").split("\r\n")
            if lines and lines[-1] == "":
                lines.pop()
            if mask_secrets:
                lines = _mask_secrets(lines)
            out.append(lines)
        return out

    def pipelined_batches(self) -> list[list[str]]:
        """Per connection, reads from the client that carried >1 command line.

        (A heuristic for PIPELINING: commands the client wrote without waiting
        for the previous response arrive in one segment.)
        """
        out = []
        with self._lock:
            sessions = list(self.sessions)
        for rec in sessions:
            batches = []
            for chunk in rec["c2s_chunks"]:
                lines = [x for x in chunk.decode("utf-8", "replace").split("\r\n") if x]
                if len(lines) > 1:
                    batches.append(_mask_secrets(lines))
            out.append(batches)
        return out

    def server_first_lines(self) -> list[list[str]]:
        """Per connection, the status lines (+OK/-ERR) the server sent (best effort)."""
        out = []
        with self._lock:
            sessions = list(self.sessions)
        for rec in sessions:
            text = bytes(rec["s2c"]).decode("utf-8", "replace")
            out.append([line for line in text.split("\r\n")
                        if line.startswith(("+OK", "-ERR", "+ "))])
        return out


_POP3_COMMANDS = frozenset(
    "USER PASS APOP AUTH CAPA STLS STAT LIST RETR DELE NOOP RSET QUIT TOP UIDL "
    "LAST UTF8 LANG XTND".split())


def _mask_secrets(lines: list[str]) -> list[str]:
    """Hide passwords: PASS/APOP arguments, AUTH initial responses, SASL lines."""
    masked, in_sasl = [], False
    for line in lines:
        words = line.split()
        word = words[0].upper() if words else ""
        if in_sasl and (word not in _POP3_COMMANDS or line == "*"):
            masked.append("*" if line == "*" else "*** (SASL response)")
            continue
        in_sasl = False
        if word in ("PASS", "APOP"):
            line = words[0] + " ***"
        elif word == "AUTH" and len(words) > 2:
            line = " ".join(words[:2]) + " ***"
        elif word == "AUTH" and len(words) == 2:
            in_sasl = True
        masked.append(line)
    return masked
