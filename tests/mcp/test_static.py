"""Static checks: sleds and sprayed return addresses, without an emulator."""

from __future__ import annotations

import random

import generators

from pop3shield.mcp.static import SLED_MIN, find_return_spray, find_sled, sled_length, static_reasons


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
