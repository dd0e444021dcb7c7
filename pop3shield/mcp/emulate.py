"""Tier 1 behaviour: run the argument as x86 / x86-64 code in unicorn and watch what it does.

Nothing here matches byte patterns.  The argument is mapped into an otherwise empty address
space, the general registers and the stack slots around the stack pointer are seeded with a
pointer to the start offset (what ``jmp esp`` or ``call reg`` leaves an exploit with), and the
code runs until it faults, stops or exhausts its budget.  These behaviours give it away:

* a self-modifying decoder: one store instruction, looping, transforms bytes it read and the
  code then runs what it wrote (``decoder-loop``), or is still decoding ahead of itself when
  the run's budget ends (long payloads; decoders whose base register is set elsewhere);
* GetPC: a ``call`` whose return address is popped instead of returned to, or ``fnstenv``
  whose saved FPU instruction pointer is read back, followed by reads of its own payload;
* a system call (``int 0x80``, ``int 0x2e``, ``syscall``, ``sysenter``, ``lcall 7,0``, the
  WOW64 gate) that the code set up itself: a small call number (the seeds are large pointers),
  or ``mov al, n`` plus an argument pointing at data it built (a pushed ``/bin//sh``);
* Windows PEB access: a word load of the TEB's PEB pointer (``fs:[0x30]``, ``gs:[0x60]``),
  or, for kernel shellcode, of the KPCR's current thread (``fs:[0x124]``, ``gs:[0x188]``);
* a ``call reg`` (or ``push imm32; ret``) to a hard-coded address outside the argument (an API
  entry point in a system DLL) whose arguments point at data the code built;
* an exception handler installed through ``fs:[0]`` (SEH egg hunters and GetPC).

Registers can be seeded four ways (pointer to the code, stack at the code as after ``jmp esp``,
pointing at scratch memory, cleared); see :meth:`Engine.run`.

Unicorn keeps hidden state between runs, which silently hides everything after the first
argument: translated blocks survive host memory writes (so the cache is dropped whenever
memory is restored) and CPU mode and segment state persist (so a clean context saved after
set-up is restored before every run).  Loading ``fs`` for the TEB even recomputes the stack
size from a reset-time 16-bit ``ss`` descriptor; flat 32-bit segments are loaded first.

Hook callbacks run Python for every block, store and load in the watched ranges, so every
run is bounded by an instruction cap, a callback cap and a cap in work units (counted from
what it executed, stored and loaded, never from a clock: see :data:`RUN_UNITS_FIXED`).  Stores into the
code also make unicorn retranslate it (~50 us per decoder iteration), so long decoders are
the expensive case.  The module imports without unicorn; :data:`AVAILABLE` then is ``False``.
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
import threading
from collections.abc import Iterator

try:  # unicorn is the optional GPL-2.0 extra ``pop3shield[emulation]``
    from unicorn import (
        UC_ARCH_X86,
        UC_HOOK_BLOCK,
        UC_HOOK_INSN,
        UC_HOOK_INTR,
        UC_HOOK_MEM_FETCH_UNMAPPED,
        UC_HOOK_MEM_READ,
        UC_HOOK_MEM_READ_UNMAPPED,
        UC_HOOK_MEM_WRITE_UNMAPPED,
        UC_HOOK_MEM_WRITE,
        UC_MODE_32,
        UC_MODE_64,
        Uc,
        UcError,
    )
    from unicorn import x86_const as X86

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only without the extra
    AVAILABLE = False

#: the argument's region; its two high address bytes are ``0f 0f`` (an invalid instruction),
#: so that a pushed code pointer that execution runs into (the stack sits in the code after
#: ``jmp esp``) stops instead of decoding as ``inc eax; add [eax], al`` and turning random
#: bytes into loops; and the address is positive, as user-mode code pointers are (shellcode
#: clears edx with ``cdq`` after loading a pointer into eax)
CODE_BASE = 0x0F0F0000
CODE_SIZE = 0x00010000
#: where a window is loaded; the room before it lets decoders address bytes behind themselves
LOAD = CODE_BASE + 0x4000
#: longest window :func:`Engine.load` accepts (the rest of the region is slack for decoders)
MAX_WINDOW = CODE_SIZE - 0x8000
STACK_BASE = 0x00100000
STACK_SIZE = 0x4000
STACK_TOP = STACK_BASE + STACK_SIZE // 2
#: bytes below and above the stack pointer seeded with the code pointer
SEED_SPAN = 0x400
#: the TEB is deliberately left unmapped: its reads then take unicorn's slow path, whose hook
#: fires even for code that a store has just rewritten (plain read hooks are skipped for the
#: one-instruction block QEMU retranslates after self-modification of the current block)
TEB = 0x7FFDF000
GDT = 0x00300000
#: selector of the GDT entry whose base is the TEB, with RPL 3 like a user-mode ``fs``
FS_SELECTOR = (5 << 3) | 3
#: a flat 4 GiB 32-bit data segment for ``ss``, ``ds`` and ``es``
FLAT_SELECTOR = 2 << 3
#: the bytes around the window: ``0f 0f ...`` is an invalid instruction in both modes, so runs
#: that slide off the window stop, and as a jump displacement it is small and positive (a
#: printable argument cannot loop by borrowing a negative displacement from its surroundings)
FILL = 0x0F

#: register and stack seedings of a run (see :meth:`Engine.run`)
POINTER = "pointer"
STACK_AT_CODE = "stack-at-code"
SCRATCH = "scratch"
ZERO = "zero"
#: where SCRATCH seeding points the registers: zeroed, writable, away from code and seeds
SCRATCH_AREA = STACK_BASE + STACK_SIZE - 0x800

#: instructions one start offset may execute
RUN_CAP = 12_000
#: hook callbacks one run may cause (~2 us each): bounds ``rep movs`` and tight loops
CALLBACK_CAP = 3_000
#: bytes around the window compared after a run that wrote code (hooks can miss stores)
NEAR = 0x1000
#: Work units: the budget of a run and of an argument is counted in what the emulation did,
#: never in time, so that the same argument gets the same verdict on a quiet and on a loaded
#: machine.  One unit is about a microsecond of this machine kind (2 cores, quiet), fitted by
#: least squares over 33,000 runs of honest text, printable decoders and the real corpus
#: (``bench/mcp.py --calibrate``), in thread CPU time: every run pays its set-up, every hook
#: callback (a block executed, a store or load in the watched ranges) its Python call, every
#: byte of the blocks it runs first in a run their translation, and a store into code the run
#: has already executed the retranslation it forces.
RUN_UNITS_FIXED = 90
CALLBACK_UNITS = 4
FRESH_BYTE_UNITS = 2
SMC_UNITS = 30
#: units one start offset may spend
RUN_UNITS = 8_000
#: a decoder loop: one transforming store that changed bytes in this many iterations...
LOOP_ITERATIONS_MIN = 8
#: ...and this many distinct bytes...
LOOP_WRITES_MIN = 16
#: ...after reading this many distinct bytes of the argument (its encoded input), and storing
#: this many distinct byte values (decoded code varies; a loop storing one register does not)
LOOP_READS_MIN = 16
LOOP_VALUES_MIN = 12
#: iterations and bytes after which an unfinished decoder loop counts on its own
LONG_DECODER = 64
#: the same, checked while the loop runs, so that a slow self-modifying decoder (unicorn
#: retranslates its block on every iteration: a UTF-16 "venetian" decoder needs ~70 us per
#: iteration) is recognised without spending the argument's budget on the rest of it
EARLY_DECODER = 32
#: bytes of data the code wrote that a system call argument must point at (``/bin//sh``)...
BUILT_MIN = 8
#: ...and an argument of a call to a hard-coded address (``cmd``), a rarer event on its own
API_BUILT_MIN = 4
#: distinct payload bytes read or written after GetPC
PAYLOAD_MIN = 8
#: code bytes changed per run whose store address is remembered (see ``RunState.patch_sites``)
PATCH_SITES = 64
#: highest system call number taken as set up by the code (Linux, BSD and NT tables are smaller)
SYSCALL_MAX = 0x400

_RET_OPCODES = frozenset(b"\xc3\xc2\xcb\xca\xcf")
_PREFIXES = frozenset(b"\xf2\xf3\x26\x2e\x36\x3e\x64\x65\x66\x67")
#: stores that copy or push rather than compute: movs, push forms, pusha, enter, call, ins
_NON_TRANSFORMING = frozenset(b"\xa4\xa5\x06\x0e\x16\x1e\x60\x68\x6a\x6c\x6d\x9a\x9c\xc8\xe8")
_NON_TRANSFORMING |= frozenset(range(0x50, 0x58))


class RunState:
    """What one run from one start offset did; a fresh one before every run."""

    __slots__ = (
        "start", "zeroed", "modified", "hits", "blocks", "writers", "looped", "loop_pc",
        "reads", "returns", "getpc", "getpc_kind", "payload", "callbacks", "code_dirty",
        "stack_exec", "finding", "ran", "units", "unit_cap", "cap", "dirty_low", "dirty_high", "stack_used",
        "rejected", "seed", "smc", "ran_patched", "patch_sites",
    )

    def __init__(self, start: int, zeroed: bool, seed: int | None = None) -> None:
        self.start = start
        #: the code pointer the registers and stack slots were seeded with (see ``shift``)
        self.seed = start if seed is None else seed
        self.zeroed = zeroed
        self.modified: set[int] = set()
        self.hits: dict[int, int] = {}
        self.blocks = 0
        self.writers: dict[int, list[int]] = {}
        self.looped = False
        self.loop_pc = -1
        self.reads: set[int] = set()
        self.returns: dict[int, int] = {}
        self.getpc: int | None = None
        self.getpc_kind = ""
        self.payload: set[int] = set()
        self.callbacks = 0
        self.code_dirty = False
        self.dirty_low = CODE_BASE + CODE_SIZE
        self.dirty_high = CODE_BASE
        self.stack_exec = False
        #: whether the run touched the stack region (else seeding esp differently changes nothing)
        self.stack_used = False
        #: system call sites whose set-up did not count
        self.rejected: set[int] = set()
        self.finding: str | None = None
        #: addresses this run has executed (decoded code must be new code)
        self.ran: set[int] = set()
        #: work units spent (see :data:`RUN_UNITS_FIXED`) and the most the run may spend
        self.units = RUN_UNITS_FIXED
        self.unit_cap = RUN_UNITS
        self.cap = CALLBACK_CAP
        #: stores into bytes this run has already executed (each makes unicorn retranslate)
        self.smc = 0
        #: whether the run executed bytes it had changed (a patched jump, a decoded byte)
        self.ran_patched = False
        #: the first few code bytes the run changed, each with the address of its store
        self.patch_sites: dict[int, int] = {}


class Engine:
    """One unicorn instance for one mode, reused for many runs by one thread."""

    def __init__(self, bits: int) -> None:
        if not AVAILABLE:
            raise RuntimeError("unicorn is not installed")
        self.bits = bits
        self.arch = "x86" if bits == 32 else "x64"
        self.word = bits // 8
        self.uc = Uc(UC_ARCH_X86, UC_MODE_32 if bits == 32 else UC_MODE_64)
        _small_code_buffer(self.uc)
        self.pc_reg = X86.UC_X86_REG_EIP if bits == 32 else X86.UC_X86_REG_RIP
        self.ax_reg = X86.UC_X86_REG_EAX if bits == 32 else X86.UC_X86_REG_RAX
        self.sp_reg = X86.UC_X86_REG_ESP if bits == 32 else X86.UC_X86_REG_RSP
        self.arg_regs = _argument_registers(bits)
        self.peb_slot = TEB + (0x30 if bits == 32 else 0x60)
        #: kernel shellcode (token stealing) reads the current thread from the KPCR
        self.kpcr_thread_slot = TEB + (0x124 if bits == 32 else 0x188)
        self.native = _Native(self.uc, _seed_registers(bits), self.sp_reg)
        self.image = bytearray([FILL]) * CODE_SIZE
        self.window = b""
        self.length = 0
        self.covered = bytearray()
        self.state = RunState(LOAD, False)
        self._stack_lead = bytes(STACK_TOP - SEED_SPAN - STACK_BASE)
        self._stack_tail = bytes(STACK_BASE + STACK_SIZE - STACK_TOP - SEED_SPAN)
        self._map_memory()
        self._add_hooks()
        self.clean = self.uc.context_save()

    # ------------------------------------------------------------------ set-up

    def _map_memory(self) -> None:
        uc = self.uc
        uc.mem_map(CODE_BASE, CODE_SIZE)
        uc.mem_map(STACK_BASE, STACK_SIZE)
        if self.bits == 32:
            self._load_fs()
        else:
            uc.reg_write(X86.UC_X86_REG_GS_BASE, TEB)

    def _load_fs(self) -> None:
        """32-bit unicorn has no FS base register: point ``fs`` at the TEB through a GDT entry.

        Loading any selector recomputes the CPU's hidden flags from the cached descriptors, and
        the reset-time ``ss`` descriptor says 16-bit: stack accesses would then wrap at 64 KiB.
        So flat 32-bit data descriptors are loaded into ``ss``, ``ds`` and ``es`` first.
        """
        uc = self.uc
        uc.mem_map(GDT, 0x1000)
        uc.mem_write(GDT + (FLAT_SELECTOR >> 3) * 8, _descriptor(0, 0xFFFFF, 0x93, 0xC))
        uc.mem_write(GDT + (FS_SELECTOR >> 3) * 8, _descriptor(TEB, 0xFFF, 0xF3, 0x4))
        uc.reg_write(X86.UC_X86_REG_GDTR, (0, GDT, 0x1000, 0))
        for register in (X86.UC_X86_REG_SS, X86.UC_X86_REG_DS, X86.UC_X86_REG_ES):
            uc.reg_write(register, FLAT_SELECTOR)
        uc.reg_write(X86.UC_X86_REG_FS, FS_SELECTOR)

    def _add_hooks(self) -> None:
        uc = self.uc
        code_end = CODE_BASE + CODE_SIZE - 1
        stack_end = STACK_BASE + STACK_SIZE - 1
        uc.hook_add(UC_HOOK_BLOCK, self._on_block, begin=CODE_BASE, end=code_end)
        uc.hook_add(UC_HOOK_BLOCK, self._on_stack_block, begin=STACK_BASE, end=stack_end)
        uc.hook_add(UC_HOOK_MEM_WRITE, self._on_code_write, begin=CODE_BASE, end=code_end)
        uc.hook_add(UC_HOOK_MEM_WRITE, self._on_stack_write, begin=STACK_BASE, end=stack_end)
        uc.hook_add(UC_HOOK_MEM_READ, self._on_code_read, begin=CODE_BASE, end=code_end)
        uc.hook_add(UC_HOOK_MEM_READ, self._on_stack_read, begin=STACK_BASE, end=stack_end)
        uc.hook_add(UC_HOOK_MEM_READ_UNMAPPED, self._on_wild_read)
        uc.hook_add(UC_HOOK_MEM_WRITE_UNMAPPED, self._on_wild_write)
        uc.hook_add(UC_HOOK_MEM_FETCH_UNMAPPED, self._on_wild_jump)
        uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        uc.hook_add(UC_HOOK_INSN, self._on_port, None, 1, 0, X86.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._on_port, None, 1, 0, X86.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0, X86.UC_X86_INS_SYSCALL)
        uc.hook_add(UC_HOOK_INSN, self._on_syscall, None, 1, 0, X86.UC_X86_INS_SYSENTER)

    # ------------------------------------------------------------------ runs

    def load(self, window: bytes) -> None:
        """Place a new window in memory; every run after this sees exactly these bytes."""
        if len(window) > MAX_WINDOW:
            raise ValueError(f"window of {len(window)} bytes exceeds {MAX_WINDOW}")
        self.image[:] = bytes([FILL]) * CODE_SIZE
        self.image[LOAD - CODE_BASE:LOAD - CODE_BASE + len(window)] = window
        self.window = bytes(window)
        self.length = len(window)
        self.covered = bytearray(len(window))
        self._restore_code()

    def flush_translations(self) -> None:
        """Empty unicorn's buffer of translated code (~0.05 ms), before each argument.

        The buffer only fills up (dropping translations of restored code frees nothing), and
        when it overflows in the middle of a run, that run stalls for 15-60 ms of CPU time that
        no work unit counts: a 4,000-unit run took 34 ms where it takes 3 ms.  One argument
        translates far less than the buffer holds, so emptying it first keeps that from
        happening during an analysis."""
        flush = getattr(self.uc, "ctl_flush_tb", None)
        if flush is not None:
            flush()

    def _restore_code(self, low: int = CODE_BASE, high: int = CODE_BASE + CODE_SIZE) -> None:
        """Put back the original bytes of ``[low, high)`` and drop blocks translated from them.

        Only the range a run wrote is restored, so that the blocks translated for the other
        start offsets survive: retranslating everything made every run ~5x slower.
        """
        low, high = max(low, CODE_BASE), min(high, CODE_BASE + CODE_SIZE)
        if low >= high:
            return
        self.uc.mem_write(low, bytes(self.image[low - CODE_BASE:high - CODE_BASE]))
        self.uc.ctl_remove_cache(low, high)

    def _restore_written(self, state: RunState) -> None:
        """Undo what the last run wrote into the code region.

        The store hooks give the range, but unicorn skips memory hooks in the one-instruction
        block it retranslates after self-modification, so the window and its surroundings are
        also compared with the original (slice comparisons, bisected to the changed span).
        """
        low, high = state.dirty_low, state.dirty_high
        begin = max(CODE_BASE, LOAD - NEAR)
        end = min(CODE_BASE + CODE_SIZE, LOAD + self.length + NEAR)
        now = bytes(self.uc.mem_read(begin, end - begin))
        before = bytes(self.image[begin - CODE_BASE:end - CODE_BASE])
        # outside what the hooks saw (usually nothing): two slice comparisons, bisected only
        # if they differ
        inner_low = min(max(low - begin, 0), len(now))
        inner_high = max(min(high - begin, len(now)), inner_low)
        if now[:inner_low] != before[:inner_low] or now[inner_high:] != before[inner_high:]:
            first, last = _changed_span(now, before)
            low, high = min(low, begin + first), max(high, begin + last)
        self._restore_code(low, high)

    def run(
        self,
        offset: int,
        seeding: str = POINTER,
        left: int | None = None,
        cap: int = RUN_CAP,
        callbacks: int = CALLBACK_CAP,
        units: int = RUN_UNITS,
        shift: int = 0,
    ) -> RunState:
        """Execute from ``offset`` of the loaded window; ``seeding`` sets up registers and stack.

        * ``POINTER``: registers and the stack slots around ``esp`` point at the start offset,
          the stack itself is elsewhere (a ``call reg``/``jmp reg`` into the payload);
        * ``STACK_AT_CODE``: registers and ``esp`` point at the start (``jmp esp``: the payload
          sits where the stack pointer is, which ``esp``-based printable decoders rely on);
        * ``SCRATCH``: registers point at zeroed writable memory (shellcode that uses ``ebp``
          or ``edi`` as a scratch pointer would overwrite itself with the code pointers);
        * ``ZERO``: registers cleared (a follow-up stage after ``xor eax, eax``). Such runs
          only report system calls: cleared registers make any ``fs:`` access hit the TEB.

        ``shift`` makes the code pointers of ``POINTER`` seeding point that many bytes before
        the start: an exploit may point its register at the start of its buffer, a few bytes
        before the code that uses it as a base (a printable decoder addresses the bytes it
        patches through it, and patches the wrong ones with any other value).
        """
        previous = self.state
        if previous.code_dirty:
            self._restore_written(previous)
        if previous.stack_exec:
            self.uc.ctl_remove_cache(STACK_BASE, STACK_BASE + STACK_SIZE)
        start = LOAD + offset
        seed = start - shift
        state = self.state = RunState(start, seeding == ZERO, seed)
        state.unit_cap = units if left is None else min(units, left)
        state.cap = callbacks
        uc = self.uc
        uc.context_restore(self.clean)
        pointer = seed.to_bytes(self.word, "little") * (2 * SEED_SPAN // self.word)
        uc.mem_write(STACK_BASE, self._stack_lead + pointer + self._stack_tail)
        value = {ZERO: 0, SCRATCH: SCRATCH_AREA}.get(seeding, seed)
        self.native.seed(value, start if seeding == STACK_AT_CODE else STACK_TOP)
        try:
            uc.emu_start(start, 0, count=cap)
        except UcError:
            pass  # a fault ends the run like any other stop
        if state.finding is None and self._long_decoder(state):
            state.finding = f"{self.arch}-decoder-loop"
        return state

    def _long_decoder(self, state: RunState, least: int = LONG_DECODER) -> bool:
        """A decoder loop that was still going when the run ended.

        Long payloads (a 700-byte alphanumeric one) outlast a run's budget, and decoders
        whose base register the exploit would have set differently decode garbage forever; both
        are still a decoder.  It counts when the looping store, which reads its input, has
        transformed at least :data:`LONG_DECODER` bytes in as many iterations, all of them
        ahead of itself: random bytes that loop start from the seeded pointers, behind or at
        their own code, and soon overwrite it.
        """
        if not state.looped:
            return False
        record = state.writers[state.loop_pc]
        return record[1] >= least and record[2] >= least and record[4] > state.loop_pc

    def _exhausted(self, state: RunState) -> bool:
        """Count one hook callback; stop the run past its callback cap or its work units.

        No clock is read: what a run may do is counted in work units, so a busy machine or
        sibling analysis threads change how long a verdict takes, never the verdict.
        """
        state.callbacks += 1
        state.units += CALLBACK_UNITS
        if state.callbacks > state.cap or state.units > state.unit_cap:
            self.uc.emu_stop()
            return True
        return False

    def _found(self, kind: str) -> None:
        state = self.state
        if state.zeroed and kind != "syscall":
            return
        if state.finding is None:
            state.finding = f"{self.arch}-{kind}"
        self.uc.emu_stop()

    def _opcode(self) -> bytes:
        """First bytes of the instruction being executed (``fwait`` prefix skipped)."""
        code = self.native.mem(self.native.reg(self.pc_reg), 4) or b"\x00\x00\x00\x00"
        return code[1:] if code[0] == 0x9B else code

    # ------------------------------------------------------------------ blocks and loops

    def _on_block(self, uc: Uc, address: int, size: int, _: object) -> None:
        state = self.state
        if self._exhausted(state):
            return
        offset = address - LOAD
        if 0 <= offset < self.length:
            end = min(offset + size, self.length)
            self.covered[offset:end] = b"\x01" * (end - offset)
        self._count_block(state, address, size)

    def _on_stack_block(self, uc: Uc, address: int, size: int, _: object) -> None:
        state = self.state
        if self._exhausted(state):
            return
        state.stack_exec = True
        self._count_block(state, address, size)

    def _count_block(self, state: RunState, address: int, size: int) -> None:
        """Loop bookkeeping, and the decoder check: does the code run bytes a loop wrote?

        The changed bytes must be new code, never executed before in this run: a loop whose
        stores wander into its own body (random bytes do that) re-runs changed bytes, a
        decoder jumps on to the code it produced.
        """
        state.blocks += 1
        hits = state.hits.get(address, 0) + 1
        state.hits[address] = hits
        span = range(address, address + size)
        if hits == 1:
            state.units += FRESH_BYTE_UNITS * size
            if not state.ran_patched and state.modified:
                end = address + size
                if len(state.modified) < size:
                    state.ran_patched = any(address <= m < end for m in state.modified)
                else:
                    state.ran_patched = not state.modified.isdisjoint(span)
            if state.looped:
                fresh = state.modified.intersection(span).difference(state.ran)
                if fresh:
                    self._found("decoder-loop")
            state.ran.update(span)

    def _note_writer(self, state: RunState, changed: int, address: int, data: bytes) -> None:
        """Count, per store instruction, the loop iterations in which it changed bytes.

        One instruction storing many bytes at once (``fnsave``, ``enter``, ``pusha``) or a few
        stray stores are what random bytes do; a decoder is one store that runs in a loop, and
        it reads its encoded input.  Copies and pushes (``movs``, ``rep stos``, ``push``) move
        bytes without transforming them and are not decoders.
        """
        pc = self.native.reg(self.pc_reg)
        if CODE_BASE <= address < CODE_BASE + CODE_SIZE and len(state.patch_sites) < PATCH_SITES:
            for here in range(address, address + len(data)):
                state.patch_sites.setdefault(here, pc)
        record = state.writers.get(pc)
        if record is None:
            # last block seen, iterations, bytes changed, transforming?, lowest address, values
            record = state.writers[pc] = [-1, 0, 0, self._transforms(), address, set()]
        if not record[3]:
            return
        if record[0] != state.blocks:
            record[0] = state.blocks
            record[1] += 1
        record[2] += changed
        record[4] = min(record[4], address)
        if len(record[5]) < LOOP_VALUES_MIN:
            record[5].update(data)
        if not state.looped and _decoding(record) and len(state.reads) >= LOOP_READS_MIN:
            state.looped = True
            state.loop_pc = pc
        elif (not state.looped and record[1] == LONG_DECODER and state.ran_patched
              and _blind_decoder(record, pc, len(state.reads)) and self._printable_code(pc)):
            self._found("decoder-loop")
        elif state.looped and pc == state.loop_pc and record[1] == EARLY_DECODER and self._long_decoder(state, EARLY_DECODER):
            self._found("decoder-loop")  # no need to wait for the end of a long decoder

    def _printable_code(self, pc: int) -> bool:
        """Whether the argument's own bytes of the instruction at ``pc`` are printable."""
        index = pc - CODE_BASE
        original = self.image[index:index + 3]
        return len(original) == 3 and all(0x20 <= b <= 0x7E for b in original)

    def _transforms(self) -> bool:
        """Whether the storing instruction can compute what it stores (not a copy or push)."""
        code = self._opcode()
        at = 0
        while at < 2 and code[at] in _PREFIXES:
            if code[at] in (0xF2, 0xF3):
                return False
            at += 1
        if self.bits == 64 and 0x40 <= code[at] <= 0x4F:
            at += 1
        op = code[at]
        if op in _NON_TRANSFORMING:
            return False
        return not (op == 0xFF and at + 1 < len(code) and (code[at + 1] >> 3) & 7 in (2, 3, 6))

    # ------------------------------------------------------------------ stores

    def _on_code_write(self, uc: Uc, access: int, address: int, size: int, value: int, _: object) -> None:
        state = self.state
        if self._exhausted(state):
            return
        state.code_dirty = True
        if address < state.dirty_low:
            state.dirty_low = address
        if address + size > state.dirty_high:
            state.dirty_high = address + size
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        image = self.image
        modified = state.modified
        changed = 0
        for i, byte in enumerate(data):
            here = address + i
            index = here - CODE_BASE
            if index < CODE_SIZE and image[index] != byte and here not in modified:
                modified.add(here)
                changed += 1
        if changed:
            self._note_writer(state, changed, address, data)
        if address in state.ran or address + size - 1 in state.ran:
            state.smc += 1
            state.units += SMC_UNITS
        if LOAD <= value <= LOAD + self.length:  # a call at the very end returns to the end
            self._note_return_slot(address, size, value)
        if state.getpc is not None and address >= state.getpc - 64:
            self._payload_access(address, size)

    def _on_stack_write(self, uc: Uc, access: int, address: int, size: int, value: int, _: object) -> None:
        state = self.state
        state.stack_used = True
        if self._exhausted(state):
            return
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        modified = state.modified
        changed = 0
        for i, byte in enumerate(data):
            here = address + i
            if self._stack_baseline(here) != byte and here not in modified:
                modified.add(here)
                changed += 1
        if changed:
            self._note_writer(state, changed, address, data)
        if LOAD <= value <= LOAD + self.length:  # a call at the very end returns to the end
            self._note_return_slot(address, size, value)

    def _note_return_slot(self, address: int, size: int, value: int) -> None:
        """Remember slots holding a code address stored by ``call rel`` or ``fnstenv``."""
        if size != self.word and size != 4:
            return
        opcode = self._opcode()
        if opcode[0] == 0xE8:
            self.state.returns[address] = value
            self.state.getpc_kind = "getpc-call"
        elif _is_fpu_env_store(opcode):
            self.state.returns[address] = value
            self.state.getpc_kind = "getpc-fnstenv"

    # ------------------------------------------------------------------ loads

    def _on_stack_read(self, uc: Uc, access: int, address: int, size: int, value: int, _: object) -> None:
        state = self.state
        state.stack_used = True
        if self._exhausted(state):
            return
        if address not in state.returns:
            if STACK_TOP - SEED_SPAN <= address < STACK_TOP + SEED_SPAN and address not in state.modified:
                self._check_seeded_return()
            return
        self._check_return_slot(state, address)

    def _check_return_slot(self, state: RunState, address: int) -> None:
        """GetPC: a stored code address read back by anything but a return."""
        stored = state.returns.get(address)
        if stored is not None and state.getpc is None and self._opcode()[0] not in _RET_OPCODES:
            state.getpc = stored

    def _check_seeded_return(self) -> None:
        """Returning through a seeded slot re-enters the start: an emulation artefact.

        It turns random bytes into loops and is nothing shellcode does, so the run ends.
        """
        if self._opcode()[0] in _RET_OPCODES:
            self.uc.emu_stop()

    def _on_code_read(self, uc: Uc, access: int, address: int, size: int, value: int, _: object) -> None:
        state = self.state
        if self._exhausted(state):
            return
        if len(state.reads) < LOOP_READS_MIN:
            state.reads.update(range(address, address + size))
        if state.returns:
            self._check_return_slot(state, address)  # the stack may sit in the code (jmp esp)
        if state.getpc is not None and address >= state.getpc - 64:
            self._payload_access(address, size)

    def _payload_access(self, address: int, size: int) -> None:
        """Count bytes read or written through the GetPC'd pointer: the window, or just past it
        (a decoder stub whose payload was cut off still reaches for it)."""
        state = self.state
        if LOAD <= address < LOAD + self.length + NEAR:
            state.payload.update(range(address, address + size))
            if len(state.payload) >= PAYLOAD_MIN:
                self._found(state.getpc_kind)

    def _on_wild_write(self, uc: Uc, access: int, address: int, size: int, value: int, _: object) -> bool:
        """A store to unmapped memory: a word stored into the TEB's first slot installs an
        exception handler (``mov fs:[0], esp``), which SEH-based egg hunters and GetPC do."""
        if size == self.word and address == TEB and self.bits == 32:
            self._found("seh-install")
        return False

    def _on_wild_read(self, uc: Uc, access: int, address: int, size: int, value: int, _: object) -> bool:
        """A load from unmapped memory: the TEB's PEB pointer (or WOW64 gate) is a finding.

        Only a full-word load of exactly that slot counts: printable code reaches small
        ``fs:``/``gs:`` offsets easily (``and eax, imm32`` clears a register), but loading the
        PEB pointer is what Windows shellcode does to find kernel32.
        """
        if size == self.word:
            if address == self.peb_slot:
                self._found("peb-access")
            elif address == self.kpcr_thread_slot:
                self._found("kpcr-access")
            elif self.bits == 32 and address == TEB + 0xC0:
                self._found("syscall")
            elif self.bits == 32 and address == TEB:
                # the head of the SEH chain: SEH-based GetPC (the printable "d36" prologues)
                # and egg hunters; text would first have to clear a register exactly
                self._found("seh-read")
        return False

    # ------------------------------------------------------------------ system and API calls

    def _on_interrupt(self, uc: Uc, number: int, _: object) -> None:
        if number in (0x80, 0x2E, 0x91):
            self._syscall()
        elif number == 13 and self._is_call_gate():
            self._syscall()
        else:
            uc.emu_stop()

    def _is_call_gate(self) -> bool:
        """``lcall 7,0`` / ``lcall 0x27,0``: the BSD and Solaris system call gates."""
        code = self.native.mem(self.native.reg(self.pc_reg), 7)
        return code is not None and code[0] == 0x9A and code[5] in (0x07, 0x27) and code[6] == 0

    def _on_port(self, uc: Uc, port: int, size: int, *rest: object) -> int:
        """``in``/``out`` are privileged and never in shellcode; unicorn would read zeros, which
        look like a cleared register.  The run ends, and a read returns all ones."""
        uc.emu_stop()
        return 0xFFFFFFFF

    def _on_syscall(self, uc: Uc, _: object) -> None:
        self._syscall()

    def _syscall(self) -> None:
        """A system call counts when the code set up its number and, unless small, an argument.

        A small number needs deliberately cleared registers (the seeds are large pointers);
        in a run with cleared registers the code must have loaded a nonzero number.
        ``mov al, 11`` without clearing (the upper half of the register still the seed's) only
        counts with an argument pointing at data the code built on the stack (``/bin//sh``, a
        socketcall argument block) or at its own GetPC'd payload.  Stores through the seeded
        pointers into the code do not count: random bytes make those all the time.
        """
        number = self.native.reg(self.ax_reg)
        if number < SYSCALL_MAX and not (self.state.zeroed and number == 0):
            self._found("syscall")
            return
        state = self.state
        low_set = (number ^ state.seed) < 0x10000 and (number & 0xFF) != (state.seed & 0xFF)
        if low_set and any(self._prepared(value, stack_only=True) for value in self._arguments()):
            self._found("syscall")
            return
        pc = self.native.reg(self.pc_reg)
        if pc in state.rejected:
            self.uc.emu_stop()  # the same call again: a loop around it, nothing new to see
            return
        # not set up by the code: carry on with an error result (never a small number),
        # as the kernel would, so that a later, real system call is still seen
        state.rejected.add(pc)
        self.uc.reg_write(self.ax_reg, (1 << (8 * self.word)) - 1)

    def _arguments(self) -> list[int]:
        """Argument registers, then the top five stack words (return address first)."""
        values = [self.native.reg(reg) for reg in self.arg_regs]
        raw = self.native.mem(self.native.reg(self.sp_reg), 5 * self.word)
        if raw is None:
            return values + [0] * 5
        return values + [int.from_bytes(raw[i:i + self.word], "little") for i in range(0, len(raw), self.word)]

    def _prepared(self, value: int, least: int = BUILT_MIN, stack_only: bool = False) -> bool:
        """A pointer to data the code prepared: at least ``least`` bytes it wrote (on the stack
        region only, if ``stack_only``), its GetPC'd payload, or data right after one of its
        ``call``s (``call`` over a string)."""
        state = self.state
        if state.getpc is not None and state.getpc - 16 <= value < LOAD + self.length:
            return True
        if value in state.returns.values():
            return True
        if stack_only and not STACK_BASE <= value < STACK_BASE + STACK_SIZE:
            return False
        # the seed pointer is what the run started with, not something the code prepared
        return value not in (state.start, state.seed) and self._built(value, least)

    def _built(self, address: int, least: int = BUILT_MIN) -> bool:
        """Whether ``address`` starts a string or block the code wrote (``push "cmd."``).

        Memory is compared with what the run started with instead of trusting the store hooks:
        unicorn skips memory hooks for the one-instruction block it retranslates after code
        modifies its own current block, which is exactly where decoded payloads push strings.
        """
        if CODE_BASE <= address <= CODE_BASE + CODE_SIZE - least:
            index = address - CODE_BASE
            before = bytes(self.image[index:index + least])
        elif STACK_BASE <= address <= STACK_BASE + STACK_SIZE - least:
            before = bytes(self._stack_baseline(address + i) for i in range(least))
        else:
            return False
        now = self.native.mem(address, least) or before
        return sum(a != b for a, b in zip(before, now)) >= least - 1

    def _stack_baseline(self, address: int) -> int:
        """The byte a stack address held when the run started (seeded pointer or zero)."""
        if STACK_TOP - SEED_SPAN <= address < STACK_TOP + SEED_SPAN:
            return (self.state.seed >> (8 * ((address - STACK_TOP) % self.word))) & 0xFF
        return 0

    def _on_wild_jump(self, uc: Uc, access: int, address: int, size: int, value: int, _: object) -> bool:
        """Execution left the mapped memory: a hard-coded API call if the code chose the target.

        It must be a constant the code loads (``mov reg, imm32``, ``push imm32``, ``mov [mem],
        imm32``), reached by ``call reg`` (or ``push imm32; ret``, whose return address is then
        on the stack as well), with an argument pointing at data the code prepared.  Random
        bytes jump to wild addresses all the time, but not like that.
        """
        arguments = self._arguments()
        how = self._hardcoded(address)
        if how is None:
            return False
        if self._after_register_call(arguments[-5]):
            stack_arguments, least = arguments[-4:], API_BUILT_MIN
        elif how == "push":
            stack_arguments, least = arguments[-5:], BUILT_MIN
        else:
            return False
        if any(self._prepared(argument, least) for argument in stack_arguments):
            self._found("api-call")
        return False

    def _after_register_call(self, address: int) -> bool:
        """Whether ``address`` follows a ``call reg`` or ``call [reg+disp8]`` in the code region."""
        if not LOAD + 3 <= address < CODE_BASE + CODE_SIZE:
            return False
        before = self._code(address - 3, 3)
        if before[1] == 0xFF and before[2] & 0xF8 == 0xD0:
            return True
        return before[0] == 0xFF and before[1] & 0xF8 == 0x50

    def _code(self, address: int, size: int) -> bytes:
        """Current code bytes: the loaded image unless the run rewrote it (decoded code)."""
        if self.state.code_dirty:
            return bytes(self.uc.mem_read(address, size))  # may exceed the native buffer
        index = address - CODE_BASE
        return bytes(self.image[index:index + size])

    def _hardcoded(self, target: int) -> str | None:
        """How the code holds ``target`` as a constant: "push", "mov", or ``None``."""
        if target >= 1 << 32:
            return None
        needle = target.to_bytes(4, "little")
        code = self._code(LOAD, max(self.length, 0x1000)) if self.state.code_dirty else self.window
        at = code.find(needle)
        found = None
        while at >= 0:
            how = _loads_immediate(code, at)
            if how == "push":
                return how
            found = found or how
            at = code.find(needle, at + 1)
        return found


def _decoding(record: list) -> bool:
    """A store's record (see ``_note_writer``) shows a decoder loop: enough iterations, bytes
    changed and distinct values stored."""
    iterations, changed, values = record[1], record[2], record[5]
    return iterations >= LOOP_ITERATIONS_MIN and changed >= LOOP_WRITES_MIN and len(values) >= LOOP_VALUES_MIN


def _blind_decoder(record: list, pc: int, reads: int) -> bool:
    """A decoder stub decoding input it was cut off from (its payload is missing, so what it
    stores varies too little for :func:`_decoding`): one transforming store that changed
    :data:`LONG_DECODER` distinct bytes, all ahead of itself, in as many iterations, after
    reading its input.  Only printable stores count, in a run that executed a byte it
    patched (see ``_note_writer``): printable code can only loop through a branch it patched
    in, while random binary loops all the time (a ``sub [edi], al`` filling memory ahead)."""
    return record[3] and record[2] >= LONG_DECODER and record[4] > pc and reads >= LOOP_READS_MIN


def _changed_span(a: bytes, b: bytes) -> tuple[int, int]:
    """First differing index and one past the last one of two equal-length, unequal buffers.

    Chunks of 256, then 16, then single bytes are compared from either end (a run changes a
    few bytes near where it ran): a few microseconds for a 10 KB window.
    """
    first, last = 0, len(a)
    for chunk in (256, 16, 1):
        while first + chunk <= last and a[first:first + chunk] == b[first:first + chunk]:
            first += chunk
    for chunk in (256, 16, 1):
        while last - chunk >= first and a[last - chunk:last] == b[last - chunk:last]:
            last -= chunk
    return first, last


def _loads_immediate(window: bytes, at: int) -> str | None:
    """Whether the 4 bytes at ``at`` are the immediate of ``push`` ("push") or of ``mov r32`` /
    ``mov r/m32`` ("mov")."""
    before = window[max(0, at - 3):at]
    if before[-1:] == b"\x68":
        return "push"
    if before[-1:] and 0xB8 <= before[-1] <= 0xBF:
        return "mov"
    if len(before) >= 2 and before[-2] == 0xC7 and before[-1] >> 6 == 3:
        return "mov"
    if len(before) == 3 and before[0] == 0xC7 and before[1] >> 6 == 1:
        return "mov"
    return None


def _is_fpu_env_store(opcode: bytes) -> bool:
    """``fnstenv`` / ``fnsave`` (d9 /6, dd /6): they store the address of the last FPU instruction."""
    return len(opcode) >= 2 and opcode[0] in (0xD9, 0xDD) and (opcode[1] >> 3) & 7 == 6


class _Native:
    """Direct calls into libunicorn for the accesses made inside hooks and before every run.

    The Python binding spends 2-7 us per register or memory access (class lookups, buffer
    allocation); hooks make thousands of them per argument.  These prepared ctypes calls cost
    well under a microsecond.  If the binding's internals ever change, the public (slower)
    API is used instead.
    """

    def __init__(self, uc: Uc, seeded: list[int], sp_reg: int) -> None:
        self.uc = uc
        module = _unicorn_module()
        self.lib = getattr(module, "uclib", None)
        self.handle = getattr(uc, "_uch", None)
        self.fast = self.lib is not None and self.handle is not None
        self.value = ctypes.c_uint64(0)
        self.buffer = ctypes.create_string_buffer(64)
        self.registers = seeded + [sp_reg]
        self.values = [ctypes.c_uint64(0) for _ in self.registers]
        count = len(self.registers)
        self.ids = (ctypes.c_int32 * count)(*self.registers)
        self.pointers = (ctypes.c_void_p * count)(*(ctypes.addressof(v) for v in self.values))

    def seed(self, seed: int, sp: int) -> None:
        """Write ``seed`` into every seeded register and ``sp`` into the stack pointer."""
        for value in self.values[:-1]:
            value.value = seed
        self.values[-1].value = sp
        if self.fast and self.lib.uc_reg_write_batch(self.handle, self.ids, self.pointers, len(self.registers)) == 0:
            return
        for register, value in zip(self.registers, self.values):
            self.uc.reg_write(register, value.value)

    def reg(self, register: int) -> int:
        if self.fast and self.lib.uc_reg_read(self.handle, register, ctypes.byref(self.value)) == 0:
            return self.value.value
        return self.uc.reg_read(register)

    def mem(self, address: int, size: int) -> bytes | None:
        """``size`` (at most 64) bytes at ``address``, or ``None`` if unmapped."""
        if self.fast:
            if self.lib.uc_mem_read(self.handle, address, self.buffer, size) != 0:
                return None
            return self.buffer.raw[:size]
        try:
            return bytes(self.uc.mem_read(address, size))
        except UcError:
            return None


#: size of unicorn's buffer for translated code (its default is 1 GiB).  A run during which it
#: overflows stalls (15-60 ms of CPU, more with larger buffers, uncounted by the work units),
#: so it is emptied before every argument (:meth:`Engine.flush_translations`); 4 MiB holds
#: what one argument translates
TCG_BUFFER = 4 << 20


def _small_code_buffer(uc: Uc) -> None:
    """Keep translated code in a small buffer that stays in memory.

    Unicorn reserves 1 GiB and fills it front to back, flushing only when it is full: every
    argument's fresh translations then land on untouched pages, whose first-touch faults (and
    pages the kernel has meanwhile reclaimed) made single runs take milliseconds of wall-clock
    time with a handful of instructions.  A small buffer is flushed now and then instead.
    """
    setter = getattr(uc, "ctl_set_tcg_buffer_size", None)
    if setter is not None:
        try:
            setter(TCG_BUFFER)
        except UcError:  # pragma: no cover - older unicorn: keep its default
            pass


def _unicorn_module() -> object:
    try:
        from unicorn.unicorn_py3 import unicorn as module
    except ImportError:  # pragma: no cover - other binding layouts
        return None
    return module


def _seed_registers(bits: int) -> list[int]:
    if bits == 32:
        names = ("EAX", "EBX", "ECX", "EDX", "ESI", "EDI", "EBP")
    else:
        names = ("RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RBP") + tuple(f"R{i}" for i in range(8, 16))
    return [getattr(X86, f"UC_X86_REG_{name}") for name in names]


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    """An 8-byte GDT segment descriptor."""
    entry = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (access << 40)
    entry |= ((limit >> 16) & 0xF) << 48 | flags << 52 | ((base >> 24) & 0xFF) << 56
    return struct.pack("<Q", entry)


def _argument_registers(bits: int) -> list[int]:
    """System call argument registers: Linux i386 and x86-64 conventions (Windows uses the stack)."""
    names = ("EBX", "ECX", "EDX", "ESI", "EDI") if bits == 32 else ("RDI", "RSI", "RDX", "R10", "R8", "R9")
    return [getattr(X86, f"UC_X86_REG_{name}") for name in names]


_local = threading.local()


#: what one analysis uses: a 32-bit and a 64-bit engine for the argument's own windows, and a
#: 32-bit engine for the UTF-16 view, so that switching between them does not throw away
#: the code unicorn translated for the other (loading a window drops it all)
Engines = tuple[Engine, Engine, Engine]


def _new_set() -> Engines:
    return (Engine(32), Engine(64), Engine(32))


def engines() -> Engines:
    """This thread's engines (unicorn instances are not thread-safe)."""
    pair = getattr(_local, "pair", None)
    if pair is None:
        pair = _local.pair = _new_set()
    return pair


#: engine sets no analysis is using; :func:`leased` takes one, :func:`prepare` fills it up
_spare: list[Engines] = []
_spare_lock = threading.Lock()


def prepare(count: int) -> int:
    """Create engine sets until ``count`` are spare, so that no analysis pays for creating
    one (~30 ms each: ``Uc()`` and the mappings); returns how many were created.

    Meant for the start of the analysis pool (``count`` = its threads), in any thread: a pair
    is not bound to the thread that made it, only used by one thread at a time."""
    if not AVAILABLE:
        return 0
    with _spare_lock:
        missing = count - len(_spare)
    made = [_new_set() for _ in range(max(0, missing))]
    with _spare_lock:
        _spare.extend(made)
    return len(made)


@contextlib.contextmanager
def leased() -> Iterator[Engines]:
    """The engines for one analysis, given back afterwards (a set is created only when every
    prepared one is in use)."""
    with _spare_lock:
        pair = _spare.pop() if _spare else None
    if pair is None:
        pair = _new_set()
    try:
        yield pair
    finally:
        with _spare_lock:
            _spare.append(pair)
