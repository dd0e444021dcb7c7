"""Static checks that need no emulator: NOP-equivalent sleds and sprayed return addresses.

Both are the *delivery* half of a memory-corruption exploit rather than its payload, so they
catch exploits whose payload does nothing an emulator recognises.  They are pure Python (a
small table-driven length decoder of the instructions a sled may use) so that they also run
when the optional emulator is not installed.

Text is valid x86 (``A`` is ``inc ecx``, emoji make fine sleds), so a run of harmless
instructions means nothing on its own in text; a sled is only reported when a good part of it
is neither printable nor valid UTF-8.
"""

from __future__ import annotations

import re

#: shortest sled worth reporting; random binary reaches this with probability ~1e-9 per offset
SLED_MIN = 40
#: share of non-text bytes a sled must have (a sled of ``A`` is indistinguishable from text)
SLED_BINARY_SHARE = 0.25

_ONE = set(b"\x27\x2f\x37\x3f\x90\x91\x92\x93\x95\x96\x97\x98\x99\x9b\x9e\x9f\xd6\xf5\xf8\xf9\xfc\xfd")
_ONE.update(range(0x40, 0x50))
#: the one-byte instructions that touch neither memory nor control flow (landing pads)
ONE_BYTE = frozenset(_ONE)
_IMM8 = set(b"\x04\x0c\x14\x1c\x24\x2c\x34\x3c\xa8") | set(range(0xB0, 0xB8))
_IMM32 = set(b"\x05\x0d\x15\x1d\x25\x2d\x35\x3d\xa9") | set(range(0xB8, 0xC0))
#: register-to-register forms (ModRM with mod == 3): ALU ops, test, xchg, mov, shifts
_REG_REG = {op for base in range(0x00, 0x40, 8) for op in range(base, base + 4)} | set(range(0x84, 0x8C))
_REG_REG |= {0xD0, 0xD1, 0xD2, 0xD3}
#: register forms with an immediate: opcode -> immediate size
_REG_IMM = {0x80: 1, 0x83: 1, 0xC0: 1, 0xC1: 1, 0x6B: 1, 0xC6: 1, 0x81: 4, 0x69: 4, 0xC7: 4}
#: group opcodes whose ModRM reg field selects a harmless register operation
_GROUP_OK = {0xF7: {2, 3}, 0xF6: {2, 3}, 0xFE: {0, 1}, 0xFF: {0, 1}}
_TWO_BYTE_REG = set(range(0x40, 0x50)) | {0xAF, 0xB6, 0xB7, 0xBE, 0xBF}


def _modrm_length(data: bytes, at: int) -> int:
    """Bytes taken by a ModRM operand (ModRM, SIB, displacement) in 32-bit addressing."""
    modrm = data[at]
    mod, rm = modrm >> 6, modrm & 7
    if mod == 3:
        return 1
    size = 1
    if rm == 4:
        size += 1
        if mod == 0 and at + 1 < len(data) and data[at + 1] & 7 == 5:
            size += 4
    elif mod == 0 and rm == 5:
        size += 4
    return size + (1 if mod == 1 else 4 if mod == 2 else 0)


def sled_length(data: bytes, at: int) -> int:
    """Length of the instruction at ``at`` if it touches neither memory nor control flow, else 0."""
    op = data[at]
    rest = len(data) - at - 1
    if op in _ONE:
        return 1
    if op in _IMM8:
        return 2 if rest >= 1 else 0
    if op in _IMM32:
        return 5 if rest >= 4 else 0
    if rest < 1:
        return 0
    modrm = data[at + 1]
    if op == 0x8D:  # lea computes an address without reading it
        return 0 if modrm >> 6 == 3 else _fits(1 + _modrm_length(data, at + 1), rest + 1)
    if modrm >> 6 != 3:
        return 0
    if op in _REG_REG:
        return 2
    if op in _REG_IMM:
        return _fits(2 + _REG_IMM[op], rest + 1)
    if op in _GROUP_OK:
        return 2 if (modrm >> 3) & 7 in _GROUP_OK[op] else 0
    return 0


def _two_byte_sled_length(data: bytes, at: int) -> int:
    """``0f``-prefixed register-only instructions (cmovcc, bswap, imul, movzx/movsx)."""
    if at + 1 >= len(data) or data[at] != 0x0F:
        return 0
    op = data[at + 1]
    if 0xC8 <= op <= 0xCF:
        return 2
    if op in _TWO_BYTE_REG and at + 2 < len(data) and data[at + 2] >> 6 == 3:
        return 3
    return 0


def _fits(size: int, available: int) -> int:
    return size if size <= available else 0


def sled_runs(data: bytes) -> list[int]:
    """For every offset, how many bytes of harmless instructions execute from there in a row."""
    runs = [0] * (len(data) + 1)
    for at in range(len(data) - 1, -1, -1):
        size = sled_length(data, at) or _two_byte_sled_length(data, at)
        runs[at] = size + runs[at + size] if size else 0
    return runs


def _non_text(data: bytes) -> int:
    """Bytes that are not text: controls, and bytes outside valid UTF-8 sequences.

    Valid UTF-8 is excluded as well as ASCII: emoji (``f0 9f 98 83``) decode as ``lock``,
    ``lahf``, ``cwde`` and ``xor eax, imm8``, a perfectly good sled.
    """
    controls = sum(1 for b in data if b < 0x20 or b == 0x7F)
    invalid = data.decode("utf-8", "replace").count("\ufffd")
    return controls + invalid


def find_sled(data: bytes) -> int | None:
    """Offset of a NOP-equivalent sled with enough non-text bytes, or ``None``."""
    runs = sled_runs(data)
    at = 0
    while at < len(data):
        size = runs[at]
        if size >= SLED_MIN and _non_text(data[at:at + size]) >= SLED_BINARY_SHARE * size:
            return at
        at += max(size, 1)
    return None


_SPRAY4 = re.compile(rb"(.{4})\1{3,}", re.DOTALL)
_SPRAY8 = re.compile(rb"(.{8})\1{2,}", re.DOTALL)


def _address_like(value: bytes) -> bool:
    """A repeated word that could be a code address: varied, at most one NUL, not pure text."""
    if len(value) == 8:
        if value[:4] == value[4:]:
            return False
        return len(set(value)) >= 4 and any(b < 0x20 or b > 0x7E for b in value)
    return len(set(value)) >= 3 and value.count(0) <= 1 and any(b < 0x20 or b > 0x7E for b in value)


#: a printable 4-byte word repeated this many octets is a spray, not something a person types
PRINTABLE_SPRAY = 64


def _printable_spray(value: bytes, run: int) -> bool:
    """An all-printable address (alphanumeric exploits choose them) sprayed over 64+ octets.

    Repeated text is only plausible with a short period ("hahaha", "abcabc"): a word of four
    distinct-enough bytes whose minimal period is four, repeated sixteen times or more, is not
    a password anybody types.
    """
    if len(value) != 4 or run < PRINTABLE_SPRAY or len(set(value)) < 3 or value[:2] == value[2:]:
        return False
    # "abcd", "ABCD", "1234": a keyboard run, not an address; addresses mix classes
    return not (value.isdigit() or value.islower() or value.isupper()) or not value.isalnum()


def find_return_spray(data: bytes) -> int | None:
    """Offset of a 4- or 8-byte value repeated back to back (4 resp. 3 times or more)."""
    for pattern in (_SPRAY4, _SPRAY8):
        for match in pattern.finditer(data):
            unit = match.group(1)
            if _address_like(unit) or _printable_spray(unit, match.end() - match.start()):
                return match.start()
    return None


def static_reasons(data: bytes, base: int = 0) -> list[str]:
    """Reasons found by the static checks, offsets relative to the whole argument."""
    reasons = []
    sled = find_sled(data)
    if sled is not None:
        reasons.append(f"x86-nop-sled@{base + sled}")
    spray = find_return_spray(data)
    if spray is not None:
        reasons.append(f"ret-spray@{base + spray}")
    return reasons
