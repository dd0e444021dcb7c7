"""The answer every tier of the Malicious Code Protector gives.

A verdict is a value object: frozen so that cached verdicts can be shared between threads
and sessions without anyone mutating a result another caller is still reading.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """Whether an argument carries machine code, and the short machine-friendly reasons why.

    ``reasons`` of a clean verdict may still explain the decision (for example
    ``("short-printable",)``); only ``malicious`` drives the server's reaction.
    """

    malicious: bool
    reasons: tuple[str, ...] = ()


def malicious(*reasons: str) -> Verdict:
    """A malicious verdict; at least one reason is required so that logs say why."""
    if not reasons:
        raise ValueError("a malicious verdict needs a reason")
    return Verdict(True, tuple(reasons))


def clean(*reasons: str) -> Verdict:
    """A clean verdict with optional explanations."""
    return Verdict(False, tuple(reasons))
