"""A tiny hand-written x86 / x86-64 assembler for the corpus generators.

Only the handful of instruction forms shellcode is made of, plus labels for short jumps,
``loop`` and ``call``, so the generators can vary registers, order and junk and still produce
working code.  Two passes: every form has a fixed size, so label offsets are known after the
first pass.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI = range(8)
AL, CL, DL, BL = range(4)
#: registers that can serve as a plain [reg] / [reg+disp8] pointer without special encodings
POINTERS = (EAX, ECX, EDX, EBX, ESI, EDI)


def d32(value: int) -> bytes:
    return struct.pack("<I", value & 0xFFFFFFFF)


def modrm(mod: int, reg: int, rm: int) -> int:
    return (mod << 6) | (reg << 3) | rm


def xor_rr(dst: int, src: int) -> bytes:
    return bytes((0x31, modrm(3, src, dst)))


def sub_rr(dst: int, src: int) -> bytes:
    return bytes((0x29, modrm(3, src, dst)))


def mov_rr(dst: int, src: int) -> bytes:
    return bytes((0x89, modrm(3, src, dst)))


def push(reg: int) -> bytes:
    return bytes((0x50 + reg,))


def pop(reg: int) -> bytes:
    return bytes((0x58 + reg,))


def inc(reg: int) -> bytes:
    return bytes((0x40 + reg,))


def dec(reg: int) -> bytes:
    return bytes((0x48 + reg,))


def push_imm8(value: int) -> bytes:
    return bytes((0x6A, value & 0xFF))


def push_imm32(value: int | bytes) -> bytes:
    return b"\x68" + (value if isinstance(value, bytes) else d32(value))


def mov_r8(reg: int, value: int) -> bytes:
    return bytes((0xB0 + reg, value & 0xFF))


def mov_r32(reg: int, value: int) -> bytes:
    return bytes((0xB8 + reg,)) + d32(value)


def mov_r16(reg: int, value: int) -> bytes:
    return bytes((0x66, 0xB8 + reg)) + struct.pack("<H", value & 0xFFFF)


def mem_disp8(opcode: bytes, reg: int, base: int, disp: int) -> bytes:
    """``opcode`` with a ``[base+disp8]`` operand (base must not be esp)."""
    return opcode + bytes((modrm(1, reg, base), disp & 0xFF))


def mem(opcode: bytes, reg: int, base: int) -> bytes:
    """``opcode`` with a ``[base]`` operand; ebp needs a zero displacement."""
    if base == EBP:
        return mem_disp8(opcode, reg, base, 0)
    return opcode + bytes((modrm(0, reg, base),))


INT80 = b"\xcd\x80"
SYSCALL = b"\x0f\x05"
CDQ = b"\x99"
LODSD = b"\xad"


@dataclass(frozen=True)
class Label:
    name: str


@dataclass(frozen=True)
class Jump:
    """A relative control transfer to a label: ``kind`` is jmp8, jnz8, jns8, loop8 or call32."""

    kind: str
    target: str


_JUMP_OPCODES = {"jmp8": b"\xeb", "jnz8": b"\x75", "jns8": b"\x79", "loop8": b"\xe2", "jz8": b"\x74"}


def _size(item: bytes | Label | Jump) -> int:
    if isinstance(item, Label):
        return 0
    if isinstance(item, Jump):
        return 5 if item.kind == "call32" else 2
    return len(item)


def assemble(items: list[bytes | Label | Jump]) -> bytes:
    """Bytes of ``items`` with every jump resolved; raises if a short jump is out of range."""
    labels: dict[str, int] = {}
    at = 0
    for item in items:
        if isinstance(item, Label):
            labels[item.name] = at
        at += _size(item)
    out = bytearray()
    for item in items:
        if isinstance(item, Label):
            continue
        if isinstance(item, Jump):
            end = len(out) + _size(item)
            delta = labels[item.target] - end
            if item.kind == "call32":
                out += b"\xe8" + d32(delta)
            else:
                if not -128 <= delta <= 127:
                    raise ValueError(f"short jump to {item.target} out of range ({delta})")
                out += _JUMP_OPCODES[item.kind] + bytes((delta & 0xFF,))
            continue
        out += item
    return bytes(out)


# ---------------------------------------------------------------------- x86-64

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)


def rex_w(op: bytes) -> bytes:
    return b"\x48" + op


def mov_r64_imm(reg: int, value: int | bytes) -> bytes:
    raw = value if isinstance(value, bytes) else struct.pack("<Q", value & (2**64 - 1))
    return bytes((0x48, 0xB8 + reg)) + raw


def xor_r64(dst: int, src: int) -> bytes:
    return rex_w(xor_rr(dst, src))


def mov_r64(dst: int, src: int) -> bytes:
    return rex_w(mov_rr(dst, src))
