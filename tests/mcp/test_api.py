"""The package's contract: API, cache, thread safety, budgets, and life without unicorn."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import generators
import pytest

from pop3shield import mcp
from pop3shield.mcp import Verdict, analyze, deep_check, quick_check
from pop3shield.mcp.cache import VerdictCache

REPO = Path(__file__).resolve().parents[2]
EXECVE = bytes.fromhex("31c050682f2f7368682f62696e89e35089e25389e1b00bcd80")


def test_verdict_is_frozen_with_string_reasons() -> None:
    verdict = Verdict(True, ("x86-syscall@0",))
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.malicious = False  # type: ignore[misc]
    assert isinstance(quick_check(b"alice"), Verdict)


def test_analyze_chains_the_tiers_and_caches_tier1(emulation: None) -> None:
    assert analyze(b"alice", "username") == quick_check(b"alice", "username")
    assert analyze(EXECVE, "password").reasons == ("binary-in-text-field",)
    first = analyze(EXECVE, "sasl")
    assert first.malicious and first.reasons[0].startswith("x86-syscall@")
    hits = mcp.cache.hits
    assert analyze(EXECVE, "sasl") == first
    assert mcp.cache.hits == hits + 1
    assert mcp.deep_check_cached(EXECVE) == first


def test_cache_is_a_bounded_lru() -> None:
    cache = VerdictCache(capacity=3)
    for i in range(5):
        cache.put(bytes([i]), Verdict(False, (str(i),)))
    assert len(cache) == 3
    assert cache.get(b"\x00") is None and cache.get(b"\x04") is not None
    cache.get(b"\x02")  # most recently used now
    cache.put(b"\x05", Verdict(False, ()))
    assert cache.get(b"\x03") is None and cache.get(b"\x02") is not None


def test_a_flood_of_new_arguments_does_not_evict_verdicts_asked_for_again() -> None:
    """A user's passphrase, analysed at one login and asked for at the next, stays cached
    while a flood of distinct long arguments passes through (segmented LRU)."""
    cache = VerdictCache(capacity=100)
    honest = [b"maple.river%d.stone.quiet" % i for i in range(20)]
    for argument in honest:
        cache.put(argument, Verdict(False, ("honest",)))
        assert cache.get(argument) is not None  # the next login
    for i in range(10_000):
        cache.put(b"flood %d" % i, Verdict(True, ("flood",)))
    assert len(cache) == 100
    assert all(cache.get(argument) == Verdict(False, ("honest",)) for argument in honest)
    assert cache.get(b"flood 0") is None and cache.get(b"flood 9999") is not None


def test_cache_keys_are_keyed_digests() -> None:
    """What the cache holds is no plain hash of a password: each cache has its own key."""
    one, two = VerdictCache(), VerdictCache()
    assert len(one.key(b"hunter2")) == 16
    assert one.key(b"hunter2") == one.key(b"hunter2") != two.key(b"hunter2")


def test_prepared_engines_serve_analyses_in_any_thread(emulation: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """``prepare`` creates the emulators before the first argument; an analysis in a thread
    that never made one leases a prepared pair instead of creating its own."""
    from pop3shield.mcp import emulate

    monkeypatch.setattr(emulate, "_spare", [])
    assert mcp.prepare(2) == 2 and mcp.prepare(2) == 0
    prepared = list(emulate._spare)
    created = []
    original = emulate.Engine.__init__

    def counting(self: emulate.Engine, bits: int) -> None:
        created.append(bits)
        original(self, bits)

    monkeypatch.setattr(emulate.Engine, "__init__", counting)
    argument = generators.gen_alnum(random.Random(37))
    with ThreadPoolExecutor(max_workers=2) as pool:
        verdicts = list(pool.map(deep_check, [argument] * 4))
    assert all(verdict.malicious for verdict in verdicts)
    assert created == []
    assert sorted(map(id, emulate._spare)) == sorted(map(id, prepared))


def test_every_analysis_starts_with_an_empty_translation_buffer(emulation: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """unicorn's code buffer only fills up; overflowing in the middle of a run stalls it for
    tens of milliseconds no work unit counts, so each analysis empties it first (all engines)."""
    from pop3shield.mcp import emulate

    flushed = []
    original = emulate.Engine.flush_translations

    def counting(self: emulate.Engine) -> None:
        flushed.append(self)
        original(self)

    monkeypatch.setattr(emulate.Engine, "flush_translations", counting)
    argument = generators.gen_alnum(random.Random(38))
    with emulate.leased() as engines:
        pass
    assert deep_check(argument).malicious
    assert len(flushed) == 3 and len(set(map(id, flushed))) == 3
    assert engines[0].uc.ctl_get_tcg_buffer_size() == emulate.TCG_BUFFER


def test_cache_survives_concurrent_use() -> None:
    cache = VerdictCache(capacity=64)

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(3000):
            key = bytes([rng.randrange(200)])
            if cache.get(key) is None:
                cache.put(key, Verdict(False, (str(key[0]),)))

    threads = [threading.Thread(target=hammer, args=(s,)) for s in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) == 64
    assert all(cache.get(k) in (None, Verdict(False, (str(k[0]),))) for k in (bytes([i]) for i in range(200)))


def _mixed_arguments() -> list[bytes]:
    attacks = generators.attack_corpus(6, seed=31)
    rng = random.Random(32)
    benign = [rng.randbytes(rng.randint(40, 300)) for _ in range(15)]
    benign += [bytes(rng.choice(range(0x21, 0x7F)) for _ in range(rng.randint(40, 120))) for _ in range(15)]
    return [a for items in attacks.values() for a in items] + benign


def test_deep_check_is_thread_safe(emulation: None) -> None:
    """Four threads, one emulator pair each, give the sequential verdicts."""
    arguments = _mixed_arguments()
    sequential = [deep_check(a).malicious for a in arguments]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda a: deep_check(a).malicious, arguments))
    assert concurrent == sequential
    assert sum(sequential) >= 55


def test_emulator_state_does_not_leak_between_arguments(emulation: None) -> None:
    """Stale translated code or CPU mode from an earlier argument must not change a verdict
    (the failure that silently drops detection to zero): same verdicts in any order, and after
    arguments that rewrite their own code."""
    arguments = _mixed_arguments()
    forward = {a: deep_check(a) for a in arguments}
    rng = random.Random(33)
    shuffled = arguments[:]
    rng.shuffle(shuffled)
    for argument in shuffled:
        deep_check(rng.randbytes(200))  # interleave random code that writes everywhere
        assert deep_check(argument).malicious == forward[argument].malicious


def test_oversized_lines_are_analysed_within_budget(emulation: None) -> None:
    rng = random.Random(34)
    payload = generators.xor_fnstenv(rng, generators.windows_peb_winexec(rng))
    huge = b"A" * 9000 + b"\x8f\x35\x4a\x5f" + b"\x90" * 16 + payload + b"C" * 9000
    started = time.perf_counter()
    verdict = deep_check(huge)
    assert verdict.malicious
    noise = bytes(rng.choice(range(0x21, 0x7F)) for _ in range(60_000))
    worst = max(_timed(deep_check, data) for data in (noise, rng.randbytes(8000), huge))
    assert time.perf_counter() - started < 5
    assert worst < 0.25  # generous: the budget is 30 ms, the benchmark shows the real figures


def test_work_unit_budget_ends_every_analysis(emulation: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The argument's budget is counted in work units, and running out of it ends the analysis
    with a clean verdict that says so; a larger budget lets the same argument run longer."""
    from pop3shield.mcp import deep

    rng = random.Random(35)
    noise = rng.randbytes(2000)  # binary: every entry point, seeding and offset is run
    monkeypatch.setattr(deep, "ARGUMENT_UNITS", 2_000)
    small = deep.Budget()
    assert deep._emulate(deep.plan(noise), small) is None and small.exhausted
    assert small.units <= 0 and small.runs > deep.MAX_RUNS - 60
    assert deep_check(noise).reasons == ("no-code-behaviour", "budget-exhausted")
    monkeypatch.setattr(deep, "ARGUMENT_UNITS", 20_000)
    large = deep.Budget()
    deep._emulate(deep.plan(noise), large)
    assert large.exhausted and large.units <= 0
    assert deep.MAX_RUNS - large.runs > 3 * (deep.MAX_RUNS - small.runs)


def _timed(check: object, data: bytes) -> float:
    started = time.perf_counter()
    check(data)  # type: ignore[operator]
    return time.perf_counter() - started


def test_offsets_in_reasons_point_into_the_argument(emulation: None) -> None:
    """Filler is collapsed before emulation; the reason still names the argument offset."""
    verdict = deep_check(b"\xff" * 5000 + b"\x90" * 3 + EXECVE + b"\xff" * 3000)
    assert verdict.malicious
    kind, _, offset = verdict.reasons[0].partition("@")
    assert kind == "x86-syscall" and 5000 <= int(offset) <= 5003


def test_without_unicorn_the_package_still_works() -> None:
    """unicorn is an optional GPL extra: import, tier 0 and static checks must work without it
    (and without iced-x86, which the package does not need), and Twisted is never imported."""
    script = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("unicorn", "iced_x86"):
                    raise ImportError(name)
        sys.meta_path.insert(0, Block())
        from pop3shield.mcp import analyze, deep_check, quick_check, emulation_available
        assert emulation_available is False
        assert quick_check(b"alice", "username").malicious is False
        assert analyze(b"\\x90\\x31\\xc0", "password").reasons == ("binary-in-text-field",)
        sled = deep_check(b"\\x90" * 100 + b"\\xcc")
        assert sled.malicious and sled.reasons[0].startswith("x86-nop-sled@"), sled
        plain = deep_check(bytes.fromhex("31c050682f2f7368682f62696e89e35089e25389e1b00bcd80"))
        assert not plain.malicious and "emulation-unavailable" in plain.reasons, plain
        assert "twisted" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_shifted_seeding_points_registers_and_stack_before_the_start(emulation: None) -> None:
    """``shift``: the exploit's register points a few bytes before the code that uses it."""
    from pop3shield.mcp import emulate
    from unicorn.x86_const import UC_X86_REG_EAX, UC_X86_REG_ECX

    engine = emulate.engines()[0]
    engine.load(b"\x58\x0f\x0b")  # pop eax; ud2
    engine.run(0, emulate.POINTER, shift=17)
    assert engine.uc.reg_read(UC_X86_REG_ECX) == emulate.LOAD - 17
    assert engine.uc.reg_read(UC_X86_REG_EAX) == emulate.LOAD - 17
    engine.run(0, emulate.POINTER)
    assert engine.uc.reg_read(UC_X86_REG_EAX) == emulate.LOAD


def _budget_bound_arguments() -> list[bytes]:
    """Arguments whose verdict is decided at the edge of the budget: slow decoders (printable
    families, alphanumeric loops), honest long text that spends the whole budget, and binary."""
    rng = random.Random(36)
    arguments = [generators.gen_printable_family(rng) for _ in range(8)]
    arguments += [generators.gen_alnum(rng) for _ in range(3)]
    arguments += [generators.passphrase(rng, 200, 1500) for _ in range(4)]
    arguments += [bytes(rng.choice(range(0x21, 0x7F)) for _ in range(600)) for _ in range(3)]
    arguments += [rng.randbytes(400) for _ in range(2)] + [rng.randbytes(2000)]
    # a 1,000-byte in-place decoder two bytes into the argument, its register pointing at it:
    # it rewrites the code it is about to run ~100 times, and runs out of budget
    arguments.append(b"AB" + generators.printable_inplace_bytes(rng, generators.linux_bind_shell(rng), generators.EDX))
    return arguments


def test_verdicts_do_not_depend_on_machine_load(emulation: None) -> None:
    """The same arguments get the same verdicts, reasons included (offsets, budget-exhausted),
    on a quiet machine and with the other core busy: the budget counts work, not time."""
    arguments = _budget_bound_arguments()
    quiet = [deep_check(argument) for argument in arguments]
    assert any("budget-exhausted" in verdict.reasons for verdict in quiet)  # the edge is exercised
    assert sum(verdict.malicious for verdict in quiet) >= 8
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.2)
        busy = [deep_check(argument) for argument in arguments]
        # and with a second analysis thread competing for the same cores and caches
        with ThreadPoolExecutor(max_workers=2) as pool:
            threaded = list(pool.map(deep_check, arguments + arguments))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait(timeout=10)
    assert busy == quiet
    assert threaded == quiet + quiet
