"""Command grammar, number parsing, byte checks, probes, user names and log samples."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pop3shield.core import grammar
from pop3shield.core.grammar import (
    ARITY,
    Command,
    GrammarError,
    byte_problems,
    command_sample,
    escape_sample,
    looks_like_http,
    looks_like_tls,
    parse_command,
    parse_number,
    valid_username,
)
from pop3shield.core.settings import DEFAULT_USERNAME_EXTRA

# -- keywords -----------------------------------------------------------------------------


@pytest.mark.parametrize("line, keyword", [
    (b"TOP 1 2", "TOP"), (b"top 1 2", "TOP"), (b"Stat", "STAT"), (b"nOoP", "NOOP"),
    (b"quit", "QUIT"), (b"capa", "CAPA"), (b"uidl", "UIDL"),
])
def test_keyword_is_case_insensitive(line: bytes, keyword: str) -> None:
    parsed = parse_command(line)
    assert isinstance(parsed, Command)
    assert parsed.keyword == keyword


@pytest.mark.parametrize("line", [b"", b"NO", b"NOOPS", b"N0OP", b"NO-P", b"NO_P", b" NOOP",
                                  b"\x00NOOP", b"NO\xc3\xa9P", b"\xef\xbc\xae\xef\xbc\xafOP", b"STAT\t"])
def test_bad_keywords(line: bytes) -> None:
    parsed = parse_command(line)
    assert parsed == GrammarError("keyword is not 3-4 ASCII letters")


@pytest.mark.parametrize("line", [b"XYZ", b"XYZZ", b"HELO", b"EHLO", b"LAST", b"RPOP"])
def test_unknown_but_well_formed_keyword(line: bytes) -> None:
    parsed = parse_command(line + b" arg")
    assert parsed == GrammarError("unknown command", line.decode())


def test_arity_table() -> None:
    assert ARITY == {
        "USER": (1, 1), "PASS": (1, 1), "APOP": (2, 2), "AUTH": (0, 2), "CAPA": (0, 0),
        "STLS": (0, 0), "QUIT": (0, 0), "STAT": (0, 0), "LIST": (0, 1), "RETR": (1, 1),
        "DELE": (1, 1), "NOOP": (0, 0), "RSET": (0, 0), "TOP": (2, 2), "UIDL": (0, 1),
    }


@pytest.mark.parametrize("keyword", sorted(ARITY))
def test_every_arity(keyword: str) -> None:
    low, high = ARITY[keyword]
    for count in range(0, 4):
        line = " ".join([keyword] + [f"a{i}" for i in range(count)]).encode()
        parsed = parse_command(line)
        if keyword in ("USER", "PASS"):
            ok = count >= 1  # the rest of the line is one argument
        else:
            ok = low <= count <= high
        if ok:
            assert isinstance(parsed, Command), (line, parsed)
        else:
            assert parsed == GrammarError("wrong number of arguments", keyword), line


@pytest.mark.parametrize("line, args", [
    (b"LIST", ()), (b"LIST 1", (b"1",)), (b"TOP 1 0", (b"1", b"0")),
    (b"AUTH", ()), (b"AUTH PLAIN", (b"PLAIN",)), (b"AUTH PLAIN AGJvYgB4", (b"PLAIN", b"AGJvYgB4")),
    (b"APOP bob c4c9334bac560ecc979e58001b3e22fb", (b"bob", b"c4c9334bac560ecc979e58001b3e22fb")),
])
def test_arguments(line: bytes, args: tuple[bytes, ...]) -> None:
    parsed = parse_command(line)
    assert isinstance(parsed, Command)
    assert parsed.args == args


@pytest.mark.parametrize("line", [b"LIST  1", b"LIST 1 ", b"TOP 1  2", b"TOP  1 2", b"CAPA ", b"STAT ",
                                  b"AUTH PLAIN ", b"APOP bob  digest"])
def test_single_space_rule(line: bytes) -> None:
    parsed = parse_command(line)
    assert isinstance(parsed, GrammarError)
    assert parsed.reason in ("arguments must be separated by a single space", "wrong number of arguments")
    assert parsed.keyword == line.split(b" ")[0].decode()


def test_double_space_is_the_single_space_error() -> None:
    assert parse_command(b"LIST  1") == GrammarError("arguments must be separated by a single space", "LIST")


@pytest.mark.parametrize("line, arg", [
    (b"PASS my secret pass", b"my secret pass"),
    (b"PASS  leading space", b" leading space"),
    (b"PASS trailing ", b"trailing "),
    (b"pass x", b"x"),
    (b"USER bob smith", b"bob smith"),
    (b"USER  bob", b" bob"),
    (b"PASS ", b""),
])
def test_user_and_pass_take_the_rest_of_the_line(line: bytes, arg: bytes) -> None:
    parsed = parse_command(line)
    assert isinstance(parsed, Command)
    assert parsed.args == (arg,)


@pytest.mark.parametrize("line", [b"USER", b"PASS"])
def test_user_and_pass_need_an_argument(line: bytes) -> None:
    assert parse_command(line) == GrammarError("wrong number of arguments", line.decode())


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_parse_command_never_raises(line: bytes) -> None:
    parsed = parse_command(line)
    assert isinstance(parsed, (Command, GrammarError))
    if isinstance(parsed, Command):
        assert parsed.keyword in ARITY


# -- numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, value", [(b"1", 1), (b"007", 7), (b"4294967295", 4294967295),
                                        (b"9999999999", 9999999999), (b"42", 42)])
def test_parse_number_ok(raw: bytes, value: int) -> None:
    assert parse_number(raw) == value


@pytest.mark.parametrize("raw", [
    b"0", b"00", b"-1", b"+1", b"1e3", b"0x10", b" 1", b"1 ", b"12345678901", "\u0661".encode(),
    "\uff11".encode(), b"", b"1.0", b"1_000", b"\x001", b"\xb9", b"4294967296000",
])
def test_parse_number_rejects(raw: bytes) -> None:
    assert parse_number(raw) is None


def test_parse_number_zero_only_when_allowed() -> None:
    assert parse_number(b"0", allow_zero=True) == 0
    assert parse_number(b"000", allow_zero=True) == 0
    assert parse_number(b"0") is None
    assert parse_number(b"-0", allow_zero=True) is None


@given(st.binary(max_size=12))
def test_parse_number_is_ascii_digits_only(raw: bytes) -> None:
    value = parse_number(raw, allow_zero=True)
    if value is not None:
        assert re.fullmatch(rb"[0-9]{1,10}", raw)
        assert value == int(raw.decode("ascii"))


# -- byte problems ------------------------------------------------------------------------


@pytest.mark.parametrize("line, problems", [
    (b"USER bob\x00", ["NUL byte"]),
    (b"\x00", ["NUL byte"]),
    (b"USER\tbob", ["control byte 0x09"]),
    (b"NOOP\x7f", ["control byte 0x7f"]),
    (b"NOOP\x1b[0m", ["control byte 0x1b"]),
    (b"NO\rOP", ["lone CR inside a line"]),
    (b"USER \xff\xfe", ["invalid UTF-8"]),
    (b"USER \xc3", ["invalid UTF-8"]),
    (b"USER \xed\xa0\x80", ["invalid UTF-8"]),  # a UTF-16 surrogate
    (b"USER \xc0\xaf", ["invalid UTF-8"]),  # overlong encoding of '/'
    (b"USER \x00\xff", ["NUL byte", "invalid UTF-8"]),
])
def test_byte_problems(line: bytes, problems: list[str]) -> None:
    assert byte_problems(line) == problems


@pytest.mark.parametrize("line", [b"USER bob", "USER j\u00f6rg".encode(), "USER \u0645\u062d\u0645\u062f".encode(),
                                  "USER \u5f20\u4f1f".encode(), "PASS \U0001f600".encode(), b"", b"~!@#$%^&*()"])
def test_valid_utf8_has_no_problems(line: bytes) -> None:
    assert byte_problems(line) == []


# -- probes ------------------------------------------------------------------------------

CLIENT_HELLO = bytes.fromhex("160301020001000200fc03036b2a")


@pytest.mark.parametrize("data", [CLIENT_HELLO, b"\x16\x03\x00\x00\x10", b"\x16\x03\x03", b"\x16\x03\x04\x01"])
def test_looks_like_tls(data: bytes) -> None:
    assert looks_like_tls(data)


@pytest.mark.parametrize("data", [b"\x16\x03", b"\x16\x02\x01", b"\x17\x03\x01", b"\x16\x03\x05", b"USER bob", b""])
def test_not_tls(data: bytes) -> None:
    assert not looks_like_tls(data)


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1", b"POST /login HTTP/1.0", b"CONNECT example.org:443 HTTP/1.1",
                                  b"HEAD /x HTTP/2", b"OPTIONS * HTTP/1.1"])
def test_looks_like_http(data: bytes) -> None:
    assert looks_like_http(data)


@pytest.mark.parametrize("data", [b"GET", b"GET /", b"USER GET / HTTP/1.1", b"LIST 1", b"GET  / HTTP/1.1", b""])
def test_not_http(data: bytes) -> None:
    assert not looks_like_http(data)


# -- user names ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "bob", "bob.smith", "bob-smith", "bob_smith", "bob@example.org", "bob+tag", "a=b", "B0B",
    "j\u00f6rg", "\u0645\u062d\u0645\u062f", "\u5f20\u4f1f", "\u0438\u0432\u0430\u043d", "\u03b1\u03b2",
    "user\u0661\u0662",  # Arabic-Indic digits are digits
    "x",
])
def test_valid_usernames(name: str) -> None:
    assert valid_username(name, DEFAULT_USERNAME_EXTRA)


@pytest.mark.parametrize("name", [
    "\u0930\u093e\u092e",  # Devanagari "Ram": the vowel sign AA is a combining mark (Mc)
    "\u0938\u0941\u0930\u0947\u0936",  # Devanagari "Suresh" (vowel signs U and E)
    "\u0e27\u0e34\u0e0a\u0e31\u0e22",  # Thai "Wichai": vowel marks above consonants (Mn)
    "Jose\u0301",  # NFD, as macOS clients send it
])
def test_letters_of_any_script_include_their_combining_marks(name: str) -> None:
    """Names in Indic and Thai scripts cannot be written without combining marks."""
    assert valid_username(name, DEFAULT_USERNAME_EXTRA)


@pytest.mark.parametrize("name", [
    "", ".bob", "..", "bob%n", "%s%s", "a/b", "../etc", "a\\b", "bob'", 'bob"', "bob`", "bob smith",
    " bob", "bob\t", "bob\u00a0x", "bob\u3000", "bob\u2028", "bob\x00", "bob\n", "bob;", "bob:x", "a*",
    "bob\u200b", "<bob>", "bob|x", "bob$x",
])
def test_invalid_usernames(name: str) -> None:
    assert not valid_username(name, DEFAULT_USERNAME_EXTRA)


def test_username_extra_chars_are_configurable() -> None:
    assert not valid_username("bob:x", DEFAULT_USERNAME_EXTRA)
    assert valid_username("bob:x", DEFAULT_USERNAME_EXTRA + ":")
    assert not valid_username("bob@x", "")
    assert not valid_username(".bob", ".")


def test_dot_inside_is_fine() -> None:
    assert valid_username("b.o.b.", DEFAULT_USERNAME_EXTRA)


# -- log samples --------------------------------------------------------------------------

SECRET = "Tr0ub4dor&3xyzzy"


@pytest.mark.parametrize("line", [
    f"PASS {SECRET}", f"pass {SECRET}", f"PaSs {SECRET}", f"PASS  {SECRET}", f"PASS {SECRET} with spaces",
    f"APOP bob {SECRET}", f"apop bob {SECRET}", f"APOP bob {SECRET} extra",
    f"AUTH PLAIN {SECRET}", f"auth plain {SECRET}", f"AUTH LOGIN {SECRET}", f"AUTH PLAIN {SECRET} x",
    f"AUTH X {SECRET}",
])
def test_command_sample_hides_secrets(line: str) -> None:
    sample = command_sample(line.encode())
    assert SECRET not in sample
    assert SECRET[:6] not in sample
    assert "<hidden" in sample


@pytest.mark.parametrize("line", [f"PASS\t{SECRET}", f"PASS\x00{SECRET}", f" PASS {SECRET}", f"APOP\tbob {SECRET}"])
def test_command_sample_hides_secrets_behind_other_separators(line: str) -> None:
    """A sloppy client that separates PASS from its password with a TAB (or a NUL, or starts the line
    with a blank) still sends its password: the non_compliant event must not log it."""
    sample = command_sample(line.encode())
    assert SECRET[:6] not in sample


def test_command_sample_pass_octets() -> None:
    assert command_sample(b"PASS abc def") == "PASS <hidden, 7 octets>"
    assert command_sample(b"PASS") == "PASS"


def test_command_sample_apop_keeps_the_name() -> None:
    assert command_sample(b"APOP bob c4c9334bac560ecc979e58001b3e22fb") == "APOP bob <hidden>"


def test_command_sample_auth_keeps_the_mechanism() -> None:
    assert command_sample(b"AUTH PLAIN AGJvYgB4") == "AUTH PLAIN <hidden>"
    assert command_sample(b"AUTH PLAIN") == "AUTH PLAIN"
    assert command_sample(b"AUTH") == "AUTH"


def test_command_sample_in_sasl_hides_everything() -> None:
    blob = b"AGJvYgBUcjB1YjRkb3ImM3h5enp5"
    assert command_sample(blob, in_sasl=True) == f"<SASL response, {len(blob)} octets>"
    assert command_sample(b"PASS x", in_sasl=True) == "<SASL response, 6 octets>"


def test_command_sample_escapes_non_printables() -> None:
    assert command_sample(b"USER a\x00b\xffc\\d\x7f") == "USER a\\x00b\\xffc\\x5cd\\x7f"


@pytest.mark.parametrize("line", [b"US\rER x", b"X" * 100, b"", b" USER bob", b"\x16\x03\x01\x02\x00", b"12345 x",
                                  b"PASS\tsecret", b"Tr0ub4dor&3"])
def test_command_sample_of_a_non_command_shows_its_size_only(line: bytes) -> None:
    assert command_sample(line) == f"<not a command, {len(line)} octets>"


def test_command_sample_limits_arguments_to_64() -> None:
    sample = command_sample(b"USER " + b"a" * 200)
    assert sample == "USER " + "a" * 64 + "..."
    assert command_sample(b"USER " + b"a" * 64) == "USER " + "a" * 64


def test_command_sample_keyword() -> None:
    assert command_sample(b"xyzz arg") == "xyzz arg"
    assert command_sample(b"noop") == "noop"


@given(st.binary(max_size=400), st.booleans())
@settings(max_examples=300, deadline=None)
def test_command_sample_is_printable_ascii_and_bounded(line: bytes, in_sasl: bool) -> None:
    sample = command_sample(line, in_sasl=in_sasl)
    assert sample.isascii()
    assert all(0x20 <= ord(c) < 0x7F for c in sample)
    assert len(sample) <= 16 * 4 + 3 + 1 + 64 * 4 + 3 + 20


def test_escape_sample() -> None:
    assert escape_sample(b"ab\x01") == "ab\\x01"
    assert escape_sample(b"abcdef", 3) == "abc..."
    assert escape_sample(b"") == ""


def test_secret_commands() -> None:
    assert grammar.SECRET_COMMANDS == {"PASS", "APOP", "AUTH"}
