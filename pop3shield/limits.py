"""Limits that span connections: the brute-force delay and connection admission.

Both live as long as the server and are consulted by every connection, whatever the backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["ConnectionLimits", "FailureDelays"]


class FailureDelays:
    """Brute-force brake: each failed login from an address doubles the wait before the answer."""

    def __init__(self, base: float, ceiling: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.base = base
        self.ceiling = ceiling
        self.clock = clock
        self._failures: dict[str, tuple[int, float]] = {}

    def failed(self, address: str) -> float:
        """Record a failure; return the delay to apply before answering it."""
        now = self.clock()
        count, last = self._failures.get(address, (0, now))
        if now - last > 15 * 60:
            count = 0
        count += 1
        self._failures[address] = (count, now)
        if len(self._failures) > 50000:
            self._forget(now)
        if self.base <= 0:
            return 0.0
        return min(self.base * 2 ** (count - 1), self.ceiling)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def _forget(self, now: float) -> None:
        for address in [a for a, (_, last) in self._failures.items() if now - last > 15 * 60]:
            del self._failures[address]


class ConnectionLimits:
    """How many connections are open, overall and per client address; admits or refuses new ones."""

    def __init__(self, max_connections: int, max_connections_per_ip: int) -> None:
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.connections = 0
        self.per_ip: dict[str | None, int] = {}

    def admit(self, address: str | None) -> bytes | None:
        """Count a new connection; the refusal line if a limit is reached."""
        if self.connections >= self.max_connections:
            return b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
        if self.per_ip.get(address, 0) >= self.max_connections_per_ip:
            return b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"
        self.connections += 1
        self.per_ip[address] = self.per_ip.get(address, 0) + 1
        return None

    def release(self, address: str | None) -> None:
        """An admitted connection ended."""
        self.connections -= 1
        left = self.per_ip.get(address, 1) - 1
        if left > 0:
            self.per_ip[address] = left
        else:
            self.per_ip.pop(address, None)
