"""Tier 0: field grammar and byte classes, pure Python, a few microseconds per argument.

Almost every argument a POP3 server sees is a short printable string, a message number or an
APOP digest.  Those are decided here without touching an emulator.  Binary bytes where text
belongs are decided here too: no mail client puts raw machine code into ``USER``.  Everything
else (long printable arguments, legacy 8-bit text, binary SASL data) is passed on to tier 1 by
returning ``None``, because printable bytes are perfectly valid x86 code.
"""

from __future__ import annotations

import re

from .verdict import Verdict, clean, malicious

#: printable arguments shorter than this cannot hold a useful self-decoding payload plus
#: its decoder, and make up nearly all real traffic, so they are decided clean at once
SHORT_TEXT = 40

_PRINTABLE = re.compile(rb"[\x20-\x7e\t]*")
_NUMBER = re.compile(rb"[0-9]{1,20}")
_DIGEST = re.compile(rb"[0-9a-fA-F]{32}")
_MECHANISM = re.compile(rb"[A-Za-z0-9_-]{1,20}")
#: what the protocol layer hands over as the "mechanism" of an over-long AUTH line: the line's
#: head after the keyword (``PLAIN <initial response>``) or its tail (``[AUTH PLAIN ]<base64>``)
_MECHANISM_AND_RESPONSE = re.compile(rb"(?:(?:AUTH )?[A-Za-z0-9_-]{1,20} )?[A-Za-z0-9+/]+=*|=", re.IGNORECASE)
#: C0 controls (tab allowed), DEL and the C1 range once decoded: never part of typed text
_CONTROL_CHARS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: ISO-8859-1 letters and signs as an old client may send them for a password
_LEGACY_RUN = re.compile(rb"[\xa0-\xff]{3,}")

# clean answers are shared constants: no allocation on the hot path
_CLEAN_SHORT = clean("short-printable")
_CLEAN_SHORT_TEXT = clean("short-text")
_CLEAN_NUMBER = clean("number")
_CLEAN_DIGEST = clean("digest")
_CLEAN_MECHANISM = clean("mechanism")
_CLEAN_EMPTY = clean("empty")
_CLEAN_MISMATCH = clean("grammar-mismatch")
_BINARY_TEXT = malicious("binary-in-text-field")

#: grammar-checked fields: (pattern, clean verdict, longest harmless printable mismatch)
_STRICT: dict[str, tuple[re.Pattern[bytes], Verdict, int]] = {
    "number": (_NUMBER, _CLEAN_NUMBER, 20),
    "digest": (_DIGEST, _CLEAN_DIGEST, 64),
    "mechanism": (_MECHANISM, _CLEAN_MECHANISM, 40),
}


def byte_class(argument: bytes) -> str:
    """One of ``ascii`` (printable), ``utf8`` (text), ``legacy`` (8-bit text) or ``binary``."""
    if _PRINTABLE.fullmatch(argument):
        return "ascii"
    try:
        text = argument.decode("utf-8")
    except UnicodeDecodeError:
        return "legacy" if _is_legacy_text(argument) else "binary"
    return "binary" if _CONTROL_CHARS.search(text) else "utf8"


def _is_legacy_text(argument: bytes) -> bool:
    """Latin-1 text as an old client sends it: mostly ASCII, isolated accented letters.

    Shellcode has control bytes, NULs and long runs of high bytes; typed Latin-1 text has none
    of those.  Such text is not decided here but handed to tier 1 like any long argument.
    """
    if _CONTROL_BYTES.search(argument) or _LEGACY_RUN.search(argument):
        return False
    high = sum(1 for b in argument if b >= 0x80)
    return all(b >= 0xA0 for b in argument if b >= 0x80) and high * 2 <= len(argument)


def quick_check(argument: bytes, field: str = "text") -> Verdict | None:
    """Tier 0: a decisive verdict, or ``None`` when tier 1 (:func:`deep_check`) must run."""
    if not argument:
        return _CLEAN_EMPTY
    strict = _STRICT.get(field)
    if strict is not None:
        return _check_strict(argument, field, strict)
    if field == "base64":
        return _check_base64(argument)
    if _PRINTABLE.fullmatch(argument):
        return _CLEAN_SHORT if len(argument) < SHORT_TEXT else None
    return _check_non_ascii(argument, field)


def _check_strict(argument: bytes, field: str, strict: tuple[re.Pattern[bytes], Verdict, int]) -> Verdict:
    """Numbers, digests, mechanism names: anything off-grammar and long or binary is an attack.

    A short printable mismatch (``RETR abc``) is a syntax error for the protocol layer to answer,
    not machine code, so it is not reported as malicious.
    """
    pattern, ok, longest = strict
    if pattern.fullmatch(argument):
        return ok
    if not _PRINTABLE.fullmatch(argument):
        return malicious(f"binary-in-{field}-field")
    if field == "mechanism" and _MECHANISM_AND_RESPONSE.fullmatch(argument):
        # the head of an over-long AUTH line (the mechanism, then the initial response) or
        # its tail, base64 text: harmless by grammar, so only behaviour (tier 1) can decide
        return _CLEAN_SHORT if len(argument) < SHORT_TEXT else None
    if len(argument) > longest:
        return malicious(f"{field}-grammar")
    return _CLEAN_MISMATCH


def _check_base64(argument: bytes) -> Verdict | None:
    """A raw SASL response line: base64 never holds binary; a long one still goes to tier 1.

    Whether it is *strict* base64 does not matter here: the alphanumeric alphabet that
    self-decoding shellcode is written in is the base64 alphabet, so validity proves nothing.
    """
    if not _PRINTABLE.fullmatch(argument):
        return malicious("binary-in-base64-field")
    return _CLEAN_SHORT if len(argument) < SHORT_TEXT else None


def _check_non_ascii(argument: bytes, field: str) -> Verdict | None:
    """UTF-8 text is as harmless as ASCII when short; binary is decisive except in SASL data."""
    kind = byte_class(argument)
    if kind == "utf8":
        return _CLEAN_SHORT_TEXT if len(argument) < SHORT_TEXT else None
    if kind == "legacy" or field == "sasl":
        return None
    return _BINARY_TEXT
