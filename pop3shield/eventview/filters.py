"""What the operator asked to see: a time range, protections, sources (addresses or networks), users."""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pop3shield.eventview.reader import Record, parse_time

_RELATIVE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$")
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_when(text: str, now: Callable[[], float] = time.time) -> float:
    """``2026-12-04T18:00:00Z``, ``2026-12-04`` (UTC when no offset) or ``30m``/``1h``/``2d`` ago."""
    match = _RELATIVE.match(text)
    if match:
        return now() - float(match.group(1)) * _UNITS[match.group(2).lower()]
    when = parse_time(text.strip())
    if when is None:
        raise ValueError(f"{text!r} is neither an ISO 8601 time nor a relative one like 30m, 1h, 2d")
    return when


def parse_source(text: str) -> Network:
    """An address or a CIDR network (host bits allowed: 192.0.2.7/24 means 192.0.2.0/24)."""
    try:
        return ipaddress.ip_network(text.strip().strip("[]"), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or network") from None


def _address(value: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        address = ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a tcp6 listener reports IPv4 clients as ::ffff:a.b.c.d
    return address


def client_address(record: Record) -> str | None:
    client = record.data.get("client")
    address = client.get("address") if isinstance(client, dict) else None
    return address if isinstance(address, str) else None


def record_user(record: Record) -> str | None:
    user = record.data.get("user")
    return user if isinstance(user, str) else None


@dataclass
class Filter:
    """Every given condition must hold; a list (protections, sources, users) means any of them.

    ``security`` records carry all the fields. A ``summary`` record (detect-mode repeats of a
    connection) has a client and a user and its repeats per protection: with ``protections``,
    only those repeats count. A ``rate-limit`` record has no user and no protection: it is shown
    only when neither is asked for.
    """

    since: float | None = None
    until: float | None = None
    protections: Sequence[str] = ()
    sources: Sequence[Network] = ()
    users: Sequence[str] = ()
    _source_cache: dict[str, bool] = field(default_factory=dict, repr=False)

    def matches(self, record: Record) -> bool:
        if self.since is not None or self.until is not None:
            if record.when is None:
                return False
            if self.since is not None and record.when < self.since:
                return False
            if self.until is not None and record.when > self.until:
                return False
        kind = record.type
        if self.protections:
            if kind == "security":
                if record.data.get("protection") not in self.protections:
                    return False
            elif kind == "summary":
                repeats = record.data.get("repeats")
                if not isinstance(repeats, dict) or not any(p in repeats for p in self.protections):
                    return False
            else:
                return False
        if self.users:
            if kind == "rate-limit" or record_user(record) not in self.users:
                return False
        if self.sources and not self._source_matches(client_address(record)):
            return False
        return True

    def _source_matches(self, text: str | None) -> bool:
        if text is None:
            return False
        cached = self._source_cache.get(text)
        if cached is None:
            address = _address(text)
            cached = address is not None and any(address.version == net.version and address in net
                                                 for net in self.sources)
            if len(self._source_cache) >= 4096:
                self._source_cache.clear()  # bounded: the attacker picks the addresses
            self._source_cache[text] = cached
        return cached
