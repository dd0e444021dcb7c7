"""Dovecot passwd-file credentials: parse, hash and verify.

Line format (Dovecot ``passwd-file``)::

    user:{SCHEME}hash[:uid:gid:gecos:home:shell:extra_fields]

uid, gid, gecos, home and shell are accepted and ignored (the Maildir comes from
``backend.maildir``).  ``#`` comments and blank lines are skipped.

Extra fields (the 8th colon-separated field onward, joined back with ``:`` and split on spaces,
as Dovecot does) are ``key=value`` or a bare ``key``.  The ones that decide who may log in are
honoured, the rest are refused at load, naming file, line and field, so that a file migrated
from Dovecot never silently re-opens a disabled account or drops an address restriction:

* honoured: ``nologin`` (login refused after the password verified; with ``reason=TEXT`` the
  client gets ``-ERR [AUTH] TEXT``), ``allow_nets=NET,...`` (login refused from other client
  addresses, answered like a wrong password; a client at ``::ffff:a.b.c.d`` is matched as
  ``a.b.c.d``; ``local`` = a connection without an IP address),
  ``fail`` (always refused, like a wrong password), ``nodelay`` (a ``nologin`` refusal is
  answered without the failure delay).  Boolean fields are true whenever present, whatever
  their value (``nologin=no`` disables the account), as in Dovecot.
* kept on :attr:`PasswdEntry.extra` for the upstream relay, no effect today: ``proxy``,
  ``host``, ``hostip``, ``port``, ``ssl``, ``starttls``, ``source_ip``, ``proxy_timeout``.
* accepted with no effect: ``userdb_*`` (user database settings), ``forward_*``, ``event_*``.
* everything else is refused, in particular what pop3shield does not implement and what would
  change who may log in: ``nopassword``, ``noauthenticate``, ``allow_real_nets``, ``user``,
  ``login_user``, ``destuser``, ``proxy_maybe``, ``proxy_always``, ``master``, ``pass``,
  ``k5principals``, ``delay_until``, the ``:protected``/``:remove`` suffixes, duplicated fields,
  and ``%`` variables in the honoured and relay fields (Dovecot would expand them).

Supported schemes (case-insensitive, aliases in brackets):

* ``ARGON2ID`` -- argon2-cffi / PHC format ``$argon2id$v=19$m=...,t=...,p=...$salt$hash``
* ``BLF-CRYPT`` [``BCRYPT``] -- ``$2a$``, ``$2b$`` or ``$2y$`` bcrypt hashes
* ``PLAIN`` [``CLEARTEXT``] -- only with ``allow_plaintext=True``; a stolen file is then a list
  of working passwords, so it must be an explicit decision.

bcrypt and passwords over 72 bytes: bcrypt only ever looked at the first 72 bytes, and the hashes
Dovecot (crypt_blowfish) and others produced were made that way, so :func:`verify_password`
truncates to 72 bytes -- deterministically, and compatible with existing files.  The ``bcrypt``
library itself now raises instead.  :func:`hash_password` refuses to create a new bcrypt hash
for such a password (``ValueError``): a hash that silently ignores the end of the password
should not be made on purpose; use ARGON2ID.

Nothing here logs, and no error message contains a password or a hash: errors name the file and
line number only.  Verification is slow on purpose (argon2, bcrypt) and therefore BLOCKING --
callers run it in a thread.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import argon2
import bcrypt

__all__ = [
    "DUMMY_ENTRY",
    "LOCAL",
    "PasswdEntry",
    "PasswdError",
    "dummy_entry_costliest",
    "dummy_entry_like",
    "format_entry",
    "hash_password",
    "line_problem",
    "load_passwd",
    "user_problem",
    "verify_password",
]

ARGON2ID = "ARGON2ID"
BLF_CRYPT = "BLF-CRYPT"
PLAIN = "PLAIN"

#: scheme as written (upper-cased) -> canonical scheme
SCHEME_ALIASES: dict[str, str] = {
    "ARGON2ID": ARGON2ID,
    "BLF-CRYPT": BLF_CRYPT,
    "BCRYPT": BLF_CRYPT,
    "PLAIN": PLAIN,
    "CLEARTEXT": PLAIN,
}
PLAINTEXT_SCHEMES = frozenset({PLAIN})
BCRYPT_MAX_BYTES = 72
BCRYPT_COST = 12

_SCHEME_PREFIX = re.compile(r"^\{([^{}]*)\}")
_BCRYPT_HASH = re.compile(r"^\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}$")
_HASHER = argon2.PasswordHasher()


class PasswdError(Exception):
    """A problem with the passwd file; names file and line, never a password or hash."""

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        self.path = path
        self.line = line
        self.problem = problem
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {problem}")


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: the ``allow_nets`` keyword for a connection without an IP address (a unix socket)
LOCAL = "local"


@dataclass(frozen=True)
class PasswdEntry:
    """One user's stored credential; the hash stays out of repr so it cannot leak into logs.

    ``extra`` holds the line's extra fields (``key -> value``, ``""`` for a bare key), read-only.
    The login policy parsed from them: ``nologin`` (refused after the password verified, with
    ``reason`` for the client), ``allow_nets`` (None: from anywhere; else the networks, plus
    :data:`LOCAL` for a connection without an IP address), ``nodelay``.
    """

    user: str
    scheme: str
    hash: str = field(repr=False)
    extra: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    nologin: bool = False
    reason: str | None = None
    allow_nets: tuple[IPNetwork | str, ...] | None = None
    nodelay: bool = False

    def allows_address(self, address: str | None) -> bool:
        """Whether ``allow_nets`` lets a client at ``address`` (None: no IP address) log in."""
        if self.allow_nets is None:
            return True
        if address is None:
            return LOCAL in self.allow_nets
        ip = _client_ip(address)
        if ip is None:
            return False
        return any(not isinstance(net, str) and ip.version == net.version and ip in net
                   for net in self.allow_nets)


def _client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address, an IPv4-mapped IPv6 address as plain IPv4 (as Dovecot matches it)."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.scope_id is not None:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    return ip


# --------------------------------------------------------------------------- validation


def user_problem(user: str) -> str | None:
    """Why a user name cannot be stored, or None when it is fine."""
    if not user:
        return "empty user name"
    if ":" in user:
        return "user name contains ':'"
    for ch in user:
        if ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf"):
            return "user name contains whitespace or control characters"
    return None


def _hash_problem(scheme: str, hashed: str) -> str | None:
    """Reject malformed hashes at load time instead of failing every login later."""
    if scheme == ARGON2ID:
        try:
            params = argon2.extract_parameters(hashed)
        except (argon2.exceptions.InvalidHashError, ValueError):
            return f"malformed {scheme} hash"
        if params.type is not argon2.Type.ID:
            return f"{scheme} entry holds a hash of another argon2 variant"
        return None
    if scheme == BLF_CRYPT:
        return None if _BCRYPT_HASH.match(hashed) else f"malformed {scheme} hash"
    return None


def _parse_password(field_text: str, allow_plaintext: bool) -> tuple[str, str] | str:
    """(scheme, hash) of a password field, or the problem (which never quotes the secret)."""
    match = _SCHEME_PREFIX.match(field_text)
    if not match:
        return "password has no {SCHEME} prefix"
    written = match.group(1).upper()
    scheme = SCHEME_ALIASES.get(written)
    if scheme is None:
        return f"unknown password scheme {{{_printable(written)}}}"
    if scheme in PLAINTEXT_SCHEMES and not allow_plaintext:
        return f"{{{written}}} entries need auth.allow_plaintext = true"
    hashed = field_text[match.end():]
    return _hash_problem(scheme, hashed) or (scheme, hashed)


def _printable(text: str, limit: int = 32) -> str:
    """A scheme name is operator text, but keep it short and on one line in the message."""
    return text[:limit].encode("unicode_escape").decode("ascii")


# --------------------------------------------------------------------------- loading


def _read_lines(path: str) -> list[bytes]:
    try:
        with open(path, "rb") as handle:
            return handle.read().split(b"\n")
    except OSError as exc:
        raise PasswdError(path, None, f"cannot read: {exc.strerror or exc}") from None


#: honoured: they decide who may log in
_POLICY_FIELDS = frozenset({"nologin", "reason", "allow_nets", "fail", "nodelay"})
#: kept for the upstream relay (routing to a backend); no effect on who may log in
_RELAY_FIELDS = frozenset({"proxy", "host", "hostip", "port", "ssl", "starttls", "source_ip", "proxy_timeout"})
#: accepted with no effect: user database settings, proxy forwarding, event fields
_IGNORED_PREFIXES = ("userdb_", "forward_", "event_")
#: Dovecot fields that would change who may log in (or as whom) and that pop3shield does not do
_UNSUPPORTED = {
    "nopassword": "would accept any password",
    "noauthenticate": "would skip authentication",
    "allow_real_nets": "checks the address of a proxy in front, which pop3shield does not tell apart",
    "user": "would rename the user",
    "login_user": "would rename the user",
    "destuser": "would rename the user",
    "proxy_maybe": "would log in locally or proxy",
    "proxy_always": "belongs to proxy_maybe",
    "master": "is a master-user login",
    "pass": "is a master-user password",
    "k5principals": "is for GSSAPI",
    "delay_until": "would delay logins",
}
#: a reason must fit "-ERR [AUTH] " + reason + CRLF in RFC 2449's 512 octets
REASON_MAX = 512 - len("-ERR [AUTH] ") - 2


def _field_problem(key: str, value: str) -> str | None:
    """Why an extra field cannot be loaded, or None."""
    shown = _printable(key)
    if key in _UNSUPPORTED:
        return f"extra field '{shown}' is not supported: it {_UNSUPPORTED[key]}"
    if key.startswith(_IGNORED_PREFIXES):
        return None
    if key not in _POLICY_FIELDS and key not in _RELAY_FIELDS:
        return (f"unsupported extra field '{shown}' (extra fields are space-separated key=value; "
                f"user database settings need the userdb_ prefix)")
    if "%" in value:
        return f"extra field '{shown}': %variables are not supported"
    if key == "reason":
        if len(value) > REASON_MAX or any(not 0x21 <= ord(ch) < 0x7F for ch in value):
            return f"extra field 'reason': at most {REASON_MAX} printable ASCII characters"
    if key == "allow_nets":
        return _nets(value)[1]
    if key == "port" and not (value.isdigit() and 0 < int(value) < 65536):
        return "extra field 'port': not a port number"
    return None


def _nets(value: str) -> tuple[tuple[IPNetwork | str, ...], str | None]:
    """The networks of an ``allow_nets`` value, and the problem if one does not parse."""
    nets: list[IPNetwork | str] = []
    for item in value.split(","):
        item = item.strip()
        if item == LOCAL:
            nets.append(LOCAL)
            continue
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            return (), f"extra field 'allow_nets': '{_printable(item)}' is not a network"
        mapped = net.network_address.ipv4_mapped if isinstance(net, ipaddress.IPv6Network) else None
        if mapped is not None and net.prefixlen >= 96:
            # Clients at ::ffff:a.b.c.d are matched as a.b.c.d, so (as in Dovecot) such a network
            # could never match: say so instead of refusing the user at every login.
            return (), (f"extra field 'allow_nets': '{_printable(item)}' is an IPv4-mapped network "
                        f"that never matches; write {mapped}/{net.prefixlen - 96}")
        nets.append(net)
    return tuple(nets), None


def _extra_fields(fields: list[str]) -> dict[str, str] | str:
    """The extra fields of a line split on ':' (``fields[7:]``), or the problem."""
    rest = fields[7:]
    if not rest:
        return {}
    if rest[0] == "":
        if any(rest[1:]):
            # Dovecot's old format: an empty 8th field makes the rest a mail location.
            return ("field 8 is empty but later fields are not: extra fields start in field 8 "
                    "(Dovecot would read the rest as a mail location)")
        return {}
    extra: dict[str, str] = {}
    for token in ":".join(rest).split(" "):
        if not token:
            continue
        key, _, value = token.partition("=")
        if not key:
            return "extra field without a name"
        if key in extra:
            return f"extra field '{_printable(key)}' given twice"
        problem = _field_problem(key, value)
        if problem:
            return problem
        extra[key] = value
    return extra


def _policy(extra: dict[str, str]) -> dict[str, object]:
    """PasswdEntry keyword arguments for the honoured fields (already validated)."""
    policy: dict[str, object] = {"extra": MappingProxyType(extra)}
    if "nologin" in extra or "fail" in extra:
        policy["nologin"] = True
    if extra.get("reason") and "fail" not in extra:
        policy["reason"] = extra["reason"]
    if "allow_nets" in extra:
        policy["allow_nets"] = _nets(extra["allow_nets"])[0]
    if "nodelay" in extra and "fail" not in extra:
        policy["nodelay"] = True
    return policy


def line_problem(line: str, allow_plaintext: bool = False) -> str | None:
    """Why one passwd-file line (without its line ending) cannot be loaded, or None."""
    try:
        _parse_text("", 0, line, allow_plaintext)
    except PasswdError as exc:
        return exc.problem
    return None


def _parse_line(path: str, number: int, raw: bytes, allow_plaintext: bool) -> PasswdEntry | None:
    try:
        line = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        raise PasswdError(path, number, "not valid UTF-8") from None
    return _parse_text(path, number, line, allow_plaintext)


def _parse_text(path: str, number: int, line: str, allow_plaintext: bool) -> PasswdEntry | None:
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    fields = line.split(":")
    if len(fields) < 2:
        raise PasswdError(path, number, "expected user:{SCHEME}hash")
    # the session passes user names on in NFC (core.grammar.normalise_username), so a name
    # stored decomposed (as macOS types it) must be compared in that form too
    user = unicodedata.normalize("NFC", fields[0])
    problem = user_problem(user)
    if problem:
        raise PasswdError(path, number, problem)
    parsed = _parse_password(fields[1], allow_plaintext)
    if isinstance(parsed, str):
        raise PasswdError(path, number, parsed)
    extra = _extra_fields(fields)
    if isinstance(extra, str):
        raise PasswdError(path, number, extra)
    return PasswdEntry(user=user, scheme=parsed[0], hash=parsed[1], **_policy(extra))  # type: ignore[arg-type]


def load_passwd(path: str | os.PathLike[str], *, allow_plaintext: bool = False) -> dict[str, PasswdEntry]:
    """Parse a whole passwd file; any bad line fails the load (a half-loaded user list is worse)."""
    name = os.fspath(path)
    entries: dict[str, PasswdEntry] = {}
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(_read_lines(name), start=1):
        entry = _parse_line(name, number, raw, allow_plaintext)
        if entry is None:
            continue
        if entry.user in entries:
            raise PasswdError(
                name, number, f"duplicate user {entry.user!r} (first on line {first_seen[entry.user]})"
            )
        entries[entry.user] = entry
        first_seen[entry.user] = number
    return entries


# --------------------------------------------------------------------------- hashing


def _as_bytes(password: str | bytes) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else bytes(password)


def hash_password(password: str | bytes, scheme: str = ARGON2ID) -> str:
    """A ``{SCHEME}...`` password field for a new entry (BLOCKING: deliberately slow)."""
    canonical = SCHEME_ALIASES.get(scheme.upper())
    secret = _as_bytes(password)
    if canonical == ARGON2ID:
        return f"{{{ARGON2ID}}}{_HASHER.hash(secret)}"
    if canonical == BLF_CRYPT:
        if len(secret) > BCRYPT_MAX_BYTES:
            raise ValueError("bcrypt ignores bytes past 72; use ARGON2ID for longer passwords")
        hashed = bcrypt.hashpw(secret, bcrypt.gensalt(BCRYPT_COST)).decode("ascii")
        return f"{{{BLF_CRYPT}}}{hashed}"
    if canonical == PLAIN:
        return f"{{{PLAIN}}}{_plain_field(secret)}"
    raise ValueError(f"unsupported scheme {_printable(scheme)!r}")


def _plain_field(secret: bytes) -> str:
    """A plaintext password must survive the line format: UTF-8, no ':' and no line breaks."""
    try:
        text = secret.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("a PLAIN password must be valid UTF-8") from None
    if any(ch in text for ch in ":\r\n"):
        raise ValueError("a PLAIN password cannot contain ':' or line breaks")
    return text


def format_entry(user: str, hashed: str) -> str:
    """A passwd-file line for ``user`` with a field made by :func:`hash_password`."""
    problem = user_problem(user)
    if problem:
        raise ValueError(problem)
    if not _SCHEME_PREFIX.match(hashed) or any(ch in hashed for ch in ":\r\n"):
        raise ValueError("hashed must be a '{SCHEME}...' field without ':' or line breaks")
    return f"{user}:{hashed}"


# --------------------------------------------------------------------------- verification


def verify_password(entry: PasswdEntry, password: bytes | str) -> bool:
    """True if ``password`` matches; any failure inside the libraries is just False.

    BLOCKING (argon2, bcrypt are slow by design): run in a thread.
    """
    try:
        return _VERIFIERS[entry.scheme](entry.hash, _as_bytes(password))
    except Exception:  # noqa: BLE001 - a malformed hash or odd input must never crash a login
        return False


def _verify_argon2(hashed: str, secret: bytes) -> bool:
    try:
        return _HASHER.verify(hashed, secret)
    except argon2.exceptions.VerifyMismatchError:
        return False


def _verify_bcrypt(hashed: str, secret: bytes) -> bool:
    return bcrypt.checkpw(secret[:BCRYPT_MAX_BYTES], hashed.encode("ascii"))


def _verify_plain(hashed: str, secret: bytes) -> bool:
    return hmac.compare_digest(hashed.encode("utf-8"), secret)


_VERIFIERS = {ARGON2ID: _verify_argon2, BLF_CRYPT: _verify_bcrypt, PLAIN: _verify_plain}


# --------------------------------------------------------------------------- timing oracle


def _random_secret() -> bytes:
    return os.urandom(32).hex().encode("ascii")


#: verified against for unknown users so they cost as much as known ones (argon2 defaults)
DUMMY_ENTRY = PasswdEntry(user="", scheme=ARGON2ID, hash=_HASHER.hash(_random_secret()))


def _cost_key(entry: PasswdEntry) -> tuple[str, str]:
    """What decides how long verifying takes: the scheme and its cost parameters."""
    if entry.scheme == ARGON2ID:
        # "$argon2id$v=19$m=65536,t=3,p=4$salt$hash" -> "v=19$m=65536,t=3,p=4"
        return entry.scheme, "$".join(entry.hash.split("$")[2:4])
    if entry.scheme == BLF_CRYPT:
        return entry.scheme, entry.hash[:7]  # "$2b$12$"
    return entry.scheme, ""


_DUMMIES: dict[tuple[str, str], PasswdEntry] = {}


def dummy_entry_like(entries: Iterable[PasswdEntry]) -> PasswdEntry:
    """A dummy whose verification costs what the file's most common kind of entry costs.

    DUMMY_ENTRY alone would still leak: with bcrypt cost 12 users in the file, an unknown user
    answering faster than a known one is an account-enumeration oracle.  Built once per
    (scheme, cost parameters) and cached; BLOCKING the first time (it hashes).
    """
    entries = list(entries)
    counts = Counter(_cost_key(entry) for entry in entries)
    if not counts:
        return DUMMY_ENTRY
    key = counts.most_common(1)[0][0]
    if key not in _DUMMIES:
        sample = next(entry for entry in entries if _cost_key(entry) == key)
        _DUMMIES[key] = _make_dummy(sample)
    return _DUMMIES[key]


#: seconds one verification against each cached dummy took (measured once, when it was made)
_DUMMY_COSTS: dict[tuple[str, str], float] = {}


def dummy_entry_costliest(entries: Iterable[PasswdEntry]) -> PasswdEntry:
    """A dummy whose verification costs what the file's costliest kind of entry costs.

    In a file that is mostly ``{PLAIN}`` with some argon2id and bcrypt users (a migration in
    progress), the most common kind would answer unknown users without hashing. Each kind
    (scheme and cost parameters) gets a dummy, timed once; the slowest is used. BLOCKING the
    first time a kind is seen (it hashes and verifies once).
    """
    samples: dict[tuple[str, str], PasswdEntry] = {}
    for entry in entries:
        samples.setdefault(_cost_key(entry), entry)
    if not samples:
        return DUMMY_ENTRY
    for key, sample in samples.items():
        if key not in _DUMMIES:
            _DUMMIES[key] = _make_dummy(sample)
        if key not in _DUMMY_COSTS:
            started = time.perf_counter()
            verify_password(_DUMMIES[key], _random_secret())
            _DUMMY_COSTS[key] = time.perf_counter() - started
    return _DUMMIES[max(samples, key=lambda key: _DUMMY_COSTS[key])]


def _make_dummy(sample: PasswdEntry) -> PasswdEntry:
    """A random-password entry with the same scheme and cost parameters as ``sample``."""
    secret = _random_secret()
    if sample.scheme == ARGON2ID:
        hasher = argon2.PasswordHasher.from_parameters(argon2.extract_parameters(sample.hash))
        return PasswdEntry("", ARGON2ID, hasher.hash(secret))
    if sample.scheme == BLF_CRYPT:
        rounds = int(sample.hash[4:6])
        return PasswdEntry("", BLF_CRYPT, bcrypt.hashpw(secret, bcrypt.gensalt(rounds)).decode("ascii"))
    return PasswdEntry("", sample.scheme, secret.decode("ascii"))
