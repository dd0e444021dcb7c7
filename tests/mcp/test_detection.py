"""Detection and false-positive goals, asserted on the generated and the real corpus.

Two numbers per category:

* ``analyze`` - the server's verdict for the argument in the field it arrives in (``USER`` /
  ``PASS``): tier 0 (binary bytes in a text field are an exploit sign) then tier 1;
* ``deep_check`` - behaviour alone (tier 1), i.e. what protects fields where binary is
  legitimate (decoded SASL data) and printable payloads.  This is the harder number.
"""

from __future__ import annotations

import random

import generators
import realcorpus

from pop3shield.mcp import analyze, deep_check

GOAL = 0.95

#: honest thresholds for the real corpus, a few points under the measured rates (see
#: bench/mcp-results.md) so that a loaded machine cannot make them flaky; why they are under
#: 95 % is explained there and in the comments
REAL_DEEP = {
    # unfinished fragments (a decoder stub without its payload, a tail without its stub) and
    # shellcode that needs its exploit's register state; measured ~0.95
    "real:shellcode-unix-x86": 0.93,
    # calls to hard-coded API addresses with numeric arguments only (Beep), SEH/kernel tricks;
    # measured ~0.92
    "real:shellcode-windows-x86": 0.89,
    # egg hunters (scan memory, no system call until they find the egg), fragments; ~0.93
    "real:shellcode-x86-64": 0.91,
    # blobs cut out of exploit sources: about a third of random data passes the x86 scope
    # filter, so encrypted payload bodies without their decoder, protocol fields and strings
    # remain in this category and are not code at all; measured ~0.86
    "real:exploit-binary": 0.83,
    # decoder stubs cut off from their payload (0-9 decoded bytes: no loop to see), and
    # blobs tier 0 refuses anyway (a GetPC'd ALPHA2 stub whose "payload" is the encoder's
    # banner text, an HTTP request); measured ~0.917-0.925 (110-111/120) under the work-unit budget
    "real:exploit-alnum": 0.89,
}
#: real:exploit-alnum in USER/PASS: measured 0.942 (113/120); the misses are the decoder
#: stubs cut off from their payload (see bench/mcp-results.md)
REAL_ANALYZE = {name: GOAL for name in REAL_DEEP} | {"real:exploit-alnum": 0.93}


def rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def test_generated_attacks_are_detected_by_behaviour(attacks: dict[str, list[bytes]], emulation: None) -> None:
    rates = {name: rate([deep_check(a).malicious for a in items]) for name, items in attacks.items()}
    assert all(value >= GOAL for value in rates.values()), rates


def test_generated_attacks_are_detected_in_their_field(attacks: dict[str, list[bytes]], emulation: None) -> None:
    rates = {}
    for name, items in attacks.items():
        field = generators.ATTACKS[name][1]
        rates[name] = rate([analyze(a, field).malicious for a in items])
    assert all(value >= GOAL for value in rates.values()), rates


def test_no_false_positive_on_benign_arguments(benign: dict[str, list[tuple[bytes, str]]], emulation: None) -> None:
    flagged = [(name, argument, analyze(argument, field)) for name, items in benign.items() for argument, field in items]
    false_positives = [(name, argument[:60], verdict.reasons) for name, argument, verdict in flagged if verdict.malicious]
    assert len(flagged) >= 5000
    assert false_positives == []
    assert not any("analysis-error" in verdict.reasons for _, _, verdict in flagged)


def test_benign_binary_sasl_tokens_are_judged_by_behaviour(benign: dict[str, list[tuple[bytes, str]]], emulation: None) -> None:
    """NTLM and Kerberos tokens are binary and legitimate: tier 1 must clear them."""
    binary = [a for a, f in benign["sasl-decoded"] if f == "sasl" and not a.isascii()]
    assert len(binary) >= 50
    assert not any(deep_check(a).malicious for a in binary)


def test_real_corpus_in_scope_detection(real_entries: list[realcorpus.Entry], emulation: None) -> None:
    rates = {}
    for name, items in realcorpus.categories(real_entries):
        rates[name] = (rate([deep_check(e.data).malicious for e in items]),
                       rate([analyze(e.data, "password").malicious for e in items]))
    assert set(rates) == set(REAL_DEEP)
    for name, (deep, field) in rates.items():
        assert deep >= REAL_DEEP[name], (name, deep)
        assert field >= REAL_ANALYZE[name], (name, field)


def test_real_corpus_scope_filter_keeps_most_platform_x86_code(real_entries: list[realcorpus.Entry]) -> None:
    """The scope filter must not quietly drop the shellcodes filed under x86 platforms."""
    labelled = [e for e in real_entries if e.source == "shellcodes" and realcorpus._X86_PLATFORM.search(e.group)]
    kept = [e for e in labelled if e.scope == "in"]
    assert len(labelled) >= 700 and len(kept) >= 0.97 * len(labelled)
    other = [e for e in real_entries if e.scope != "in"]
    assert {e.scope for e in other} <= {"too-short", "text", "structured-data", "bad-char-table", "not-x86", "data-only", "other-arch"}


#: public ALPHA2 (mixed case, ecx base) decoder stub as found in exploits, without its payload
ALPHA2_STUB = b"IIIIIIIIIIIIIIIII7QZjAXP0A0AkAAQ2AB2BB0BBABXP8ABuJI"
#: the printable SEH GetPC prologue (``d36`` reads the exception chain) that precedes it
SEH_PROLOGUE = b"VTX630VXH49HHHPhYAAQhZYYYYAAQQDDDd36FFFFTXVj0PPTUPPa301089"


def test_decoder_stubs_are_detected_without_their_payload(emulation: None) -> None:
    """A stub cut off from its payload decodes whatever follows it (few distinct values): a
    transforming store rewriting the bytes ahead of itself is the tell.  Behind a text banner
    its register set-up is an entry point; behind the SEH prologue the fs:[0] read is one."""
    assert deep_check(ALPHA2_STUB).reasons[0].startswith("x86-decoder-loop@")
    banner = b"Exploited by somebody with a long banner. " + ALPHA2_STUB
    assert deep_check(banner).malicious
    assert deep_check(SEH_PROLOGUE + ALPHA2_STUB).reasons[0].startswith("x86-seh-read@")
    # and the same text without the decoder is clean
    assert not deep_check(b"Exploited by somebody with a long banner. Nothing follows it here.").malicious


def test_random_binary_filling_memory_ahead_is_not_a_stub_decoder(emulation: None) -> None:
    """Binary SASL data loops all the time; a binary store filling the bytes ahead of it (here
    ``and byte [edi], 0`` in a loop, after running a byte it patched) is not the printable stub's
    tell.  A decoded token of the benign corpus did exactly that."""
    rng = random.Random(43)
    patch = b"\xc6\x47\x08\x90" + b"\x90" * 4 + b"\xcc"  # mov byte [edi+8], nop; ...; int3 -> nop
    setup = b"\x83\xc7\x40\xb9\x00\x01\x00\x00"  # add edi, 0x40 (ahead of the loop); mov ecx, 256
    loop = b"\x80\x27\x00\x47\xe2\xfa"  # and byte [edi], 0; inc edi; loop -6
    filler = [rng.randbytes(rng.randint(200, 300)) for _ in range(10)]
    verdicts = [deep_check(patch + setup + loop + data) for data in filler]
    assert not any(verdict.reasons[0].startswith("x86-decoder-loop") for verdict in verdicts), verdicts
