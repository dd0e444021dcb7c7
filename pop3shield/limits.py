"""Limits that span connections: the brute-force delay and connection admission.

Both live as long as the server and are consulted by every connection, whatever the backend.
The counts that must agree across processes (failures per address, user and pair; connections
per address and per user and address) are kept by a :class:`pop3shield.state.IState`; what is
left here is policy and this process's own total.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["AddressLimits", "ConnectionLimits", "ConnectionPolicy", "FailureDelays"]

TOO_MANY = b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n"
TOO_MANY_FROM_ADDRESS = b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"
TOO_FAST_FROM_ADDRESS = b"-ERR [SYS/TEMP] Too many new connections from your address, try again later.\r\n"
STATE_UNAVAILABLE = b"-ERR [SYS/TEMP] Temporary server problem, try again later.\r\n"
#: what an evicted connection is told (Dovecot's login processes do the same when they are full)
EVICTED = b"-ERR [SYS/TEMP] Server full, disconnecting the oldest clients not logged in.\r\n"
#: seconds an evicted connection has to take that line before it is aborted
EVICTION_GRACE = 1.0


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

    def take_over(self) -> None:
        """Count a new connection in the place of one being evicted (it is counted until it has closed,
        within :data:`EVICTION_GRACE` seconds)."""
        self.connections += 1

    def release(self) -> None:
        """An admitted connection ended."""
        self.connections -= 1


@dataclass(frozen=True)
class AddressLimits:
    """What one client address may hold before login: connections at once, and new ones per second."""

    max_connections: int
    #: new connections per second (a token bucket refilled at this rate); 0: not limited
    rate: float
    #: the bucket's size: that many new connections at once after a quiet spell
    burst: int


class ConnectionPolicy:
    """The per-address limits, with per-network overrides (``server.connection_limits``), first match wins."""

    def __init__(self, default: AddressLimits, overrides: Iterable[tuple[tuple[Any, ...], AddressLimits]] = ()) -> None:
        self.default = default
        self.overrides = tuple(overrides)

    def for_address(self, address: str | None) -> AddressLimits:
        if not self.overrides or not address:
            return self.default
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return self.default
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for networks, limits in self.overrides:
            if any(net.version == ip.version and ip in net for net in networks):
                return limits
        return self.default
