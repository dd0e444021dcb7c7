"""Limits that span connections: the brute-force delay and connection admission.

Both live as long as the server and are consulted by every connection, whatever the backend.
The counts that must agree across processes (failures per address, user and pair; connections
per address and per user and address) are kept by a :class:`pop3shield.state.IState`; what is
left here is policy and this process's own total.
"""

from __future__ import annotations

__all__ = ["ConnectionLimits", "FailureDelays"]

TOO_MANY = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
TOO_MANY_FROM_ADDRESS = b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"
STATE_UNAVAILABLE = b"-ERR [SYS/TEMP] Temporary server problem, try again later.\r\n"


class FailureDelays:
    """Brute-force brake: the answer to a failed login waits base x 2^(level-1) seconds, capped.

    The level is the largest failure count of the address, the user name and the pair
    (:meth:`pop3shield.state.IState.failed`), so a brute force spread over processes that share
    the state meets one penalty.
    """

    def __init__(self, base: float, ceiling: float) -> None:
        self.base = base
        self.ceiling = ceiling

    def delay(self, level: int) -> float:
        if self.base <= 0 or level <= 0:
            return 0.0
        return min(self.base * 2 ** min(level - 1, 64), self.ceiling)


class ConnectionLimits:
    """This process's open connections against ``max_connections`` (sockets and memory are per process)."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.connections = 0

    def admit(self) -> bytes | None:
        """Count a new connection; the refusal line if the limit is reached."""
        if self.connections >= self.max_connections:
            return TOO_MANY
        self.connections += 1
        return None

    def release(self) -> None:
        """An admitted connection ended."""
        self.connections -= 1
