"""Command grammar, number parsing, byte checks, probes, user names and log samples."""

from __future__ import annotations

import re
import unicodedata

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
    normalise_username,
    parse_number,
    username_problem,
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


# -- user names: NFC, invisible code points, combining marks ------------------------------

HONEST_NAMES = {
    # name as typed -> its NFC form, the name authentication sees
    "mu\u0308ller": "m\u00fcller",  # decomposed, as macOS sends it
    "m\u00fcller": "m\u00fcller",
    "Jos\u00e9": "Jos\u00e9",
    "Jose\u0301": "Jos\u00e9",
    "\u0395\u03bb\u03ad\u03bd\u03b7": "\u0395\u03bb\u03ad\u03bd\u03b7",  # Greek Eleni
    "\u0395\u03bb\u03b5\u0301\u03bd\u03b7": "\u0395\u03bb\u03ad\u03bd\u03b7",  # decomposed: tonos = acute
    "\u0414\u043c\u0438\u0442\u0440\u0438\u0439": "\u0414\u043c\u0438\u0442\u0440\u0438\u0439",  # Dmitriy
    "\u0414\u043c\u0438\u0442\u0440\u0438\u0438\u0306": "\u0414\u043c\u0438\u0442\u0440\u0438\u0439",  # short i decomposed
    "\u5c71\u7530": "\u5c71\u7530",  # Yamada
    "\u3084\u307e\u3060": "\u3084\u307e\u3060",  # yamada in hiragana
    "\u3084\u307e\u305f\u3099": "\u3084\u307e\u3060",  # da as ta + voiced sound mark
    "\u0645\u062d\u0645\u062f": "\u0645\u062d\u0645\u062f",  # Muhammad
    "\u0645\u064f\u062d\u064e\u0645\u064e\u0651\u062f": "\u0645\u064f\u062d\u064e\u0645\u064e\u0651\u062f",  # with harakat
    "\u0926\u0947\u0935\u0928\u093e\u0917\u0930\u0940": "\u0926\u0947\u0935\u0928\u093e\u0917\u0930\u0940",  # Devanagari
    "\u0936\u094d\u0930\u0940": "\u0936\u094d\u0930\u0940",  # Shri: virama between consonants
    "\u0938\u0941\u0930\u0947\u0936": "\u0938\u0941\u0930\u0947\u0936",  # Suresh
    "\u0e2a\u0e21\u0e0a\u0e32\u0e22": "\u0e2a\u0e21\u0e0a\u0e32\u0e22",  # Thai Somchai
    "\u0e27\u0e34\u0e0a\u0e31\u0e22": "\u0e27\u0e34\u0e0a\u0e31\u0e22",  # Thai Wichai: vowel marks
    "\u0e19\u0e49\u0e33": "\u0e19\u0e49\u0e33",  # Thai nam: tone mark on a consonant
    "\u05e9\u05c1\u05b8\u05dc\u05d5\u05b9\u05dd": "\u05e9\u05b8\u05c1\u05dc\u05d5\u05b9\u05dd",  # pointed Hebrew (NFC orders the points)
    "\u0f56\u0f66\u0f92\u0fb2\u0f74\u0f56\u0f66": "\u0f56\u0f66\u0f92\u0fb2\u0f74\u0f56\u0f66",  # Tibetan stack
    "Ad\u00e9\u1e63o\u0323\u0300la": "Ad\u00e9\u1e63\u1ecd\u0300la",  # Yoruba: o dot below + grave
    "Nguye\u0302\u0303n": "Nguy\u1ec5n",  # Vietnamese, two marks composed into one letter
    "\u1112\u1161\u11ab\u1100\u1173\u11af": "\ud55c\uae00",  # Korean jamo compose to syllables
    "bob.smith@example.org": "bob.smith@example.org",
}


@pytest.mark.parametrize("typed, nfc", HONEST_NAMES.items(), ids=[f"honest-{i}" for i in range(len(HONEST_NAMES))])
def test_honest_names_in_every_script_are_accepted_in_nfc(typed: str, nfc: str) -> None:
    assert normalise_username(typed) == nfc
    assert username_problem(nfc, DEFAULT_USERNAME_EXTRA) is None
    assert valid_username(typed, DEFAULT_USERNAME_EXTRA)


INVISIBLE = {
    "hangul-filler": "\u3164",  # Lo: a letter by category
    "hangul-choseong-filler": "\u115f",
    "hangul-jungseong-filler": "\u1160",
    "halfwidth-hangul-filler": "\uffa0",
    "braille-blank": "\u2800",
    "khitan-filler": "\U00016fe4",
    "combining-grapheme-joiner": "\u034f",  # Mn: passes as a mark on the e
    "variation-selector-16": "\ufe0f",
    "variation-selector-17": "\U000e0100",
    "mongolian-fvs": "\u180b",
    "khmer-inherent-vowel": "\u17b4",
    "zero-width-space": "\u200b",
    "zero-width-joiner": "\u200d",
    "word-joiner": "\u2060",
    "bom": "\ufeff",
    "soft-hyphen": "\u00ad",
    "rtl-override": "\u202e",
    "arabic-letter-mark": "\u061c",
    "tag-a": "\U000e0041",
}


@pytest.mark.parametrize("char", INVISIBLE.values(), ids=INVISIBLE.keys())
@pytest.mark.parametrize("where", ["end", "middle", "start"])
def test_invisible_code_points_are_refused(char: str, where: str) -> None:
    name = {"end": "alice" + char, "middle": "ali" + char + "ce", "start": char + "alice"}[where]
    assert not valid_username(name, DEFAULT_USERNAME_EXTRA)
    problem = username_problem(normalise_username(name), DEFAULT_USERNAME_EXTRA)
    if where == "start" and unicodedata.category(char) in ("Mn", "Mc"):
        assert problem is not None
    else:
        assert problem == "user name has an invisible character"


def test_invisible_code_points_are_refused_even_as_extra_chars() -> None:
    assert not valid_username("alice\u3164", DEFAULT_USERNAME_EXTRA + "\u3164")


@pytest.mark.parametrize("name, problem", [
    ("\u0301alice", "user name has a combining mark that follows no letter"),
    ("\u093ealice", "user name has a combining mark that follows no letter"),  # a vowel sign first
    ("alice1\u0301", "user name has a combining mark that follows no letter"),
    ("alice.\u0301", "user name has a combining mark that follows no letter"),
    ("alice@\u0323x", "user name has a combining mark that follows no letter"),
    ("1\u20e3", "user name has characters outside username_chars"),  # keycap: an enclosing mark (Me)
    ("x\u0301\u0301", "user name repeats a combining mark"),  # no precomposed x-acute
    ("\u0915\u093f\u093f", "user name repeats a combining mark"),
    ("alice" + "\u0300\u0301\u0302\u0303\u0304\u0305", "user name has too many combining marks on one letter"),
    ("x\u0300\u0301\u0302\u0303\u0304", "user name has too many combining marks on one letter"),
    ("alice\u20dd", "user name has characters outside username_chars"),  # enclosing circle: Me
    ("a/b", "user name has characters outside username_chars"),
    (".bob", "user name starts with '.'"),
    ("", "empty user name"),
])
def test_combining_marks_must_belong_to_a_letter(name: str, problem: str) -> None:
    assert username_problem(normalise_username(name), DEFAULT_USERNAME_EXTRA) == problem
    assert not valid_username(name, DEFAULT_USERNAME_EXTRA)


def test_four_marks_on_a_letter_are_enough_and_allowed() -> None:
    assert valid_username("x\u0300\u0301\u0302\u0303", DEFAULT_USERNAME_EXTRA)


def test_every_default_ignorable_code_point_is_refused() -> None:
    """Unicode 14's Default_Ignorable_Code_Point ranges, as assigned code points."""
    ranges = [(0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
              (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x3164, 0x3164),
              (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3),
              (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF)]
    for low, high in ranges:
        for code in range(low, high + 1):
            assert grammar.invisible(chr(code)), hex(code)
            assert not valid_username("alice" + chr(code), DEFAULT_USERNAME_EXTRA), hex(code)
    assert not grammar.invisible("a") and not grammar.invisible("\u0301") and not grammar.invisible("\u093e")


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


def _reference_parse(content: bytes) -> Command | GrammarError:
    """parse_command as it was before its keyword lookup: the regex, then the arity table."""
    keyword_bytes, sep, rest = content.partition(b" ")
    if not re.match(rb"[A-Za-z]{3,4}\Z", keyword_bytes):
        return GrammarError("keyword is not 3-4 ASCII letters")
    keyword = keyword_bytes.decode("ascii").upper()
    arity = grammar.ARITY.get(keyword)
    if arity is None:
        return GrammarError("unknown command", keyword)
    if keyword in grammar.REST_OF_LINE:
        args: tuple[bytes, ...] = (rest,) if sep else ()
    elif not sep:
        args = ()
    else:
        args = tuple(rest.split(b" "))
        if any(arg == b"" for arg in args):
            return GrammarError("arguments must be separated by a single space", keyword)
    if not arity[0] <= len(args) <= arity[1]:
        return GrammarError("wrong number of arguments", keyword)
    return Command(keyword, args)


_KEYWORDS = st.sampled_from([k for k in grammar.ARITY] + [k.lower() for k in grammar.ARITY] +
                            ["LiSt", "XTND", "LAST", "AB", "ABCDE", "L\u00c4ST", "ST\u0131T", "1234", ""])


@settings(max_examples=800)
@given(st.one_of(
    st.binary(max_size=24),
    st.tuples(_KEYWORDS, st.lists(st.sampled_from([b"", b"1", b"12", b"x y", b" ", b"\x00", b"\xc4"]), max_size=3))
    .map(lambda t: b" ".join([t[0].encode("utf-8"), *t[1]]) if t[1] else t[0].encode("utf-8")),
))
def test_parse_command_matches_the_reference(line: bytes) -> None:
    assert parse_command(line) == _reference_parse(line)


def _username_problem_per_character(name: str, extra_chars: str) -> bool:
    """Whether an ASCII name is acceptable, judged one character at a time as the general rule
    does: a letter, a digit or an extra character each, and no leading dot."""
    return bool(name) and name[0] != "." and all(
        unicodedata.category(c)[0] in "LN" or c in extra_chars for c in name)


@settings(max_examples=1500)
@given(st.text(st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=12),
       st.sampled_from([DEFAULT_USERNAME_EXTRA, "", "._-", "@", ".", "+=!"]))
def test_an_ascii_name_is_judged_as_the_per_character_rule_judges_it(name: str, extra: str) -> None:
    """ASCII names take a shortcut at C speed; it accepts exactly what the general rule accepts."""
    assert (username_problem(name, extra) is None) == _username_problem_per_character(name, extra)
