"""Malicious Code Protector: finds machine code in POP3 command arguments, without signatures.

Tier 0 (:func:`quick_check`, microseconds) decides almost every argument from its field
grammar and byte class.  Tier 1 (:func:`deep_check`, milliseconds, thread-safe) analyses the
rest statically (sleds, sprayed return addresses) and, when the optional ``unicorn`` extra is
installed (:data:`emulation_available`), by running it as x86 and x86-64 code and watching
for decoders, GetPC, system calls, PEB access and hard-coded API calls.  :func:`analyze`
chains both with a bounded LRU cache of tier 1 verdicts.

This package must not import Twisted: the protocol layer calls it from its own threads.
"""

from __future__ import annotations

from . import emulate
from .cache import VerdictCache
from .deep import deep_check
from .tier0 import quick_check
from .verdict import Verdict

__all__ = [
    "Verdict",
    "analyze",
    "cache",
    "deep_check",
    "deep_check_cached",
    "emulation_available",
    "prepare",
    "quick_check",
]

#: whether unicorn imported, i.e. whether tier 1 emulates or only runs its static checks
emulation_available: bool = emulate.AVAILABLE

#: the process-wide cache of tier 1 verdicts used by :func:`analyze`
cache = VerdictCache(capacity=4096)


def prepare(threads: int) -> int:
    """Create the emulators ``threads`` concurrent analyses need, before the first argument
    arrives (the analysis pool's start): otherwise the first long argument of each thread
    pays ~20 ms for creating them.  Returns how many engine pairs were created; 0 without
    unicorn."""
    return emulate.prepare(threads)


def deep_check_cached(argument: bytes) -> Verdict:
    """:func:`deep_check` through the shared verdict cache (what the server's thread pool runs)."""
    return cache.get_or_compute(argument, deep_check)


def analyze(argument: bytes, field: str = "text") -> Verdict:
    """Tier 0, then (only if it is undecided) tier 1 through the verdict cache."""
    verdict = quick_check(argument, field)
    if verdict is not None:
        return verdict
    return deep_check_cached(argument)
