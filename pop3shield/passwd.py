"""Dovecot passwd-file credentials: parse, hash and verify.

Line format (Dovecot ``passwd-file``)::

    user:{SCHEME}hash[:uid:gid:gecos:home:shell:extra_fields]

Only the user and password fields are used; the rest is accepted and ignored so existing Dovecot
files work unchanged.  ``#`` comments and blank lines are skipped.

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
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import argon2
import bcrypt

__all__ = [
    "DUMMY_ENTRY",
    "PasswdEntry",
    "PasswdError",
    "dummy_entry_like",
    "format_entry",
    "hash_password",
    "load_passwd",
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


@dataclass(frozen=True)
class PasswdEntry:
    """One user's stored credential; the hash stays out of repr so it cannot leak into logs."""

    user: str
    scheme: str
    hash: str = field(repr=False)


# --------------------------------------------------------------------------- validation


def _user_problem(user: str) -> str | None:
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


def _parse_line(path: str, number: int, raw: bytes, allow_plaintext: bool) -> PasswdEntry | None:
    try:
        line = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        raise PasswdError(path, number, "not valid UTF-8") from None
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    user, sep, rest = line.partition(":")
    if not sep:
        raise PasswdError(path, number, "expected user:{SCHEME}hash")
    problem = _user_problem(user)
    if problem:
        raise PasswdError(path, number, problem)
    parsed = _parse_password(rest.split(":", 1)[0], allow_plaintext)
    if isinstance(parsed, str):
        raise PasswdError(path, number, parsed)
    return PasswdEntry(user=user, scheme=parsed[0], hash=parsed[1])


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
    problem = _user_problem(user)
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
