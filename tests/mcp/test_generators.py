"""The generated attacks are real, working code; the generators are deterministic.

The decoders are executed here with a plain unicorn harness that has nothing to do with the
detector: a decoder that did not reproduce its payload would make the detection figures
meaningless (the detector might only be reacting to garbage).
"""

from __future__ import annotations

import random

import generators as G
import pytest

unicorn = pytest.importorskip("unicorn")
from unicorn import x86_const as X86  # noqa: E402

BASE = 0x01000000
_REGS32 = [X86.UC_X86_REG_EAX, X86.UC_X86_REG_EBX, X86.UC_X86_REG_ECX, X86.UC_X86_REG_EDX,
           X86.UC_X86_REG_ESI, X86.UC_X86_REG_EDI, X86.UC_X86_REG_EBP]


def first_system_call(code: bytes, bits: int = 32, entry: int = 0, pointer: int | None = None, stack_at_code: bool = False) -> int | None:
    """Run ``code`` from ``entry`` (every register pointing at ``pointer``, by default the
    entry; with ``stack_at_code`` the stack pointer too, as after ``jmp esp``) to its first
    system call; its number."""
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32 if bits == 32 else unicorn.UC_MODE_64)
    uc.mem_map(BASE, 0x100000)
    uc.mem_map(0x200000, 0x100000)
    uc.mem_write(BASE + 0x1000, code)
    target = BASE + 0x1000 + (entry if pointer is None else pointer)
    for register in _REGS32:
        uc.reg_write(register, target)
    uc.reg_write(X86.UC_X86_REG_ESP if bits == 32 else X86.UC_X86_REG_RSP, target if stack_at_code else 0x280000)
    calls: list[int] = []

    def on_interrupt(u: object, number: int, _: object) -> None:
        calls.append(uc.reg_read(X86.UC_X86_REG_EAX))
        uc.emu_stop()

    def on_syscall(u: object, _: object) -> None:
        calls.append(uc.reg_read(X86.UC_X86_REG_RAX))
        uc.emu_stop()

    uc.hook_add(unicorn.UC_HOOK_INTR, on_interrupt)
    uc.hook_add(unicorn.UC_HOOK_INSN, on_syscall, None, 1, 0, X86.UC_X86_INS_SYSCALL)
    try:
        uc.emu_start(BASE + 0x1000 + entry, 0, count=300_000)
    except unicorn.UcError:
        return None
    return calls[0] if calls else None


@pytest.mark.parametrize("encoder", [G.xor_callpop, G.xor_call4, G.xor_fnstenv])
def test_x86_decoders_reproduce_their_payload(encoder: object) -> None:
    rng = random.Random(21)
    for _ in range(40):
        encoded = encoder(rng, G.linux_execve(rng))
        assert first_system_call(encoded) == 11  # execve


def test_alphanumeric_encoder_is_alphanumeric_and_decodes() -> None:
    rng = random.Random(22)
    for _ in range(40):
        base = rng.choice([G.EAX, G.EBX, G.ECX, G.EDX, G.ESI, G.EDI, G.EBP])
        encoded = G.alnum_encode(rng, G.linux_execve(rng), base)
        assert all(c in G.ALNUM for c in encoded)
        assert first_system_call(encoded) == 11


def test_printable_builder_is_printable_and_decodes() -> None:
    rng = random.Random(23)
    for _ in range(40):
        encoded = G.printable_encode(rng, G.linux_execve(rng), rng.choice([G.EAX, G.ECX, G.ESI]))
        assert all(0x21 <= c <= 0x7E for c in encoded)
        assert first_system_call(encoded) == 11


@pytest.mark.parametrize("family", G.PRINTABLE_FAMILIES)
def test_printable_families_are_printable_and_decode(family: object) -> None:
    """Every family, every base register (esp: after ``jmp esp``), with and without a landing
    pad in front (the register at the pad, or at the builder), runs to the payload's system
    call, and uses only bytes 0x21..0x7e."""
    rng = random.Random(27)
    for index in range(48):
        base = G.PRINTABLE_BASES[index % len(G.PRINTABLE_BASES)]
        payload, number = rng.choice([(G.linux_execve(rng), 11), (G.linux_setuid_execve(rng), 23),
                                      (G.linux_bind_shell(rng), 102), (G.linux_chmod(rng), 15)])
        layout = index // len(G.PRINTABLE_BASES) % 3
        touched = {0x40 + base, 0x48 + base} | (set(b"'/7?") if base == G.EAX else set())
        lead = bytes(rng.choice([b for b in G.PAD_BYTES if b not in touched]) for _ in range(rng.randint(1, 30)))
        if layout == 0:
            encoded, entry, pointer = family(rng, payload, base), 0, 0
        elif layout == 1:  # the exploit jumps to the pad, its register pointing at the pad
            encoded, entry, pointer = lead + family(rng, payload, base, len(lead)), 0, 0
        else:  # the register points at the builder, behind a pad
            encoded, entry, pointer = lead + family(rng, payload, base), len(lead), len(lead)
        assert all(0x21 <= c <= 0x7E for c in encoded)
        assert first_system_call(encoded, entry=entry, pointer=pointer, stack_at_code=base == G.ESP) == number, (index, base)


def test_printable_builders_fail_with_the_wrong_register() -> None:
    """The families really depend on the register the exploit leaves: pointed elsewhere,
    they decode garbage (so a detector that finds them has found the right start)."""
    rng = random.Random(28)
    for family in G.PRINTABLE_FAMILIES:
        encoded = family(rng, G.linux_execve(rng), G.ECX)
        assert first_system_call(encoded, pointer=64) != 11


def test_x64_payloads_and_decoder() -> None:
    rng = random.Random(24)
    for _ in range(20):
        assert first_system_call(G.x64_execve(rng), 64) == 59
        assert first_system_call(G.x64_xor(rng, G.x64_execve(rng)), 64) == 59
    assert first_system_call(G.x64_bind_shell(rng), 64) == 41  # socket


def test_linux_payloads_start_with_their_system_call() -> None:
    rng = random.Random(25)
    expected = {G.linux_execve: 11, G.linux_setuid_execve: 23, G.linux_bind_shell: 102,
                G.linux_reverse_shell: 102, G.linux_chmod: 15, G.linux_write_message: 4, G.bsd_execve: 59}
    for make, number in expected.items():
        assert first_system_call(make(rng)) == number


def test_exploit_shapes() -> None:
    rng = random.Random(26)
    for _ in range(20):
        slmail = G.gen_slmail(rng)
        assert 2600 <= len(slmail) <= 4600 and slmail.startswith(b"A" * 2600)
        assert not set(slmail) & G.BAD
        cyrus = G.gen_cyrus(rng)
        assert 540 <= len(cyrus) <= 600 and not set(cyrus) & G.BAD


def test_generators_are_deterministic() -> None:
    assert G.attack_corpus(5, seed=3) == G.attack_corpus(5, seed=3)
    assert G.benign_corpus(0.01, seed=4) == G.benign_corpus(0.01, seed=4)
    assert G.attack_corpus(5, seed=3) != G.attack_corpus(5, seed=5)


def test_benign_corpus_has_the_promised_size() -> None:
    """20,000+ benign arguments at full scale (the benchmark's corpus)."""
    assert sum(G.BENIGN_COUNTS.values()) >= 20_000
    assert G.BENIGN_COUNTS["password"] == 10_000
