"""Static checks: sleds and sprayed return addresses, without an emulator."""

from __future__ import annotations

import random

import generators

from pop3shield.mcp.static import (
    DECODER_PATH_MIN,
    SLED_MIN,
    decoder_path,
    setup_runs,
    find_return_spray,
    find_sled,
    sled_length,
    static_reasons,
)


def test_sleds_are_found_at_their_start() -> None:
    rng = random.Random(3)
    for _ in range(200):
        sled = generators.any_sled(rng, rng.randint(SLED_MIN + 8, 600))
        prefix = bytes(rng.choice(b"xyz") for _ in range(rng.randint(0, 30)))
        offset = find_sled(prefix + sled + b"\xcc\xcc")
        assert offset is not None and offset <= len(prefix) + 2


def test_every_offset_of_a_polymorphic_sled_is_a_harmless_instruction() -> None:
    """The generator's property the detector relies on: landing anywhere works."""
    rng = random.Random(4)
    sled = generators.polymorphic_sled(rng, 300)
    assert all(sled_length(sled, at) for at in range(len(sled) - 1))


def test_text_and_utf8_are_not_sleds() -> None:
    assert find_sled(b"A" * 500) is None  # inc ecx: valid x86, but text
    emoji = "\U0001F603\U0001F60A\U0001F603\U0001F604\U0001F618 \U0001F606" * 4
    assert find_sled(emoji.encode()) is None  # lock/lahf/cwde/xor eax: a sled, but UTF-8 text
    assert find_sled("\u0416\u0443\u0440\u043d\u0430\u043b".encode() * 20) is None


def test_random_binary_has_no_sled_or_spray() -> None:
    rng = random.Random(5)
    for _ in range(300):
        data = rng.randbytes(rng.randint(40, 1500))
        assert static_reasons(data) == []


def test_return_address_sprays() -> None:
    assert find_return_spray(b"AAAA" + b"\x8f\x35\x4a\x5f" * 6) == 4
    assert find_return_spray(b"\x10\xf0\xfe\xbf" * 4) == 0
    assert find_return_spray(b"\x40\x3f\xfe\xff\xff\x7f\x00\x00" * 3) == 0
    assert find_return_spray(b"abcd" * 10) is None  # printable: could be a password
    assert find_return_spray(b"\x00" * 64) is None
    assert find_return_spray(b"\x90\x90\x90\x90" * 8) is None  # one byte value: a sled, not addresses
    assert find_return_spray("a\u0000b\u0000".encode("latin-1") * 8) is None  # UTF-16 text


def test_printable_address_sprays_of_64_octets_are_found() -> None:
    """Alphanumeric exploits pick printable return addresses; sixteen of them back to back are a spray."""
    for address in (b"\x5f\x4a\x35\x3f", b"w1Z~", b"Ab(d"):
        assert find_return_spray(b"PREFIX" + address * 16) == 6
        assert find_return_spray(address * 15) is None  # 60 octets: below the threshold


def test_repeated_text_is_not_a_spray() -> None:
    """What people do type: short periods and keyboard runs, however long."""
    for text in (b"ha" * 40, b"abc" * 30, b"abcd" * 20, b"ABCD" * 20, b"1234" * 20, b"ab12" * 20, b"x" * 100):
        assert find_return_spray(text) is None, text


def test_decoder_path_counts_set_up_instructions_on_the_longest_forward_path() -> None:
    """Exact values: a stopping instruction (ins) ends a path, a conditional jump continues on
    both sides, 0x66 makes push's immediate 16-bit, and non-printable bytes void the bound."""
    assert decoder_path(b"PPPlPP") == 3  # push x3, insb stops, push x2
    assert decoder_path(b"fhllP") == 2  # push imm16 'll', then push (as imm32 it leaves the window)
    assert decoder_path(b"t PPPPlP") == 4  # je +0x20 leaves the window: the fall-through counts
    assert decoder_path(b"t!" + b"l" * 0x21 + b"PPPPPP") == 6  # je jumps over the ins run
    assert decoder_path(b"9 ll") == 0  # cmp only compares, then insb stops
    assert decoder_path(b"PP\xcd\x80") is None
    assert decoder_path(b"P" * 100, enough=10) == 10  # stops counting once enough


def test_printable_decoders_have_a_decoder_path_and_passphrases_do_not() -> None:
    """Every generated printable decoder exceeds the screen's threshold by a wide margin;
    most passphrases stay under it (they are then not emulated at all; measured 78 % of these,
    the rest have upper-case words, which are inc/dec/push/pop)."""
    rng = random.Random(41)
    decoders = [generators.gen_alnum(rng) for _ in range(30)]
    decoders += [generators.gen_printable_family(rng) for _ in range(30)]
    paths = [decoder_path(d) for d in decoders]
    assert all(p is not None and p >= 2 * DECODER_PATH_MIN for p in paths), min(p or 0 for p in paths)
    phrases = [generators.passphrase(rng, 40, 400) for _ in range(200)]
    below = [p for p in phrases if (decoder_path(p) or 0) < DECODER_PATH_MIN]
    assert len(below) >= 0.7 * len(phrases)


def test_widened_text_counts_nul_as_padding() -> None:
    """In the UTF-16 view, ``00`` (add r/m8, r8, venetian padding) continues a path without
    counting; other non-printable bytes void the bound."""
    # push; add [eax+0], dl (00 50 00: the next push is its ModRM); push; ...: every other one
    assert decoder_path(b"P\x00" * 8, widened=True) == 4
    assert decoder_path(b"P\x00P\x00\xcd\x80", widened=True) is None
    assert decoder_path(b"P\x00P\x00") is None  # plain text may not hold NULs


def test_printable_and_utf8_text_is_never_a_sled() -> None:
    """The sled check needs a quarter of non-text bytes: text is skipped without decoding it."""
    rng = random.Random(42)
    for _ in range(50):
        text = bytes(rng.choice(range(0x20, 0x7F)) for _ in range(300))
        assert find_sled(text) is None
    assert find_sled("Grüße aus Köln, ".encode() * 10) is None
    assert find_sled(b"\x90" * 60) == 0


def test_setup_runs_count_set_up_instructions_falling_through() -> None:
    """push, pop, sub eax imm32 x3, push, pop: seven; a jump, a comparison or a prefix ends a run."""
    stack_builder = b"VX-AAAA-BBBB-CCCCPY"
    assert setup_runs(stack_builder)[0] == 7
    assert setup_runs(stack_builder)[2] == 5  # from the first sub
    assert setup_runs(b"VXt PY")[:3] == [2, 1, 0]  # je: the run ends
    assert setup_runs(b"VX9 PY")[0] == 2  # cmp
    assert setup_runs(b"VX\xcd\x80") is None
