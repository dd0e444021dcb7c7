"""The real shellcode corpus (public exploit archive extract) and its scope filter.

The corpus lives outside the repository, at ``<repo>/../shared/mcp-corpus`` (or the path in
``MCP_CORPUS``).  ``sc_shellcodes.jsonl`` holds raw shellcodes filed by platform,
``sc_exploits.jsonl`` payload blobs cut out of remote exploits.

Scope: the detector looks for x86 and x86-64 machine code, so an entry is *in scope* when it is
x86 / x86-64 code.  The filter is independent of the detector (it never asks the detector):

1. a platform named in the path decides: ``*_x86`` and ``*_x86-64`` are in, ARM, MIPS, PPC,
   SPARC and other architectures are out; ``generator``/``windows``/``linux`` (no
   architecture) and every exploit blob go through the content checks below;
2. ``too-short``: under 16 bytes (return addresses, jump patches: no room for a payload);
3. ``text``: at least 90 % printable, starting with 16 printable bytes, and not labelled
   ``alnum`` by the corpus (scripts, shell commands, HTTP, HTML; printable shellcode behind a
   binary GetPC stub starts with binary bytes and stays in);
4. ``bad-char-table``: mostly consecutive byte values (the table exploit writers use to test
   for bad characters);
5. ``structured-data``: more than 30 % NUL bytes (protocol headers, UTF-16 strings, padding;
   shellcode avoids NULs);
6. ``not-x86`` (only where the path names no architecture, and not for ``alnum`` entries):
   the code at the start, up to its first loop, return, system call or backward transfer,
   does not look like x86 in either mode: fewer than 12 bytes (or the whole entry) decode
   before an invalid opcode, more than one odd instruction (``bound``, ``arpl``, ``les``,
   ``in``, ``out``, ``hlt``, ``iret``, far transfers, ``00 00`` padding...), or fewer than 85 % of those
   instructions are ones compiled and hand-written code use all the time.  This removes other architectures and most encrypted
   payload bodies cut off from their decoder stub (random bytes pass it about one time in five,
   so some such fragments stay in scope and count against the detector);
   A leading run of one repeated byte (NOP sled, filler) is skipped first, and a blob that is
   nothing but such a run (a NOP sled) is x86 and stays in;
7. ``data-only``: nothing but pushes, pops, increments and decrements (a stager's data).

Content-filtered entries of the platform-labelled x86 files are also reported, so nothing
is silently dropped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def corpus_dir() -> Path:
    """Where the corpus is expected: ``$MCP_CORPUS`` or ``<repo>/../shared/mcp-corpus``."""
    override = os.environ.get("MCP_CORPUS")
    return Path(override) if override else REPO.parent / "shared" / "mcp-corpus"


@dataclass(frozen=True)
class Entry:
    source: str  # "shellcodes" or "exploits"
    src: str
    kind: str
    data: bytes
    scope: str  # "in" or the reason it is out of scope
    group: str  # platform (shellcodes) or "exploit-binary"/"exploit-alnum"
    bits: int  # 32, 64, or 0 when unknown


_X86_PLATFORM = re.compile(r"_x86(-64)?$")
_OTHER_ARCH = re.compile(r"arm|mips|ppc|powerpc|sparc|aix|hp-?ux|irix|sh4|s390|alpha|m68k|superh", re.I)

try:
    from iced_x86 import Decoder, Mnemonic

    _ODD = {
        Mnemonic.BOUND, Mnemonic.ARPL, Mnemonic.LDS, Mnemonic.LES, Mnemonic.INTO, Mnemonic.INT1,
        Mnemonic.XLATB, Mnemonic.SALC, Mnemonic.HLT, Mnemonic.IRET, Mnemonic.IRETD, Mnemonic.RETF,
        Mnemonic.CLI, Mnemonic.STI, Mnemonic.IN, Mnemonic.OUT, Mnemonic.INSB, Mnemonic.INSD,
        Mnemonic.OUTSB, Mnemonic.OUTSD, Mnemonic.INSW, Mnemonic.OUTSW, Mnemonic.AAM, Mnemonic.AAD,
    }
    _COMMON = {
        getattr(Mnemonic, name)
        for name in (
            "MOV PUSH POP XOR ADD SUB CALL JMP JE JNE LEA CMP TEST INC DEC INT LOOP LODSB LODSD "
            "STOSB STOSD MOVSB MOVSD CDQ XCHG AND OR SHL SHR ROL ROR NOP IMUL MUL NEG NOT JB JAE "
            "JBE JA JL JGE JLE JG JS JNS MOVZX MOVSX SYSCALL SYSENTER RET FNSTENV FLDZ FLD1 FLDPI "
            "FCMOVB FCMOVE FCMOVBE FCMOVNB FCMOVNE FCMOVNBE FCMOVU FCMOVNU FXCH SBB ADC JECXZ "
            "JRCXZ CMPSB SCASB SCASD CWDE CLD STD CLC STC PUSHAD POPAD PUSHFD POPFD BSWAP AAA"
        ).split()
        if hasattr(Mnemonic, name)
    }
    _TRIVIAL = {Mnemonic.PUSH, Mnemonic.POP, Mnemonic.INC, Mnemonic.DEC}
    _ENDS = {
        Mnemonic.LOOP, Mnemonic.LOOPE, Mnemonic.LOOPNE, Mnemonic.JECXZ, Mnemonic.RET, Mnemonic.INT,
        Mnemonic.INT3, Mnemonic.SYSCALL, Mnemonic.SYSENTER,
    }
    HAVE_ICED = True
except ImportError:  # pragma: no cover - iced-x86 is a test dependency
    HAVE_ICED = False

#: share of the first instructions that must be common ones for an entry to count as x86
COMMON_SHARE = 0.85


def _looks_like_x86(data: bytes, bits: int) -> bool:
    """The first instructions (at most 12, following ``jmp`` and ``call`` like the CPU, up to
    the first loop, return, system call or backward conditional jump, after which decoder stubs
    keep data: encrypted bodies, strings) decode cleanly: at least 12 bytes (or the entry, or
    a path that ended), at most one odd instruction, mostly common instructions."""
    decoded = common = odd = 0
    seen = 0
    ended = False
    at = 0
    visited: set[int] = set()
    while 0 <= at < len(data) and decoded < 12 and at not in visited:
        visited.add(at)
        instruction = Decoder(bits, data[at:at + 16], ip=at).decode()
        if instruction.is_invalid:
            break
        decoded += 1
        seen += instruction.len
        common += instruction.mnemonic in _COMMON or instruction.is_stack_instruction
        common += _x87_register_form(data, at)
        odd += instruction.mnemonic in _ODD or instruction.is_call_far or instruction.is_jmp_far
        odd += data[at:at + 2] == b"\x00\x00"  # add [eax], al: zero padding
        if _ends_path(instruction):
            ended = decoded >= 2
            break
        at = _next(instruction)
    if (seen < min(12, len(data)) and not ended) or odd > 1 or decoded < 2:
        return False
    return common >= COMMON_SHARE * decoded


def _next(instruction: object) -> int:
    """Where execution continues: the target of ``jmp``/``call``, else the next instruction."""
    if instruction.is_call_near or instruction.is_jmp_short_or_near:
        return instruction.near_branch_target
    return instruction.next_ip


def _x87_register_form(data: bytes, at: int) -> bool:
    """An x87 instruction on registers (``fldz``, ``fcmov st(i)``): what shellcode runs just
    before ``fnstenv`` to learn its own address.  Memory forms are not counted: random bytes
    hit them often."""
    return 0xD8 <= data[at] <= 0xDF and at + 1 < len(data) and data[at + 1] >= 0xC0


def _skip_filler(data: bytes) -> bytes:
    """Drop leading NOPs and breakpoints, or a run of one repeated byte (sled, filler)."""
    stripped = data.lstrip(b"\x90\xcc")
    run = len(data) - len(data.lstrip(data[:1]))
    if run >= 4 and run > len(data) - len(stripped):
        stripped = data[run:]
    return stripped if len(stripped) >= 8 else data


def _ends_path(instruction: object) -> bool:
    """Loops, returns, system calls and backward conditional jumps end a code path."""
    if instruction.mnemonic in _ENDS:
        return True
    return instruction.is_jcc_short_or_near and instruction.near_branch_target < instruction.ip


def _does_something(data: bytes, bits: int) -> bool:
    """Whether any instruction does more than push, pop, increment or decrement."""
    return any(not i.is_invalid and i.mnemonic not in _TRIVIAL for i in Decoder(bits, data))


def classify(data: bytes, kind: str, platform: str | None) -> tuple[str, int]:
    """(scope, bits) for one entry; scope is "in" or the reason it is out."""
    if platform is not None:
        if _OTHER_ARCH.search(platform):
            return "other-arch", 0
        match = _X86_PLATFORM.search(platform)
        if match:
            bits = 64 if match.group(1) else 32
            return _content_scope(data, kind, (bits,), architecture_known=True), bits
    return _content_scope(data, kind, (32, 64)), 0


def _content_scope(data: bytes, kind: str, modes: tuple[int, ...], architecture_known: bool = False) -> str:
    if len(data) < 16:
        return "too-short"
    printable = sum(1 for b in data if 0x20 <= b < 0x7F or b in (9, 10, 13))
    head_printable = all(0x20 <= b < 0x7F or b in (9, 10, 13) for b in data[:16])
    if kind != "alnum" and printable >= 0.9 * len(data) and head_printable:
        return "text"
    steps = sum(1 for a, b in zip(data, data[1:]) if b == a + 1)
    if steps >= 0.5 * (len(data) - 1):
        return "bad-char-table"
    if data.count(0) > 0.3 * len(data):
        return "structured-data"
    if not HAVE_ICED:
        return "in"
    code = _skip_filler(data)
    if kind != "alnum" and not architecture_known and not any(_looks_like_x86(code, bits) for bits in modes):
        return "not-x86"
    if not any(_does_something(data, bits) for bits in modes):
        return "data-only"
    return "in"


def load() -> list[Entry]:
    """Every corpus entry with its scope; empty if the corpus is absent."""
    directory = corpus_dir()
    entries: list[Entry] = []
    for name, source in (("sc_shellcodes.jsonl", "shellcodes"), ("sc_exploits.jsonl", "exploits")):
        path = directory / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            entries.append(_entry(json.loads(line), source))
    return entries


def _entry(row: dict[str, str], source: str) -> Entry:
    data = bytes.fromhex(row["hex"])
    parts = row["src"].split("/")
    if source == "shellcodes":
        platform = parts[1] if len(parts) > 2 else "unknown"
        ambiguous = platform in ("generator", "windows", "linux", "unknown")
        scope, bits = classify(data, row["kind"], None if ambiguous else platform)
        group = platform
    else:
        scope, bits = classify(data, row["kind"], None)
        group = f"exploit-{row['kind']}"
    return Entry(source, row["src"], row["kind"], data, scope, group, bits)


def present() -> bool:
    return all((corpus_dir() / name).exists() for name in ("sc_shellcodes.jsonl", "sc_exploits.jsonl"))


def categories(entries: list[Entry]) -> Iterator[tuple[str, list[Entry]]]:
    """In-scope entries grouped the way the benchmark and the tests report them."""
    groups: dict[str, list[Entry]] = {}
    for entry in entries:
        if entry.scope != "in":
            continue
        if entry.source == "exploits":
            name = f"real:{entry.group}"
        elif entry.bits == 64 or entry.group.endswith("x86-64"):
            name = "real:shellcode-x86-64"
        elif entry.group.startswith("windows"):
            name = "real:shellcode-windows-x86"
        else:
            name = "real:shellcode-unix-x86"
        groups.setdefault(name, []).append(entry)
    yield from sorted(groups.items())
