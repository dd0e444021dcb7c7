"""What the core raises when the I/O layer drives it wrongly."""

from __future__ import annotations

__all__ = ["SessionMisuse"]


class SessionMisuse(RuntimeError):
    """The I/O layer called a result method out of turn (like h11's ``LocalProtocolError``).

    For example ``login_succeeded`` with no :class:`~pop3shield.core.actions.Authenticate`
    outstanding. This is a bug in the I/O layer, never something a peer can cause; once the
    session is closed, late results are expected and ignored instead.
    """

    def __init__(self, method: str, expected: str | None) -> None:
        self.method = method
        self.expected = expected
        waiting = f"the session waits for the result of {expected}" if expected else "nothing is outstanding"
        super().__init__(f"{method}() called out of turn: {waiting}")
