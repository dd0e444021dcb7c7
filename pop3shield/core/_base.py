"""Names every part of the session shares: its states and what it needs of a message."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Hashable, Protocol

#: a line in ``detect`` mode may grow to this before it is discarded anyway (memory is bounded)
HARD_LINE_LIMIT = 8192


class State(enum.Enum):
    AUTHORIZATION = "authorization"
    SASL = "sasl"
    TRANSACTION = "transaction"
    UPDATE = "update"
    CLOSED = "closed"

    # members are singletons compared by identity: hashed by identity too, at C speed (Enum's
    # __hash__ is a Python function, and (state, keyword) is looked up for every command line)
    __hash__ = object.__hash__


class MessageEntry(Protocol):
    """What the session needs of a message in the maildrop."""

    key: Hashable
    uid: str
    size: int


#: the malicious-code detector's fast tier: a verdict, or None to ask for the slow tier
QuickCheck = Callable[[bytes, str], Any]
