"""Tests for pop3shield.passwd: the passwd-file format, hashing and verification."""

from __future__ import annotations

import ipaddress
import sys
from pathlib import Path

import argon2
import bcrypt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3shield import passwd as passwd_module
from pop3shield.passwd import (
    DUMMY_ENTRY,
    PasswdEntry,
    PasswdError,
    dummy_entry_costliest,
    dummy_entry_like,
    format_entry,
    hash_password,
    load_passwd,
    verify_password,
)

#: cheap parameters so the suite stays fast; verification reads them from the hash
FAST_ARGON2 = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
SECRET = "S3cret-Pass:word"  # contains ':' on purpose: the password is never a field


def argon2_field(password: str) -> str:
    return "{ARGON2ID}" + FAST_ARGON2.hash(password)


def bcrypt_field(password: bytes, prefix: bytes = b"$2b$") -> str:
    hashed = bcrypt.hashpw(password, bcrypt.gensalt(4))
    return "{BLF-CRYPT}" + hashed.replace(b"$2b$", prefix).decode("ascii")


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "users.passwd"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def entry_of(line: str) -> PasswdEntry:
    user, field = line.split(":", 1)
    scheme, hashed = field[1:].split("}", 1)
    return PasswdEntry(user, {"BCRYPT": "BLF-CRYPT", "CLEARTEXT": "PLAIN"}.get(scheme, scheme), hashed)


# --------------------------------------------------------------------------- loading


def test_load_all_schemes_comments_and_extra_fields(tmp_path: Path) -> None:
    a2 = argon2_field("pw1")
    bc = bcrypt_field(b"pw2")
    path = write(
        tmp_path,
        "# a comment",
        "",
        "   ",
        f"alice:{a2}:1000:1000::/home/alice:/bin/false:userdb_quota_rule=*:storage=1G",
        f"bob:{bc}",
        "carol:{bcrypt}" + bc.split("}", 1)[1] + ":::",
        "dave:{PLAIN}pw4",
        "eve:{cleartext}pw5:1001",
        "jürgen@example.org:{PLAIN}pw6",
    )
    entries = load_passwd(path, allow_plaintext=True)
    assert sorted(entries) == sorted(["alice", "bob", "carol", "dave", "eve", "jürgen@example.org"])
    assert entries["alice"] == PasswdEntry("alice", "ARGON2ID", a2[len("{ARGON2ID}"):],
                                           extra={"userdb_quota_rule": "*:storage=1G"})  # ':' rejoined
    assert entries["bob"].scheme == "BLF-CRYPT"
    assert entries["carol"].scheme == "BLF-CRYPT"  # {BCRYPT} alias, case-insensitive
    assert entries["dave"] == PasswdEntry("dave", "PLAIN", "pw4")
    assert entries["eve"] == PasswdEntry("eve", "PLAIN", "pw5")  # extra fields are not the password
    assert verify_password(entries["alice"], b"pw1")
    assert verify_password(entries["carol"], b"pw2")


def test_crlf_line_endings(tmp_path: Path) -> None:
    path = tmp_path / "users.passwd"
    path.write_bytes(b"alice:" + argon2_field("pw").encode() + b"\r\n#c\r\n")
    assert verify_password(load_passwd(path)["alice"], b"pw")


def test_empty_file(tmp_path: Path) -> None:
    assert load_passwd(write(tmp_path)) == {}


def test_pathlike_accepted(tmp_path: Path) -> None:
    assert "a" in load_passwd(write(tmp_path, "a:" + argon2_field("x")))


BAD_LINES = [
    ("alice", "expected user:{SCHEME}hash"),
    (":{PLAIN}x", "empty user name"),
    ("al ice:{PLAIN}x", "whitespace or control"),
    (" alice:{PLAIN}x", "whitespace or control"),
    ("al\tice:{PLAIN}x", "whitespace or control"),
    ("al\x01ice:{PLAIN}x", "whitespace or control"),
    ("al\u200bice:{PLAIN}x", "whitespace or control"),
    ("alice:", "no {SCHEME} prefix"),
    ("alice:$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo", "no {SCHEME} prefix"),
    ("alice:{SHA512-CRYPT}$6$abc$def", "unknown password scheme {SHA512-CRYPT}"),
    ("alice:{}x", "unknown password scheme {}"),
    ("alice:{ARGON2ID}$argon2id$garbage", "malformed ARGON2ID hash"),
    ("alice:{ARGON2ID}", "malformed ARGON2ID hash"),
    ("alice:{BLF-CRYPT}$2b$12$tooshort", "malformed BLF-CRYPT hash"),
    ("alice:{BLF-CRYPT}$2x$12$" + "a" * 53, "malformed BLF-CRYPT hash"),
    ("alice:{BLF-CRYPT}$2b$99$" + "a" * 53, "malformed BLF-CRYPT hash"),
]


@pytest.mark.parametrize(("line", "problem"), BAD_LINES)
def test_bad_lines_name_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = write(tmp_path, "# header", "ok:" + argon2_field("x"), line)
    with pytest.raises(PasswdError) as info:
        load_passwd(path, allow_plaintext=True)
    error = info.value
    assert (error.path, error.line) == (str(path), 3)
    assert str(error).startswith(f"{path}:3: ")
    assert problem in str(error)


def test_argon2i_hash_under_argon2id_scheme(tmp_path: Path) -> None:
    other = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=argon2.Type.I)
    path = write(tmp_path, "a:{ARGON2ID}" + other.hash("x"))
    with pytest.raises(PasswdError, match=r":1: ARGON2ID entry holds a hash of another argon2"):
        load_passwd(path)


@pytest.mark.parametrize("scheme", ["PLAIN", "CLEARTEXT", "plain"])
def test_plaintext_rejected_unless_allowed(tmp_path: Path, scheme: str) -> None:
    path = write(tmp_path, "a:" + argon2_field("x"), f"b:{{{scheme}}}hunter2")
    with pytest.raises(PasswdError) as info:
        load_passwd(path)
    assert str(info.value).startswith(f"{path}:2: ")
    assert "allow_plaintext" in str(info.value)
    assert "hunter2" not in str(info.value)
    assert load_passwd(path, allow_plaintext=True)["b"].hash == "hunter2"


def test_duplicate_user(tmp_path: Path) -> None:
    path = write(tmp_path, "a:" + argon2_field("x"), "# c", "a:" + argon2_field("y"))
    with pytest.raises(PasswdError) as info:
        load_passwd(path)
    assert info.value.line == 3
    assert "duplicate user 'a' (first on line 1)" in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "users.passwd"
    path.write_bytes(b"a:" + argon2_field("x").encode() + b"\n\xff:{PLAIN}x\n")
    with pytest.raises(PasswdError, match=r":2: not valid UTF-8"):
        load_passwd(path, allow_plaintext=True)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PasswdError) as info:
        load_passwd(tmp_path / "none")
    assert info.value.line is None
    assert "cannot read" in str(info.value)


@pytest.mark.parametrize(
    "line",
    [
        "alice:{PLAIN}hunter2-secret",
        "alice:{SHA256}hunter2-secret",
        "alice:{ARGON2ID}hunter2-secret",
        "alice:{BLF-CRYPT}hunter2-secret",
        "alice:hunter2-secret",
        "al ice:{PLAIN}hunter2-secret",
    ],
)
def test_errors_never_contain_the_secret(tmp_path: Path, line: str) -> None:
    path = write(tmp_path, line)
    with pytest.raises(PasswdError) as info:
        load_passwd(path)
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(info.value)


def test_errors_never_contain_a_real_hash(tmp_path: Path) -> None:
    hashed = FAST_ARGON2.hash("x")
    path = write(tmp_path, "a:{ARGON2ID}" + hashed, "a:{ARGON2ID}" + hashed)
    with pytest.raises(PasswdError) as info:
        load_passwd(path)
    assert hashed not in str(info.value)
    assert hashed.split("$")[-1] not in str(info.value)


def test_entry_repr_hides_hash() -> None:
    entry = PasswdEntry("alice", "PLAIN", "hunter2")
    assert "hunter2" not in repr(entry)
    assert "hunter2" not in str(entry)
    assert "alice" in repr(entry)
    assert DUMMY_ENTRY.hash not in repr(DUMMY_ENTRY)


# --------------------------------------------------------------------------- hash / verify


@pytest.mark.parametrize("scheme", ["ARGON2ID", "BLF-CRYPT", "BCRYPT", "PLAIN", "CLEARTEXT", "argon2id"])
@pytest.mark.parametrize("password", [SECRET, SECRET.encode(), "pässwörd ✓"])
def test_hash_verify_roundtrip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str, password: str | bytes
) -> None:
    monkeypatch.setattr(passwd_module, "BCRYPT_COST", 4)  # speed; cost 12 is checked below
    monkeypatch.setattr(passwd_module, "_HASHER", FAST_ARGON2)
    if scheme.upper() in ("PLAIN", "CLEARTEXT"):
        password = "no-colon ✓"
    field = hash_password(password, scheme)
    line = format_entry("user@example.org", field)
    assert line.startswith("user@example.org:{")
    entries = load_passwd(write(tmp_path, line), allow_plaintext=True)
    entry = entries["user@example.org"]
    raw = password.encode() if isinstance(password, str) else password
    assert verify_password(entry, raw)
    assert verify_password(entry, raw.decode())  # str is accepted too
    assert not verify_password(entry, raw + b"x")
    assert not verify_password(entry, b"")
    if scheme.upper() not in ("PLAIN", "CLEARTEXT"):
        assert raw not in line.encode()


def test_default_hash_formats() -> None:
    field = hash_password("pw")
    assert field.startswith("{ARGON2ID}$argon2id$v=19$")
    params = argon2.extract_parameters(field[len("{ARGON2ID}"):])
    assert params.time_cost == argon2.PasswordHasher().time_cost
    bc = hash_password("pw", "BLF-CRYPT")
    assert bc.startswith("{BLF-CRYPT}$2b$12$")
    assert verify_password(PasswdEntry("u", "BLF-CRYPT", bc[len("{BLF-CRYPT}"):]), b"pw")


def test_hash_is_salted() -> None:
    assert hash_password("pw", "ARGON2ID") != hash_password("pw", "ARGON2ID")


def test_hash_password_rejects() -> None:
    with pytest.raises(ValueError, match="unsupported scheme"):
        hash_password("pw", "MD5")
    with pytest.raises(ValueError, match="ARGON2ID"):
        hash_password("x" * 73, "BLF-CRYPT")
    with pytest.raises(ValueError, match="':'"):
        hash_password("a:b", "PLAIN")
    with pytest.raises(ValueError, match="line breaks"):
        hash_password("a\nb", "PLAIN")
    with pytest.raises(ValueError, match="UTF-8"):
        hash_password(b"\xff", "PLAIN")


def test_hash_password_error_never_echoes_password() -> None:
    for scheme in ("MD5", "BLF-CRYPT", "PLAIN"):
        with pytest.raises(ValueError) as info:
            hash_password("hunter2:" + "x" * 80, scheme)
        assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("prefix", [b"$2a$", b"$2b$", b"$2y$"])
def test_bcrypt_variants(tmp_path: Path, prefix: bytes) -> None:
    path = write(tmp_path, "a:" + bcrypt_field(b"pw", prefix))
    entry = load_passwd(path)["a"]
    assert entry.hash.startswith(prefix.decode())
    assert verify_password(entry, b"pw")
    assert not verify_password(entry, b"pW")


def test_bcrypt_long_passwords_are_truncated_to_72_bytes() -> None:
    """Compatible with hashes other bcrypt implementations made: only 72 bytes ever counted."""
    long_password = b"p" * 72
    entry = PasswdEntry("a", "BLF-CRYPT", bcrypt.hashpw(long_password, bcrypt.gensalt(4)).decode())
    assert verify_password(entry, long_password)
    assert verify_password(entry, long_password + b"anything")  # deterministic, not an error
    assert not verify_password(entry, long_password[:71])


def test_argon2_long_passwords_are_not_truncated() -> None:
    password = b"p" * 200
    entry = PasswdEntry("a", "ARGON2ID", FAST_ARGON2.hash(password))
    assert verify_password(entry, password)
    assert not verify_password(entry, password[:72])


def test_plain_compare() -> None:
    entry = PasswdEntry("a", "PLAIN", "pässword")
    assert verify_password(entry, "pässword".encode())
    assert not verify_password(entry, "pässword".encode("latin-1"))
    assert not verify_password(entry, b"p\xc3\xa4ssword\x00")


def test_plain_uses_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return a == b

    monkeypatch.setattr(passwd_module.hmac, "compare_digest", spy)
    assert verify_password(PasswdEntry("a", "PLAIN", "x"), b"x")
    assert calls == [(b"x", b"x")]


@pytest.mark.parametrize(
    "entry",
    [
        PasswdEntry("a", "ARGON2ID", "not-a-hash"),
        PasswdEntry("a", "BLF-CRYPT", "not-a-hash"),
        PasswdEntry("a", "BLF-CRYPT", "$2b$04$ünicode"),
        PasswdEntry("a", "UNKNOWN", "x"),
    ],
)
def test_verify_never_raises(entry: PasswdEntry) -> None:
    assert verify_password(entry, b"x") is False


def test_verify_nul_and_odd_input() -> None:
    entry = PasswdEntry("a", "ARGON2ID", FAST_ARGON2.hash(b"a\x00b"))
    assert verify_password(entry, b"a\x00b")
    assert not verify_password(entry, b"a")


@settings(max_examples=50, deadline=None)
@given(
    user=st.text(min_size=1, max_size=20).filter(
        lambda u: ":" not in u and not u.lstrip().startswith("#")
        and all(c.isprintable() and not c.isspace() for c in u)
    ),
    password=st.text(min_size=0, max_size=30).filter(
        lambda p: not any(c in p for c in ":\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
    ),
)
def test_plain_format_roundtrip(tmp_path_factory: pytest.TempPathFactory, user: str, password: str) -> None:
    """Any storable user and PLAIN password survive format_entry -> load_passwd -> verify."""
    path = tmp_path_factory.mktemp("p") / "users.passwd"
    path.write_text(format_entry(user, hash_password(password, "PLAIN")) + "\n", encoding="utf-8")
    entries = load_passwd(path, allow_plaintext=True)
    assert list(entries) == [user]
    assert verify_password(entries[user], password.encode())


@pytest.mark.parametrize("user", ["", "a:b", "a b", "a\nb", "a\x00"])
def test_format_entry_rejects_bad_users(user: str) -> None:
    with pytest.raises(ValueError):
        format_entry(user, "{PLAIN}x")


@pytest.mark.parametrize("field", ["x", "{PLAIN}a:b", "{PLAIN}a\nb"])
def test_format_entry_rejects_bad_fields(field: str) -> None:
    with pytest.raises(ValueError) as info:
        format_entry("u", field)
    assert "a\nb" not in str(info.value)


# --------------------------------------------------------------------------- timing oracle


def test_dummy_entry_is_valid_argon2id() -> None:
    assert DUMMY_ENTRY.scheme == "ARGON2ID"
    assert argon2.extract_parameters(DUMMY_ENTRY.hash).type is argon2.Type.ID
    assert DUMMY_ENTRY.user == ""
    assert not verify_password(DUMMY_ENTRY, b"")


def test_dummy_like_matches_cost_parameters() -> None:
    slow = argon2.PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    entries = [
        PasswdEntry("a", "ARGON2ID", slow.hash("x")),
        PasswdEntry("b", "ARGON2ID", slow.hash("y")),
        PasswdEntry("c", "ARGON2ID", FAST_ARGON2.hash("z")),
    ]
    dummy = dummy_entry_like(entries)
    params = argon2.extract_parameters(dummy.hash)
    assert (params.time_cost, params.memory_cost, params.parallelism) == (2, 16, 1)
    assert dummy_entry_like(iter(entries)) is dummy  # cached per cost, generators fine


def test_dummy_like_bcrypt_and_plain() -> None:
    bc = [PasswdEntry("a", "BLF-CRYPT", bcrypt.hashpw(b"x", bcrypt.gensalt(5)).decode())]
    assert dummy_entry_like(bc).hash.startswith("$2b$05$")
    plain = dummy_entry_like([PasswdEntry("a", "PLAIN", "x")])
    assert plain.scheme == "PLAIN" and len(plain.hash) == 64
    assert dummy_entry_like([]) is DUMMY_ENTRY


def test_dummy_costliest_is_the_slowest_kind_not_the_most_common() -> None:
    """Issue 10: mostly {PLAIN} with a few bcrypt users (a migration): unknown users must not be
    answered without hashing; the dummy is the costliest kind present."""
    entries = [PasswdEntry(f"p{i}", "PLAIN", f"pw{i}") for i in range(20)]
    entries.append(PasswdEntry("b", "BLF-CRYPT", bcrypt.hashpw(b"x", bcrypt.gensalt(10)).decode()))
    entries.append(PasswdEntry("a", "ARGON2ID", FAST_ARGON2.hash("z")))
    assert dummy_entry_like(entries).scheme == "PLAIN"
    dummy = dummy_entry_costliest(entries)
    assert dummy.scheme == "BLF-CRYPT" and dummy.hash.startswith("$2b$10$")
    assert dummy_entry_costliest(iter(entries)) is dummy  # cached
    assert dummy_entry_costliest([]) is DUMMY_ENTRY


def test_no_twisted_import() -> None:
    """passwd.py must stay usable from tools that do not want Twisted."""
    import subprocess

    code = "import sys, pop3shield.passwd; print(any(m.startswith('twisted') for m in sys.modules))"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- extra fields (Dovecot)


def test_extra_fields_that_decide_who_may_log_in_are_parsed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "dis1:{PLAIN}pw::::::nologin",
        "dis2:{PLAIN}pw::::::allow_nets=10.0.0.0/8",
        "why:{PLAIN}pw:1000:1000::/home/why::nologin reason=Moved_to_pop.example.org nodelay",
        "off:{PLAIN}pw::::::nologin=no",  # Dovecot: a boolean field is true whenever present
        "gone:{PLAIN}pw::::::fail reason=ignored",
        "nets:{PLAIN}pw::::::allow_nets=127.0.0.0/8,::1,2001:db8::/32,192.0.2.0/24,local",
        "relay:{PLAIN}pw::::::proxy host=10.1.2.3 port=1110 userdb_mail=maildir:~/Mail event_x=1",
        "plain:{PLAIN}pw",
    )
    entries = load_passwd(path, allow_plaintext=True)
    assert entries["dis1"].nologin and entries["dis1"].reason is None and not entries["dis1"].nodelay
    assert entries["dis1"].extra == {"nologin": ""}
    assert entries["dis2"].allow_nets == (ipaddress.ip_network("10.0.0.0/8"),) and not entries["dis2"].nologin
    assert (entries["why"].nologin, entries["why"].reason, entries["why"].nodelay) == (
        True, "Moved_to_pop.example.org", True)
    assert entries["off"].nologin
    assert entries["gone"].nologin and entries["gone"].reason is None  # fail: like a wrong password
    assert entries["nets"].allow_nets == (
        ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("2001:db8::/32"), ipaddress.ip_network("192.0.2.0/24"), "local")
    relay = entries["relay"]
    assert dict(relay.extra) == {"proxy": "", "host": "10.1.2.3", "port": "1110",
                                 "userdb_mail": "maildir:~/Mail", "event_x": "1"}
    assert (relay.nologin, relay.allow_nets) == (False, None)
    assert entries["plain"] == PasswdEntry("plain", "PLAIN", "pw")
    with pytest.raises(TypeError):
        relay.extra["proxy"] = "n"  # type: ignore[index]  # read-only


def test_allows_address_matches_networks_mapped_ipv4_and_local(tmp_path: Path) -> None:
    path = write(tmp_path, "a:{PLAIN}p::::::allow_nets=127.0.0.0/8,2001:db8::/32",
                 "b:{PLAIN}p::::::allow_nets=192.0.2.1,local", "c:{PLAIN}p")
    entries = load_passwd(path, allow_plaintext=True)
    a, b, c = entries["a"], entries["b"], entries["c"]
    assert a.allows_address("127.0.0.1") and a.allows_address("127.255.0.9")
    assert a.allows_address("::ffff:127.0.0.1")  # a dual-stack tcp6 listener's IPv4 client
    assert a.allows_address("2001:db8::7") and a.allows_address("[2001:db8::7]")
    assert not a.allows_address("10.0.0.1") and not a.allows_address("::1")
    assert not a.allows_address(None)  # no IP address (a unix socket) needs "local"
    assert not a.allows_address("not-an-address") and not a.allows_address("")
    assert b.allows_address(None) and b.allows_address("192.0.2.1") and not b.allows_address("192.0.2.2")
    assert c.allows_address("203.0.113.5") and c.allows_address(None)


REFUSED_EXTRA = [
    ("nopassword", "'nopassword' is not supported"),
    ("noauthenticate", "'noauthenticate' is not supported"),
    ("allow_real_nets=127.0.0.1", "'allow_real_nets' is not supported"),
    ("user=root", "'user' is not supported"),
    ("login_user=other", "'login_user' is not supported"),
    ("destuser=other", "'destuser' is not supported"),
    ("proxy_maybe host=10.0.0.1", "'proxy_maybe' is not supported"),
    ("master=proxy pass=secret", "'master' is not supported"),
    ("pass=secret", "'pass' is not supported"),
    ("k5principals=a@B", "'k5principals' is not supported"),
    ("delay_until=2000000000", "'delay_until' is not supported"),
    ("quota_rule=*:storage=1G", "unsupported extra field 'quota_rule'"),
    ("nologin:protected", "unsupported extra field 'nologin:protected'"),
    ("reason=System is down", "unsupported extra field 'is'"),  # values cannot hold spaces
    ("nologin nologin", "'nologin' given twice"),
    ("=x", "extra field without a name"),
    ("allow_nets=", "'allow_nets': '' is not a network"),
    ("allow_nets=10.0.0.0/8,example.org", "'allow_nets': 'example.org' is not a network"),
    ("allow_nets=::ffff:127.0.0.0/104", "'::ffff:127.0.0.0/104' is an IPv4-mapped network that never matches; "
                                        "write 127.0.0.0/8"),
    ("allow_nets=%{rip}", "'allow_nets': %variables are not supported"),
    ("nologin reason=Hi_%u", "'reason': %variables are not supported"),
    ("nologin reason=" + "x" * 499, "'reason': at most 498 printable ASCII"),
    ("nologin reason=caf\u00e9", "'reason': at most 498 printable ASCII"),
    ("nologin\treason=x", "unsupported extra field 'nologin\\treason'"),
    ("proxy port=0", "'port': not a port number"),
]


@pytest.mark.parametrize(("extra", "problem"), REFUSED_EXTRA)
def test_unsupported_or_bad_extra_fields_stop_the_load_naming_line_and_field(
        tmp_path: Path, extra: str, problem: str) -> None:
    path = write(tmp_path, "# header", "ok:{PLAIN}x::::::nologin", f"bad:{{PLAIN}}x:1000:1000::/home/bad::{extra}")
    with pytest.raises(PasswdError) as info:
        load_passwd(path, allow_plaintext=True)
    assert (info.value.path, info.value.line) == (str(path), 3)
    assert str(info.value).startswith(f"{path}:3: ")
    assert problem in str(info.value)
    assert "secret" not in str(info.value)


def test_old_format_empty_field_8_with_more_fields_is_refused(tmp_path: Path) -> None:
    """Dovecot reads ``user:pw:::::::nologin`` (field 8 empty) as a mail location, not as nologin."""
    path = write(tmp_path, "a:{PLAIN}x:::::::nologin")
    with pytest.raises(PasswdError, match=r":1: field 8 is empty but later fields are not"):
        load_passwd(path, allow_plaintext=True)
    assert load_passwd(write(tmp_path, "a:{PLAIN}x::::::::"), allow_plaintext=True)["a"].extra == {}


def test_line_problem_checks_one_line() -> None:
    assert passwd_module.line_problem("a:{PLAIN}x::::::nologin", allow_plaintext=True) is None
    assert passwd_module.line_problem("# comment") is None
    assert passwd_module.line_problem("a:{PLAIN}x::::::nopassword", allow_plaintext=True) == (
        "extra field 'nopassword' is not supported: it would accept any password")
    assert passwd_module.line_problem("a:{PLAIN}x") == "{PLAIN} entries need auth.allow_plaintext = true"


def test_user_names_are_loaded_in_nfc_as_the_session_sends_them(tmp_path) -> None:
    """The session passes user names on in NFC; a name stored decomposed must still match, and
    the two spellings of one name are one user."""
    from pop3shield.passwd import load_passwd as load

    decomposed = "mu\u0308ller"
    path = tmp_path / "users.passwd"
    path.write_text(f"{decomposed}:{{PLAIN}}pw\n", encoding="utf-8")
    assert list(load(path, allow_plaintext=True)) == ["m\u00fcller"]
    path.write_text(f"{decomposed}:{{PLAIN}}pw\nm\u00fcller:{{PLAIN}}pw2\n", encoding="utf-8")
    with pytest.raises(PasswdError, match=":2: duplicate user"):
        load(path, allow_plaintext=True)
