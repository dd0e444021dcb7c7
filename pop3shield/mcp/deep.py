"""Tier 1: static checks, then emulation from many start offsets, under hard budgets.

Every run ends: unicorn caps the instructions of one start offset, hook callbacks are capped
per run and per argument, the number of runs is capped per argument, and a wall-clock
deadline is checked between runs.  A clean verdict that ran out of budget says so in its
reasons (``budget-exhausted``) so that operators can see it.

Start offsets are tried in order: the preferred entry points of a window first (offset 0,
the end of filler or sleds, after sprayed return addresses), each with pointer-seeded and
with cleared registers; then every other offset that no earlier run has already executed.
The two modes alternate so that x86-64 code is found as early as x86 code.
"""

from __future__ import annotations

import time

from . import emulate
from .static import static_reasons
from .verdict import Verdict, clean, malicious
from .windows import Window, plan

#: wall-clock budget for the emulation of one argument (the whole check stays under 50 ms)
DEADLINE = 0.030
#: most runs (start offsets times modes) per argument
MAX_RUNS = 4000
#: most hook callbacks per argument, summed over its runs
MAX_CALLBACKS = 60_000
#: entry points (offset 0, after filler or a sled) may run long decoders to the end
ENTRY_CALLBACKS = 12_000
ENTRY_SECONDS = 0.012


class Budget:
    """What one argument may still spend."""

    def __init__(self, seconds: float = DEADLINE) -> None:
        self.deadline = time.perf_counter() + seconds
        self.runs = MAX_RUNS
        self.callbacks = MAX_CALLBACKS
        self.exhausted = False

    def spend(self, state: emulate.RunState) -> bool:
        """Charge one run; False once anything is used up."""
        self.runs -= 1
        self.callbacks -= state.callbacks
        if self.runs <= 0 or self.callbacks <= 0 or time.perf_counter() > self.deadline:
            self.exhausted = True
        return not self.exhausted


def deep_check(argument: bytes) -> Verdict:
    """Tier 1 verdict for one argument; thread-safe (each thread has its own emulators)."""
    if not argument:
        return clean("empty")
    windows = plan(argument)
    reasons = [reason for window in windows for reason in _static(window)]
    if reasons:
        return malicious(*reasons)
    if not emulate.AVAILABLE:
        return clean("no-static-finding", "emulation-unavailable")
    budget = Budget()
    for window in windows:
        finding = _emulate(window, budget)
        if finding:
            return malicious(finding)
        if budget.exhausted:
            return clean("no-code-behaviour", "budget-exhausted")
    return clean("no-code-behaviour")


def _static(window: Window) -> list[str]:
    """Static reasons with offsets mapped back into the argument."""
    found = []
    for reason in static_reasons(window.data):
        name, _, offset = reason.partition("@")
        found.append(f"{name}@{window.position(int(offset))}")
    return found


def _emulate(window: Window, budget: Budget) -> str | None:
    """The first behaviour found in ``window``, as ``kind@offset``, or ``None``.

    Entry points come first, every seeding tried in both modes before the next seeding, so
    that neither mode can spend the budget alone; then the sweep over all offsets.
    """
    engines = emulate.engines()
    for engine in engines:
        engine.load(window.data)
    for offset in window.entries:
        finding = _entry(engines, offset, window, budget)
        if finding or budget.exhausted:
            return finding
    printable = _mostly_printable(window.data)
    for offset in range(len(window.data)):
        for engine in engines:
            finding = _sweep(engine, offset, printable, window, budget)
            if finding or budget.exhausted:
                return finding
    return None


def _entry(engines: tuple[emulate.Engine, ...], offset: int, window: Window, budget: Budget) -> str | None:
    """All seedings at one entry point: pointer, stack at the code (if the pointer run used the
    stack at all: only then can it behave differently), scratch, cleared."""
    used_stack = {}
    for seeding in (emulate.POINTER, emulate.STACK_AT_CODE, emulate.SCRATCH, emulate.ZERO):
        for engine in engines:
            if seeding == emulate.STACK_AT_CODE and not used_stack[engine.bits]:
                continue
            finding = _run(engine, offset, seeding, window, budget, entry=True)
            if finding or budget.exhausted:
                return finding
            if seeding == emulate.POINTER:
                used_stack[engine.bits] = engine.state.stack_used
    return None


def _sweep(engine: emulate.Engine, offset: int, printable: bool, window: Window, budget: Budget) -> str | None:
    """Runs from one offset after the entry points.

    Binary windows skip offsets an earlier run already executed.  Printable windows do not:
    printable decoders compute addresses from the register that pointed at their first byte,
    so a run that slid into the decoder from the text before it proves nothing; they are run
    from every offset (x86-64 printable decoders are rare, so the 64-bit engine keeps pruning).
    """
    if not printable or engine.bits == 64:
        if engine.covered[offset]:
            return None
        return _run(engine, offset, emulate.POINTER, window, budget)
    return _seedings(engine, offset, window, budget)


def _seedings(engine: emulate.Engine, offset: int, window: Window, budget: Budget) -> str | None:
    """Pointer seeding, then the stack at the code if the run used the stack at all."""
    finding = _run(engine, offset, emulate.POINTER, window, budget)
    if finding or budget.exhausted or not engine.state.stack_used:
        return finding
    return _run(engine, offset, emulate.STACK_AT_CODE, window, budget)


def _mostly_printable(data: bytes) -> bool:
    return sum(1 for b in data if 0x20 <= b < 0x7F) >= 0.9 * len(data)


def _run(engine: emulate.Engine, offset: int, seeding: str, window: Window, budget: Budget, entry: bool = False) -> str | None:
    if entry:
        state = engine.run(offset, seeding, budget.deadline, callbacks=ENTRY_CALLBACKS, seconds=ENTRY_SECONDS)
    else:
        state = engine.run(offset, seeding, budget.deadline)
    budget.spend(state)
    if state.finding:
        return f"{state.finding}@{window.position(offset)}"
    return None
