"""The protection engine: which protection fired, what it does, and the event it leaves.

One engine per connection. It resolves each protection's action for the client's address once,
turns a trigger into a :class:`SecurityEvent` (or nothing, when inactive or already reported in
``detect`` mode) and counts repeats for the closing record.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

from pop3shield.core.settings import PROTECTION_KEYS, Action, ProtectionsConfig

#: key -> (attack name, attack information); operators grep these and SIEM rules match them.
ATTACKS: dict[str, tuple[str, str]] = {
    "empty_username": ("POP3 Policy Violation", "No username supplied in USER command"),
    "empty_password": ("POP3 Policy Violation", "No password supplied in PASS command"),
    "non_compliant": ("POP3 Policy Violation", "Non protocol-compliant connection"),
    "stls": ("POP3 Policy Violation", "Illegal POP3 TLS session"),
    "malicious_code": ("POP3 Security Violation", "Malicious Code Protector"),
    "max_bad_commands": ("POP3 Policy Violation", "Too many bad commands"),
    "max_line_length": ("POP3 Format Violation", "Command line is too long"),
    "max_commands": ("POP3 Policy Violation", "Too many commands"),
}

#: the protection's display name, for logs and docs
NAMES: dict[str, str] = {
    "empty_username": "Empty POP3 Username",
    "empty_password": "Empty POP3 Password",
    "non_compliant": "Non Compliant POP3",
    "stls": "POP3 STARTTLS Command",
    "malicious_code": "Malicious Code Protector for POP3",
    "max_bad_commands": "Maximum Bad POP3 Commands",
    "max_line_length": "Maximum POP3 Command Line Length",
    "max_commands": "Maximum POP3 Commands Per Connection",
}

assert set(ATTACKS) == set(PROTECTION_KEYS) == set(NAMES)


@dataclass(frozen=True)
class SecurityEvent:
    """What the core knows of a violation; the I/O layer adds time, session and addresses."""

    protection: str
    action: Action
    command: str
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def attack_name(self) -> str:
        return ATTACKS[self.protection][0]

    @property
    def attack_info(self) -> str:
        return ATTACKS[self.protection][1]


@dataclass(frozen=True)
class Trigger:
    """The outcome of one protection check: the action in force and the event to log, if any."""

    action: Action
    event: SecurityEvent | None

    @property
    def prevents(self) -> bool:
        return self.action is Action.PREVENT


#: never written: the repeats of an engine that has had none
_NO_REPEATS: Counter[str] = Counter()
#: the key -> action dicts in use, one per distinct resolution (at most 3 ** 8; a handful in practice)
_ACTIONS: dict[tuple[Action, ...], Mapping[str, Action]] = {}


def _shared_actions(resolved: tuple[Action, ...]) -> Mapping[str, Action]:
    actions = _ACTIONS.get(resolved)
    if actions is None:
        actions = _ACTIONS[resolved] = dict(zip(PROTECTION_KEYS, resolved))  # shared: never written
    return actions


class ProtectionEngine:
    """Per-connection protection state: resolved actions, dedupe, repeat and global counters."""

    #: protections already reported (``detect`` logs the first event only) and the repeats not
    #: logged; shared empty ones until the first trigger, so a connection that never triggers
    #: anything (nearly all of them) holds neither
    reported: AbstractSet[str] = frozenset()
    repeats: Counter[str] = _NO_REPEATS

    def __init__(self, config: ProtectionsConfig, client_address: str | None) -> None:
        self.config = config
        resolved = tuple(config.get(key).action_for(client_address) for key in PROTECTION_KEYS)
        #: key -> action for this client; one read-only dict for every connection that resolves alike
        self.actions: Mapping[str, Action] = _shared_actions(resolved)

    def action(self, key: str) -> Action:
        return self.actions[key]

    def active(self, key: str) -> bool:
        return self.actions[key] is not Action.INACTIVE

    def trigger(self, key: str, command: str | Callable[[], str], **detail: Any) -> Trigger:
        """Record that ``key`` fired; in ``detect`` mode only the first event is logged.

        ``command`` may be a callable: the sample is then built only when an event is written,
        which keeps it off the per-line hot path.
        """
        action = self.actions[key]
        if action is Action.INACTIVE:
            return Trigger(action, None)
        if action is Action.DETECT and key in self.reported:
            if self.repeats is _NO_REPEATS:
                self.repeats = Counter()
            self.repeats[key] += 1
            return Trigger(action, None)
        if type(self.reported) is frozenset:
            self.reported = set()
        self.reported.add(key)  # type: ignore[attr-defined]
        sample = command() if callable(command) else command
        return Trigger(action, SecurityEvent(key, action, sample, dict(detail)))
