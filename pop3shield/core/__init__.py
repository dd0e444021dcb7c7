"""The sans-I/O core: framing, grammar, session state machine, protections.

Nothing under this package may import Twisted, the operating system, the clock or any other part
of pop3shield; tests/core/test_sans_io.py enforces it.
"""

from pop3shield.core import actions
from pop3shield.core.errors import SessionMisuse
from pop3shield.core.session import COMMANDS, HARD_LINE_LIMIT, MessageEntry, QuickCheck, Session, State
from pop3shield.core.settings import SessionSettings

__all__ = [
    "COMMANDS",
    "HARD_LINE_LIMIT",
    "MessageEntry",
    "QuickCheck",
    "Session",
    "SessionMisuse",
    "SessionSettings",
    "State",
    "actions",
]
