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


_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


def _is_text(data: bytes) -> bool:
    """Printable or UTF-8 text without control bytes: :func:`_non_text` is 0 for all of it."""
    if _CONTROL.search(data):
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def find_sled(data: bytes) -> int | None:
    """Offset of a NOP-equivalent sled with enough non-text bytes, or ``None``."""
    if _is_text(data):
        return None  # no stretch of it has a non-text byte (a cut UTF-8 sequence makes two)
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


# ---------------------------------------------------------------- printable text: a decoder path?
#
# Text made of printable bytes only (0x20-0x7e) has no system call, call, return or backward
# jump instruction: until the code executes a byte it changed, control only moves forward
# (conditional jumps have displacements of 0x20-0x7e), so every run follows a path in a
# forward graph of the window's instructions.  Before a printable decoder executes a byte it
# wrote (its patched loop branch, the code it built), that path has executed its set-up: the
# base register (push/pop), the arithmetic that makes non-printable bytes (and/sub/xor with
# immediates, imul, inc/dec) and the stores (pushes, xor/sub/and into memory).  The generated
# and the real printable decoders have 26 or more such instructions on their path; honest text
# has few, because every few letters stop the run (``l`` to ``o`` are ins/outs, privileged) and
# the rest are jumps, prefixes and comparisons.

#: most set-up instructions on any path of a window that is still not emulated
DECODER_PATH_MIN = 13

#: per opcode its form (stops the run, prefix, jcc rel8, one byte, imm8, imm32 (imm16 with
#: 0x66), ModRM, ModRM + imm8, ModRM + imm32) and whether it is set-up work
_F_STOP, _F_PREFIX, _F_JCC, _F_ONE, _F_IMM8, _F_IMMW, _F_MODRM, _F_MODRM_IMM8, _F_MODRM_IMMW = range(9)
_FORM = [_F_STOP] * 256
_WORK = [0] * 256
for _op in range(0x20, 0x7F):
    _low = _op & 7
    if _op < 0x40:
        if _low in (6, 7):  # segment prefixes and the BCD adjustments
            _FORM[_op] = _F_PREFIX if _low == 6 else _F_ONE
        else:
            _FORM[_op] = (_F_MODRM, _F_MODRM, _F_MODRM, _F_MODRM, _F_IMM8, _F_IMMW)[_low]
            _WORK[_op] = int(_op < 0x38)  # and, sub, xor (cmp only compares)
    elif _op <= 0x61:
        _FORM[_op], _WORK[_op] = _F_ONE, 1  # inc, dec, push, pop, pusha, popa
    elif _op in (0x62, 0x63):
        _FORM[_op] = _F_MODRM  # bound, arpl
        _WORK[_op] = int(_op == 0x63)  # arpl r/m16, r16 stores (it can raise a selector's RPL)
    elif 0x64 <= _op <= 0x67:
        _FORM[_op] = _F_PREFIX
    elif _op in (0x68, 0x6A):
        _FORM[_op], _WORK[_op] = (_F_IMMW if _op == 0x68 else _F_IMM8), 1
    elif _op in (0x69, 0x6B):
        _FORM[_op], _WORK[_op] = (_F_MODRM_IMMW if _op == 0x69 else _F_MODRM_IMM8), 1
    elif _op >= 0x70:
        _FORM[_op] = _F_JCC
#: bytes a ModRM operand takes (ModRM, SIB, displacement) in 32-bit addressing, and in 16-bit
_MODRM32 = [0] * 256
_MODRM16 = [0] * 256
for _m in range(256):
    _mod, _rm = _m >> 6, _m & 7
    _MODRM32[_m] = 1 if _mod == 3 else 1 + (1 if _rm == 4 else 0) + (4 if _mod == 0 and _rm == 5 else 0) + (0, 1, 4, 0)[_mod]
    _MODRM16[_m] = 1 if _mod == 3 else 1 + (2 if _mod == 0 and _rm == 6 else 0) + (0, 1, 2, 0)[_mod]
#: bytes of the opcode and its immediate (32-bit operand size) for the forms that are not prefixes or jumps
_FIXED = [{_F_ONE: 1, _F_IMM8: 2, _F_IMMW: 5, _F_MODRM: 1, _F_MODRM_IMM8: 2, _F_MODRM_IMMW: 5}.get(_k, 0) for _k in _FORM]
_PRINTABLE_ONLY = re.compile(rb"[\x20-\x7e]*")
_WIDENED_ONLY = re.compile(rb"[\x00\x20-\x7e]*")
_FORM_WIDENED = _FORM[:]
_FORM_WIDENED[0x00] = _F_MODRM
_FIXED[0x00] = 1  # (only read for widened data: 0x00 stops plain text)


def decoder_path(data: bytes, enough: int | None = None, widened: bool = False) -> int | None:
    """The most set-up instructions any run of printable ``data`` executes before it could
    execute a byte it changed (counting stops once that reaches ``enough``), or ``None`` if
    ``data`` is not printable only (then the bound does not hold: other bytes may be calls,
    returns or system calls)."""
    paths = decoder_paths(data, enough, widened)
    return None if paths is None else max(paths, default=0)


def decoder_paths(data: bytes, enough: int | None = None, widened: bool = False) -> list[int] | None:
    """Per offset of printable ``data``, the most set-up instructions a run started there can
    execute before it could execute a byte it changed; ``None`` if ``data`` has other bytes.

    The bound holds in both modes: x86-64 reads 0x40-0x4f as REX prefixes (counted here as
    instructions of their own, so the bound only grows), has no ``pusha``/``popa``/``bound``
    or BCD adjustments (they continue here), and 0x67 selects the other address size (both
    lengths are followed).  With ``enough``, counting stops at the first offset reaching it
    (the list then only proves that some path is long enough).

    ``widened`` data is text as a server that widens it to UTF-16 holds it: printable bytes
    and NULs.  ``00`` is ``add r/m8, r8``, which "venetian" code uses as padding between
    its instructions: it continues the path but is not counted as set-up."""
    if not (_WIDENED_ONLY if widened else _PRINTABLE_ONLY).fullmatch(data):
        return None
    n = len(data)
    buf = data + b"\xff\xff\xff"  # 0xff stops in both forms: no bounds checks on operand bytes
    best = [0] * (n + 264)  # and no checks on jump targets (at most 0x101 past the jump)
    limit = n + 1 if enough is None else enough
    form, work, fixed, m32 = (_FORM_WIDENED if widened else _FORM), _WORK, _FIXED, _MODRM32
    stop, one, jcc, prefix, modrm_form = _F_STOP, _F_ONE, _F_JCC, _F_PREFIX, _F_MODRM
    for at in range(n - 1, -1, -1):
        op = buf[at]
        kind = form[op]
        if kind == stop:
            continue  # best[at] stays 0: the run ends here
        if kind == one:
            value = best[at + 1] + work[op]
        elif kind == jcc:
            value = best[at + 2]
            target = best[at + 2 + buf[at + 1]]
            if target > value:
                value = target
        elif kind == prefix:
            value = _prefixed(data, at, n, best)
        else:
            size = fixed[op]
            if kind >= modrm_form:
                modrm = buf[at + 1]
                if op == 0x62 and modrm >= 0xC0:
                    continue  # bound with a register operand: invalid
                size += m32[modrm]
                if modrm & 0xC7 == 4 and buf[at + 2] & 7 == 5:
                    size += 4  # SIB with a 32-bit displacement and no base
            if at + size > n:
                continue
            value = best[at + size] + work[op]
        best[at] = value
        if value >= limit:
            break
    del best[n:]
    return best


def _prefixed(data: bytes, at: int, n: int, best: list[int]) -> int:
    """:func:`decoder_path`'s value at a prefixed instruction (0x66 and 0x67 change sizes)."""
    here = at
    wide, table = True, _MODRM32
    while _FORM[data[here]] == _F_PREFIX:
        if data[here] == 0x66:
            wide = False
        elif data[here] == 0x67:
            table = _MODRM16
        here += 1
        if here >= n or here - at > 4:
            return 0
    op = data[here]
    kind = _FORM[op]
    size = here - at + 1
    if kind == _F_STOP:
        return 0
    if kind >= _F_MODRM:
        if here + 1 >= n:
            return 0
        modrm = data[here + 1]
        if op == 0x62 and modrm >= 0xC0:
            return 0
        immediate = 1 if kind == _F_MODRM_IMM8 else (4 if wide else 2) if kind == _F_MODRM_IMMW else 0
        long_form = size + _MODRM32[modrm] + immediate
        if modrm & 0xC7 == 4 and here + 2 < n and data[here + 2] & 7 == 5:
            long_form += 4
        if table is _MODRM32:
            return best[at + long_form] + _WORK[op] if at + long_form <= n else 0
        # 0x67: 16-bit addressing in 32-bit mode, 32-bit addressing in 64-bit mode
        short_form = size + _MODRM16[modrm] + immediate
        values = [best[at + s] for s in (long_form, short_form) if at + s <= n]
        return max(values) + _WORK[op] if values else 0
    elif kind == _F_IMM8:
        size += 1
    elif kind == _F_IMMW:
        size += 4 if wide else 2
    elif kind == _F_JCC:
        if here + 1 >= n:
            return 0
        size += 1
        value = best[at + size] if at + size <= n else 0
        target = at + size + data[here + 1]
        return max(value, best[target]) if target < n else value
    if at + size > n:
        return 0
    return best[at + size] + _WORK[op]


def setup_runs(data: bytes) -> list[int] | None:
    """Per offset of printable ``data``, how many set-up instructions follow one another from
    there (falling through, no prefixes, jumps or comparisons in between); ``None`` if ``data``
    has other bytes.  A printable decoder begins with such a run (``VX-b[])-4GCD-R("N-54=DPY``:
    push, pop, sub, sub, sub, push, pop), text rarely has one of ten."""
    if not _PRINTABLE_ONLY.fullmatch(data):
        return None
    n = len(data)
    buf = data + b"\xff\xff\xff"
    run = [0] * (n + 16)
    work, fixed, form, m32, modrm_form = _WORK, _FIXED, _FORM, _MODRM32, _F_MODRM
    for at in range(n - 1, -1, -1):
        op = buf[at]
        if not work[op]:
            continue
        size = fixed[op]
        if form[op] >= modrm_form:
            modrm = buf[at + 1]
            size += m32[modrm]
            if modrm & 0xC7 == 4 and buf[at + 2] & 7 == 5:
                size += 4
        if at + size <= n:
            run[at] = 1 + run[at + size]
    del run[n:]
    return run
