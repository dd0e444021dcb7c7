"""Tier 1: static checks, then emulation from many start offsets, under hard budgets.

Every run ends: unicorn caps the instructions of one start offset, hook callbacks are capped
per run and per argument, the number of runs is capped per argument, and every run and every
argument has a budget of work units (:data:`emulate.RUN_UNITS_FIXED`: counted from the runs,
blocks, translated bytes, stores and loads the emulation made, checked on every hook
callback).  No clock is read: the same argument gets the same verdict however busy the
machine is.  :data:`ARGUMENT_UNITS` (about 20-27 ms of CPU on a quiet machine of the
development kind) is what the slowest decoders need: the UTF-16 "venetian" ones of the real
corpus are recognised at 25,700-28,200 units; what a unit costs on a busy machine is in
``bench/mcp-results.md``.  A clean verdict that ran out of budget says so in its reasons
(``budget-exhausted``) so that operators can see it.

Start offsets are tried in phases.  First the entry points of every window (offset 0, the
start and end of filler or a sled, after sprayed return addresses, printable/binary
boundaries) with every register seeding, both modes alternating so that neither can spend
the budget alone; these runs may run long decoders to the end.  In a printable argument
offset 0 of every window (including the UTF-16 view) comes first, then the other entry
points as 32-bit code with the pointer seedings, then the ends of landing pads
(:func:`windows.landing_points`) and then the base register pointing a few bytes before the
entry (:func:`_shifted`), each of these two phases with a slice of the budget
(:data:`LANDING_PHASE_UNITS`, :data:`SHIFT_PHASE_UNITS`), then the rest.  Last a sweep over
every other offset: binary windows skip offsets an earlier run already executed, printable
windows do not but stop after :data:`PRINTABLE_SWEEP_UNITS` (see :func:`_sweep`).

Windows of printable bytes only are screened first (:func:`static.decoder_paths`): printable
code has no call, return, system call or backward jump, so a run follows a forward graph of
the window's instructions until it executes a byte it changed, and a decoder executes its
set-up on that graph first.  A window in which no offset starts a path with
:data:`static.DECODER_PATH_MIN` set-up instructions is not emulated at all, and in the others
no run starts at an offset whose path is shorter (:meth:`Window.may_decode`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable

from . import emulate
from .static import DECODER_PATH_MIN, decoder_paths, setup_runs, static_reasons
from .verdict import Verdict, clean, malicious
from .windows import Window, plan

#: work units (about microseconds on a quiet machine) for the emulation of one argument
ARGUMENT_UNITS = 30_000
#: what planning the windows and loading them costs, charged up front
ARGUMENT_UNITS_FIXED = 300
#: most runs (start offsets times modes) per argument
MAX_RUNS = 4000
#: most hook callbacks per argument, summed over its runs
MAX_CALLBACKS = 60_000
#: entry points may run long decoders to the end; the first run at offset 0 of each window
#: (the most likely entry; the UTF-16 view's "venetian" decoders need ~9 ms) gets more time:
#: a self-modifying decoder makes unicorn retranslate its code on every iteration and needs
#: ~50 us per iteration
ENTRY_CALLBACKS = 12_000
ENTRY_UNITS = 16_000
FIRST_UNITS = 30_000

#: most units the sweep over every offset of a printable window may spend.  Printable
#: decoders start where the exploit's register points: offset 0, the end of filler or of a
#: landing pad, a few bytes after the register (all tried before the sweep); in the generated
#: and the real corpus the printable sweep found nothing those runs had not.  In a window of
#: printable bytes only it tries the offsets with the longest decoder paths first
#: (:func:`static.decoder_paths`) and none whose path is too short for a decoder
PRINTABLE_SWEEP_UNITS = 800
#: shortest decoder path of an offset the printable sweep runs: twice the screen's threshold
#: (the generated and real printable decoders have 26 or more set-up instructions on theirs)
SWEEP_PATH_MIN = 2 * DECODER_PATH_MIN
#: base-register shifts tried at the entry points of printable windows: an exploit may point
#: the register a printable decoder addresses its patches through at its buffer, a few bytes
#: before the decoder (see ``shift`` in :meth:`emulate.Engine.run`)
SHIFTS = range(1, 25)
#: units of one shifted run: a decoder with the right base register is recognised early (its
#: loop decodes ahead of itself), and there are up to 24 of them per entry point
SHIFTED_UNITS = 6_000
#: slices of the argument's budget for the landing-pad runs and the shifted runs: both try
#: many start states of which at most one is right, and must not starve the phases after them
LANDING_PHASE_UNITS = 12_000
SHIFT_PHASE_UNITS = 8_000
#: entry points per printable window whose pointer run patched code get the shifted runs
SHIFT_ENTRIES = 4

_SEEDINGS = (emulate.POINTER, emulate.STACK_AT_CODE, emulate.SCRATCH, emulate.ZERO)
#: the seedings printable code can use (see :func:`_emulate`)
_TEXT_SEEDINGS = _SEEDINGS[:2]
_log = logging.getLogger(__name__)


class Budget:
    """What one argument may still spend."""

    def __init__(self, units: int | None = None) -> None:
        self.units = (ARGUMENT_UNITS if units is None else units) - ARGUMENT_UNITS_FIXED
        self.runs = MAX_RUNS
        self.callbacks = MAX_CALLBACKS
        self.exhausted = False
        #: whether the next run is the first of the UTF-16 view (see FIRST_UNITS)
        self.first = False
        #: units left at which the current phase ends (phases with a slice of the budget)
        self.floor = 0

    @property
    def done(self) -> bool:
        """Out of budget, or the current phase out of its slice."""
        return self.exhausted or self.units <= self.floor

    def slice(self, units: int) -> None:
        """Let the next phase spend at most ``units`` of what is left (:meth:`whole` ends it)."""
        self.floor = max(0, self.units - units)

    def whole(self) -> None:
        self.floor = 0

    def spend(self, state: emulate.RunState) -> None:
        """Charge one run; sets :attr:`exhausted` once anything is used up."""
        self.first = False
        self.runs -= 1
        self.callbacks -= state.callbacks
        self.units -= state.units
        if self.runs <= 0 or self.callbacks <= 0 or self.units <= 0:
            self.exhausted = True


def deep_check(argument: bytes) -> Verdict:
    """Tier 1 verdict for one argument; thread-safe (each thread has its own emulators)."""
    if not argument:
        return clean("empty")
    windows = plan(argument)
    reasons = [reason for window in windows if window.sweep for reason in _static(window)]
    if reasons:
        return malicious(*reasons)
    if not emulate.AVAILABLE:
        return clean("no-static-finding", "emulation-unavailable")
    # text with no path a decoder could take is not emulated
    emulated = [screened for screened in map(_screen, windows) if screened is not None]
    if not emulated:
        return clean("no-code-behaviour", "no-decoder-path")
    budget = Budget()
    try:
        with emulate.leased() as pair:
            finding = _emulate(emulated, budget, pair)
    except Exception as exc:  # a bug in a hook must not take the server's analysis thread down
        # the type and place only: an exception's text (or a traceback's) may quote the argument,
        # and arguments are passwords too; stdlib logging reaches the server log via logsetup
        _log.error("emulation of a %d-byte argument failed: %s at %s", len(argument), type(exc).__name__,
                   _where(exc))
        return clean("no-static-finding", "analysis-error")
    if finding:
        return malicious(finding)
    if budget.exhausted:
        return clean("no-code-behaviour", "budget-exhausted")
    return clean("no-code-behaviour")


def _screen(window: Window) -> Window | None:
    """A window of printable bytes only (or the UTF-16 view of such text), with its decoder
    paths (runs from offsets with a short path are not made), or ``None`` if no run of it could execute
    :data:`static.DECODER_PATH_MIN` set-up instructions before running a byte it changed."""
    paths = decoder_paths(window.data, widened=bool(window.label))  # the UTF-16 view: widened
    if paths is None:
        return window
    if max(paths, default=0) < DECODER_PATH_MIN:
        return None
    return dataclasses.replace(window, paths=tuple(paths))


def _where(exc: BaseException) -> str:
    """``file:line in function`` of the innermost frame of an exception."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?"
    code = tb.tb_frame.f_code
    return f"{code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno} in {code.co_name}"


def _static(window: Window) -> list[str]:
    """Static reasons with offsets mapped back into the argument."""
    found = []
    for reason in static_reasons(window.data):
        name, _, offset = reason.partition("@")
        found.append(f"{name}@{window.position(int(offset))}")
    return found


def _emulate(windows: list[Window], budget: Budget, pair: emulate.Engines | None = None) -> str | None:
    """The first behaviour found, as ``kind@offset``, or ``None``.

    An argument with binary code: every entry point of every window in turn, with every
    seeding in both modes.  A printable one: offset 0 of every window first (the UTF-16
    view's decoder must not wait for all the other entry points of the plain view), then the other
    entry points; in printable windows first only as 32-bit code with the pointer and
    stack-at-code seedings (what printable decoders are written for), then with the base
    register shifted (:func:`_shifted`), and only then in the remaining modes and seedings.
    Last the sweep over every other offset.
    """
    every = pair if pair is not None else emulate.engines()
    for engine in every:  # coverage left by an earlier argument must not prune this one's runs
        engine.covered = bytearray(engine.length)
        engine.flush_translations()
    # the UTF-16 view runs on its own 32-bit engine: alternating windows on one engine made it
    # translate everything again at every switch
    plain, view = every[:2], (every[2], every[1])
    sets = [view if window.label else plain for window in windows]
    printable = [window.sweep and _mostly_printable(window.data) for window in windows]
    patching: list[list[tuple[int, tuple[int, ...]]]] = [[] for _ in windows]
    done: set[tuple[int, int, int, str]] = set()

    def entries(index: int, offsets: tuple[int, ...], modes: tuple[emulate.Engine, ...], seedings: tuple[str, ...]) -> str | None:
        window = windows[index]
        for offset in offsets:
            finding = _entry(modes, offset, window, budget, patching[index], seedings, done, index)
            if finding or budget.done:
                return finding
        return None

    if not all(printable[index] for index, window in enumerate(windows) if window.sweep):
        # binary code in the argument: its entry points, window after window
        for index, window in enumerate(windows):
            finding = entries(index, window.entries, sets[index], _SEEDINGS)
            if finding or budget.exhausted:
                return finding
    # each window's offset 0 may run a long decoder: first the pointer seeding (only as 32-bit
    # code in the UTF-16 view), then the other seedings.  Text (a printable window, the UTF-16
    # view) gets only the runs printable code can use: it has no system call, call or return
    # instruction of its own, so it must decode or build its code first, and printable
    # decoders are written for a register pointing at them (the pointer seeding) or for
    # ``jmp esp`` (stack at the code); the 64-bit pointer run at offset 0 covers x86-64 ones.
    # Scratch and cleared registers leave such code nothing to address itself by.
    text = [printable[index] or bool(window.label) for index, window in enumerate(windows)]
    for seedings in ((emulate.POINTER,), _SEEDINGS):
        for index, window in enumerate(windows):
            budget.first = bool(window.label)  # the UTF-16 view's slow "venetian" decoders
            engines = sets[index]
            modes = engines[:1] if window.label and len(seedings) == 1 else engines
            if text[index] and len(seedings) > 1:
                finding = entries(index, window.entries[:1], engines[:1], _TEXT_SEEDINGS)
            else:
                finding = entries(index, window.entries[:1], modes, seedings)
            if finding or budget.exhausted:
                return finding
    budget.first = False
    for index, window in enumerate(windows):
        if printable[index]:
            finding = entries(index, window.entries[1:], sets[index][:1], _SEEDINGS[:2])
            if finding or budget.exhausted:
                return finding
    budget.slice(LANDING_PHASE_UNITS)
    for index, window in enumerate(windows):
        # the ends of landing pads in printable code: the exploit's register may point past the
        # pad, at a decoder that only decodes with the register pointing at its own first byte
        if printable[index] and window.landings:
            finding = entries(index, window.landings, sets[index][:1], _SEEDINGS[:2])
            if finding or budget.exhausted:
                return finding
    budget.slice(SHIFT_PHASE_UNITS)
    for index, window in enumerate(windows):
        if printable[index] and patching[index]:
            engines = sets[index]
            _load(engines, window)
            # in printable-only text, the entry points with the longest decoder paths first
            order = sorted(patching[index], key=lambda item: (-window.paths[item[0]], item) if window.paths else (0, item))
            finding = _shifted(engines[0], order[:SHIFT_ENTRIES], window, budget)
            if finding or budget.exhausted:
                return finding
    budget.whole()
    for index, window in enumerate(windows):
        if text[index]:
            continue  # its entry points had the text runs above
        finding = entries(index, window.entries[1:], sets[index], _SEEDINGS)
        if finding or budget.exhausted:
            return finding
    for index, window in enumerate(windows):
        if not window.sweep:
            continue
        _load(sets[index], window)
        finding = _sweep_window(sets[index], window, budget)
        if finding or budget.exhausted:
            return finding
    return None


def _load(engines: tuple[emulate.Engine, ...], window: Window) -> None:
    for engine in engines:
        if engine.window != window.data:
            engine.load(window.data)


def _entry(
    engines: tuple[emulate.Engine, ...],
    offset: int,
    window: Window,
    budget: Budget,
    patching: list[tuple[int, tuple[int, ...]]],
    seedings: tuple[str, ...] = _SEEDINGS,
    done: set[tuple[int, int, int, str]] | None = None,
    index: int = 0,
) -> str | None:
    """The seedings at one entry point, each in the given modes before the next: pointer,
    stack at the code (only if the pointer run used the stack: only then can it behave
    differently), scratch, cleared.  ``patching`` collects the entry points whose 32-bit
    pointer run executed bytes it had patched; ``done`` the runs already made (window index,
    offset, mode, seeding)."""
    if not window.may_decode(offset):
        return None
    used_stack = {}
    for seeding in seedings:
        for engine in engines:
            key = (index, offset, engine.bits, seeding)
            if done is not None and key in done:
                if seeding == emulate.POINTER:
                    used_stack[engine.bits] = (index, offset, engine.bits, "stack") in done
                continue
            if seeding == emulate.STACK_AT_CODE and not used_stack[engine.bits]:
                continue
            _load(engines, window)  # only now: switching windows drops translated code
            finding = _run(engine, offset, seeding, window, budget, entry=True)
            if done is not None:
                done.add(key)
            if finding or budget.done:
                return finding
            if seeding == emulate.POINTER:
                used_stack[engine.bits] = engine.state.stack_used
                if done is not None and engine.state.stack_used:
                    done.add((index, offset, engine.bits, "stack"))
                if engine.bits == 32 and engine.state.ran_patched:
                    shifts = _candidate_shifts(engine.state)
                    if shifts:
                        patching.append((offset, shifts))
    return None


def _candidate_shifts(state: emulate.RunState) -> tuple[int, ...]:
    """The shifts (of :data:`SHIFTS`) that move a byte the run patched onto a byte it executed.

    With its base register ``shift`` bytes too high, a decoder patches the byte ``shift`` bytes
    after the one it means: its loop branch or the code it builds, ahead of the store, which
    the run, unpatched, executed (or ran into) instead.  Other shifts move every patch onto
    bytes the run never reached, or behind the store that made it."""
    ran = state.ran
    sites = state.patch_sites.items()
    return tuple(shift for shift in SHIFTS
                 if any(address - shift in ran and address - shift > store for address, store in sites))


def _likely_first(data: bytes, offset: int, shifts: tuple[int, ...]) -> list[int]:
    """``shifts`` with the length of the run of one repeated byte at ``offset`` (and one more
    or less) first: alphanumeric encoders pad their decoder with as many one-byte
    instructions (``IIII``, ``VVVV``) as its base register points before the decoder body."""
    lead = len(data[offset:]) - len(data[offset:].lstrip(data[offset:offset + 1])) if offset < len(data) else 0
    preferred = [shift for shift in (lead, lead + 1, lead - 1) if shift in shifts]
    return preferred + [shift for shift in shifts if shift not in preferred]


def _shifted(engine: emulate.Engine, offsets: list[tuple[int, tuple[int, ...]]], window: Window, budget: Budget) -> str | None:
    """32-bit pointer runs with the code pointers :data:`SHIFTS` bytes before the entry point.

    Only entry points whose unshifted run patched code are tried: a printable decoder must
    patch its own loop (printable bytes cannot encode a backward jump), and with its base
    register off by a few bytes it patches the wrong bytes and never loops.
    """
    for offset, shifts in offsets:
        if not window.may_decode(offset):
            continue
        for shift in _likely_first(window.data, offset, shifts):
            finding = _run(engine, offset, emulate.POINTER, window, budget, entry=True, shift=shift)
            if finding or budget.done:
                return finding
    return None


def _sweep_window(engines: tuple[emulate.Engine, ...], window: Window, budget: Budget) -> str | None:
    """Every other offset; in a printable window only as far as :data:`PRINTABLE_SWEEP_UNITS`
    take it (see :func:`_sweep`)."""
    printable = _mostly_printable(window.data)
    stop = budget.units - PRINTABLE_SWEEP_UNITS if printable else None
    offsets: Iterable[int] = range(len(window.data))
    paths = window.paths
    if paths is not None:
        # printable only, as 32-bit code (the 64-bit pointer run at offset 0 covers x86-64):
        # the offsets that start the longest runs of set-up instructions first (a printable
        # decoder begins with one: ``VX-b[])-4GCD-R("N-`` is push, pop, sub, sub, sub, ...;
        # text after which it was put may add a few), then those with the longest decoder
        # paths, none whose path is shorter than SWEEP_PATH_MIN
        runs = setup_runs(window.data) or [0] * len(window.data)
        offsets = sorted((o for o in offsets if paths[o] >= SWEEP_PATH_MIN), key=lambda o: (-runs[o], -paths[o], o))
        engines = engines[:1]
    for offset in offsets:
        for engine in engines:
            finding = _sweep(engine, offset, printable, window, budget)
            if finding or budget.exhausted:
                return finding
        if stop is not None and budget.units <= stop:
            return None
    return None


def _sweep(engine: emulate.Engine, offset: int, printable: bool, window: Window, budget: Budget) -> str | None:
    """Runs from one offset after the entry points.

    Binary windows skip offsets an earlier run already executed.  Printable windows do not:
    printable decoders compute addresses from the register that pointed at their first byte,
    so a run that slid into the decoder from the text before it proves nothing; they are run
    from every offset (x86-64 printable decoders are rare, so the 64-bit engine keeps pruning).
    Only the pointer seeding is swept: the others found nothing more off the entry points in
    the real corpus and cost a third of the time of a printable argument.
    """
    if (not printable or engine.bits == 64) and engine.covered[offset] or not window.may_decode(offset):
        return None
    return _run(engine, offset, emulate.POINTER, window, budget)


_PRINTABLE_BYTES = bytes(range(0x20, 0x7F))


def _mostly_printable(data: bytes) -> bool:
    return len(data) - len(data.translate(None, _PRINTABLE_BYTES)) >= 0.9 * len(data)


def _run(engine: emulate.Engine, offset: int, seeding: str, window: Window, budget: Budget, entry: bool = False, shift: int = 0) -> str | None:
    if entry:
        units = FIRST_UNITS if budget.first else SHIFTED_UNITS if shift else ENTRY_UNITS
        state = engine.run(offset, seeding, budget.units - budget.floor, callbacks=ENTRY_CALLBACKS, units=units, shift=shift)
    else:
        state = engine.run(offset, seeding, budget.units - budget.floor)
    budget.spend(state)
    if state.finding:
        return f"{state.finding}@{window.position(offset)}{window.label}"
    return None
