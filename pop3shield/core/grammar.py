"""POP3 command grammar (RFC 1939, 2449, 5034) and the byte-level compliance checks.

Parsing never raises on network input: every problem comes back as a :class:`GrammarError` with a
short reason, so that the session can answer ``-ERR`` or apply the ``non_compliant`` protection.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

#: commands whose arguments are secrets: they never reach a log or an event
SECRET_COMMANDS = frozenset({"PASS", "APOP", "AUTH"})

#: (minimum, maximum) argument count; PASS and USER take the rest of the line as one argument
ARITY: dict[str, tuple[int, int]] = {
    "USER": (1, 1),
    "PASS": (1, 1),
    "APOP": (2, 2),
    "AUTH": (0, 2),
    "CAPA": (0, 0),
    "STLS": (0, 0),
    "QUIT": (0, 0),
    "STAT": (0, 0),
    "LIST": (0, 1),
    "RETR": (1, 1),
    "DELE": (1, 1),
    "NOOP": (0, 0),
    "RSET": (0, 0),
    "TOP": (2, 2),
    "UIDL": (0, 1),
}

#: commands whose whole remainder is one argument (RFC 1939 lets PASS contain spaces)
REST_OF_LINE = frozenset({"USER", "PASS"})

MAX_NUMBER_DIGITS = 10
_KEYWORD = re.compile(rb"[A-Za-z]{3,4}\Z")
_HTTP_REQUEST = re.compile(rb"(?:GET|POST|HEAD|PUT|DELETE|OPTIONS|CONNECT|PATCH|TRACE) \S+ HTTP/\d")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f\x09]")


@dataclass(frozen=True)
class Command:
    """A syntactically valid command: upper-case keyword and raw argument bytes."""

    keyword: str
    args: tuple[bytes, ...]


@dataclass(frozen=True)
class GrammarError:
    """Why a line is not a valid command; ``keyword`` is set when the keyword itself was valid."""

    reason: str
    keyword: str | None = None


def looks_like_tls(content: bytes) -> bool:
    """A TLS record header (handshake, version 3.x): someone speaks TLS to a plaintext port."""
    return len(content) >= 3 and content[0] == 0x16 and content[1] == 0x03 and content[2] <= 0x04


def looks_like_http(content: bytes) -> bool:
    """An HTTP request line: a browser or a proxy probe, not a POP3 client."""
    return b" HTTP/" in content and _HTTP_REQUEST.match(content) is not None


def byte_problems(content: bytes) -> list[str]:
    """Byte-level violations in a command line: controls, DEL, lone CR, invalid UTF-8."""
    problems: list[str] = []
    match = _CONTROL.search(content)
    if match is not None:
        byte = match.group()[0]
        if byte == 0:
            problems.append("NUL byte")
        elif byte == 0x0D:
            problems.append("lone CR inside a line")
        else:
            problems.append(f"control byte 0x{byte:02x}")
    if not content.isascii():
        try:
            content.decode("utf-8")
        except UnicodeDecodeError:
            problems.append("invalid UTF-8")
    return problems


#: upper-case keyword bytes -> (keyword, arity, takes the rest of the line), for the lookup per line
_KNOWN = {keyword.encode("ascii"): (keyword, arity, keyword in REST_OF_LINE) for keyword, arity in ARITY.items()}
#: the one Command of each keyword without arguments (immutable, so shared)
_BARE = {keyword: Command(keyword, ()) for keyword in ARITY}


def parse_command(content: bytes) -> Command | GrammarError:
    """Split a line into keyword and arguments, checking the keyword and the argument count."""
    keyword_bytes, sep, rest = content.partition(b" ")
    known = _KNOWN.get(keyword_bytes.upper()) if 3 <= len(keyword_bytes) <= 4 else None
    if known is None:  # not one of ours: is it a keyword at all?
        if not _KEYWORD.match(keyword_bytes):
            return GrammarError("keyword is not 3-4 ASCII letters")
        return GrammarError("unknown command", keyword_bytes.decode("ascii").upper())
    keyword, (low, high), rest_of_line = known
    if not sep:
        return _BARE[keyword] if low == 0 else GrammarError("wrong number of arguments", keyword)
    if rest_of_line:
        args: tuple[bytes, ...] = (rest,)
    else:
        args = tuple(rest.split(b" "))
        if b"" in args:
            return GrammarError("arguments must be separated by a single space", keyword)
    if not low <= len(args) <= high:
        return GrammarError("wrong number of arguments", keyword)
    return Command(keyword, args)


def parse_number(raw: bytes, *, allow_zero: bool = False) -> int | None:
    """A decimal message number or line count: digits only, at most 10 of them, 1-based unless allowed.

    ``-1``, ``+1``, ``1e3``, ``0x10``, blanks and 11-digit values are all rejected, so no
    client can reach the last message through ``0`` or a wrapped-around integer.
    """
    if not raw or len(raw) > MAX_NUMBER_DIGITS or not raw.isdigit() or not raw.isascii():
        return None
    value = int(raw)
    if value == 0 and not allow_zero:
        return None
    return value


#: Code points that render as nothing or as blank space although they are letters or marks:
#: Unicode's Default_Ignorable_Code_Point set (DerivedCoreProperties.txt, Unicode 14: soft hyphen,
#: combining grapheme joiner, the Hangul fillers U+115F U+1160 U+3164 U+FFA0, Khmer inherent vowels,
#: Mongolian and other variation selectors, zero-width and bidi controls, tags), plus the braille
#: blank U+2800 and the Khitan filler U+16FE4. Fillers are category Lo and selectors Mn, so a
#: category check alone lets them through, and ``alice`` + U+3164 is logged like ``alice``.
_INVISIBLE_RANGES: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160), (0x17B4, 0x17B5),
    (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F), (0x2800, 0x2800),
    (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8),
    (0x16FE4, 0x16FE4), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF),
)

#: most combining marks on one letter after NFC (Tibetan stacks and pointed Hebrew need 3-4;
#: "Zalgo" text piles up dozens)
MAX_MARKS_PER_LETTER = 4


def invisible(char: str) -> bool:
    """True for a default-ignorable or blank code point (see ``_INVISIBLE_RANGES``)."""
    code = ord(char)
    return any(low <= code <= high for low, high in _INVISIBLE_RANGES)


def normalise_username(name: str) -> str:
    """The NFC form: ``mu`` + U+0308 + ``ller`` (as macOS sends it) becomes ``müller``."""
    return unicodedata.normalize("NFC", name)


def username_problem(name: str, extra_chars: str) -> str | None:
    """Why an NFC user name is refused, or None.

    Allowed: letters and digits of any script, the configured extra characters, and combining
    marks where a script needs them. After NFC an honest Latin, Greek or Cyrillic letter is one
    code point; the marks left are those of scripts that are written with them (Devanagari and
    Thai vowel signs, Hebrew points, Yoruba's second accent). So a combining mark must follow a
    letter, directly or after other marks on that letter, at most ``MAX_MARKS_PER_LETTER`` of
    them, and not the same mark twice in a row. Invisible code points are refused outright, even
    when listed in ``extra_chars``.
    """
    if not name:
        return "empty user name"
    if name.isascii() and name[0] != "." and (
            name.isalnum() or name.translate(_deleting(extra_chars)).isalnum()):
        return None  # most names: ASCII letters, digits and extra characters, checked at C speed
    marks = -1  # marks on the current letter; -1: the previous character is no letter
    previous = ""
    for char in name:
        if invisible(char):
            return "user name has an invisible character"
        category = unicodedata.category(char)
        if category in ("Mn", "Mc"):
            if marks < 0:
                return "user name has a combining mark that follows no letter"
            if char == previous:
                return "user name repeats a combining mark"
            marks += 1
            if marks > MAX_MARKS_PER_LETTER:
                return "user name has too many combining marks on one letter"
        elif char in extra_chars:
            marks = -1
        elif category[0] == "L":
            marks = 0
        elif category[0] == "N":
            marks = -1
        else:
            return "user name has characters outside username_chars"
        previous = char
    if name[0] == ".":
        return "user name starts with '.'"
    return None


@functools.lru_cache(maxsize=8)
def _deleting(chars: str) -> dict[int, None]:
    """A str.translate table that deletes ``chars``."""
    return dict.fromkeys(map(ord, chars))


def valid_username(name: str, extra_chars: str) -> bool:
    """Letters (with the combining marks their script needs) and digits of any script, plus the
    configured extra characters; judged in NFC (see :func:`username_problem`)."""
    return username_problem(normalise_username(name), extra_chars) is None


def escape_sample(data: bytes, limit: int = 64) -> str:
    """Printable ASCII as is, every other byte as ``\\xNN``; at most ``limit`` input bytes."""
    out = []
    for byte in data[:limit]:
        if 0x20 <= byte < 0x7F and byte != 0x5C:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    if len(data) > limit:
        out.append("...")
    return "".join(out)


def command_sample(content: bytes, *, in_sasl: bool = False) -> str:
    """A log-safe sample of a line: keyword plus at most 64 characters of non-secret arguments."""
    if in_sasl:
        return f"<SASL response, {len(content)} octets>"
    keyword, sep, rest = content.partition(b" ")
    if not _KEYWORD.match(keyword):
        # Not a command: perhaps a password typed on its own line. Show its size only.
        return f"<not a command, {len(content)} octets>"
    shown = escape_sample(keyword, 16)
    if not sep:
        return shown
    if keyword.upper().decode("ascii") in SECRET_COMMANDS:
        return _secret_sample(keyword.upper(), rest, shown)
    return f"{shown} {escape_sample(rest)}"


def _secret_sample(keyword: bytes, rest: bytes, shown: str) -> str:
    """Keep what is safe to show of PASS/AUTH/APOP: AUTH's mechanism and APOP's name only."""
    if keyword == b"AUTH":
        mechanism, sep, _ = rest.partition(b" ")
        hidden = " <hidden>" if sep else ""
        return f"{shown} {escape_sample(mechanism, 20)}{hidden}"
    if keyword == b"APOP":
        name, _, _ = rest.partition(b" ")
        return f"{shown} {escape_sample(name)} <hidden>"
    return f"{shown} <hidden, {len(rest)} octets>"
