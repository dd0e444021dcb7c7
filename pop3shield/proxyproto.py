"""The PROXY protocol (v1 and v2) header, read before a session starts, from trusted proxies only.

Twisted's ``haproxy:`` endpoint wraps the protocol and calls its ``connectionMade`` before the
header has arrived, so the greeting, admission and every per-address decision would use the
proxy's address. Here the protocol holds everything until :class:`HeaderReader` has the whole
header; the parsing itself is Twisted's sans-I/O ``V1Parser`` / ``V2Parser``.

:class:`HeaderReader` is sans-I/O too: ``feed(bytes)`` returns ``None`` until the header is
complete, then a :class:`ProxyHeader`; anything that is not a well-formed header raises
:class:`BadHeader` with a short reason fit for a log line (never the bytes themselves).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser

__all__ = ["BadHeader", "HeaderReader", "ProxyHeader", "TrustedProxies"]

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = V2Parser.PREFIX
#: v1: "the maximum line length is 107 bytes including the CRLF"
V1_MAX = 107
#: v2: 16 fixed bytes, 36 of IPv6 addresses, TLVs; HAProxy's own TLVs fit well within this
V2_MAX = 16 + 1024


class BadHeader(Exception):
    """Not a valid PROXY header; ``str()`` is the reason for the log line."""


@dataclass(frozen=True)
class ProxyHeader:
    """What the proxy says: the client's address and port, and the address it connected to.

    ``source`` is ``None`` for a v2 LOCAL command or a v1 ``UNKNOWN`` (the proxy's own
    connection, e.g. a health check): the connection's real peer is then the client.
    """

    version: int
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    #: bytes that followed the header: the client's first POP3 input
    remaining: bytes = field(default=b"", repr=False)


def _address(value: object) -> tuple[str, int] | None:
    if value is None:
        return None
    host, port = getattr(value, "host", None), getattr(value, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        raise BadHeader("not a TCP address")  # e.g. v2 AF_UNIX: no client address to act on
    try:
        parsed = ipaddress.ip_address(host)
    except ValueError:
        raise BadHeader("malformed address") from None
    if not 0 <= port <= 65535:
        raise BadHeader("port out of range")
    mapped = parsed.ipv4_mapped if parsed.version == 6 else None
    return (str(mapped or parsed), port)


class HeaderReader:
    """Collects the bytes of one PROXY header (v1 or v2), bounded in size."""

    def __init__(self) -> None:
        self._buffer = b""
        self._version: int | None = None

    def feed(self, data: bytes) -> ProxyHeader | None:
        self._buffer += data
        buffer = self._buffer
        if self._version is None:
            if buffer[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(buffer)] and len(buffer) < len(V2_SIGNATURE):
                return None  # could still become a v2 signature
            if buffer[:len(V1_SIGNATURE)] == V1_SIGNATURE[:len(buffer)] and len(buffer) < len(V1_SIGNATURE):
                return None
            if buffer.startswith(V2_SIGNATURE):
                self._version = 2
            elif buffer.startswith(V1_SIGNATURE):
                self._version = 1
            else:
                raise BadHeader("no PROXY header")
        if self._version == 1:
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) >= V1_MAX:
                    raise BadHeader("v1 header longer than 107 bytes")
                return None
            if end + 2 > V1_MAX:
                raise BadHeader("v1 header longer than 107 bytes")
            if buffer[:end] == b"PROXY UNKNOWN" or buffer.startswith(b"PROXY UNKNOWN "):
                self._buffer = b""  # the spec's bare form, which V1Parser does not take
                return ProxyHeader(1, None, None, buffer[end + 2:])
            parser: V1Parser | V2Parser = V1Parser()
        else:
            if len(buffer) < 16:
                return None
            size = 16 + int.from_bytes(buffer[14:16], "big")
            if size > V2_MAX:
                raise BadHeader(f"v2 header of {size} bytes (at most {V2_MAX})")
            if len(buffer) < size:
                return None
            parser = V2Parser()
        try:
            info, remaining = parser.feed(buffer)
        except Exception as exc:  # InvalidProxyHeader and its kin; int()/decode() ValueErrors in V1Parser
            raise BadHeader(f"malformed v{self._version} header ({type(exc).__name__})") from None
        if info is None:  # cannot happen: the whole header was handed over
            raise BadHeader(f"incomplete v{self._version} header")
        self._buffer = b""
        return ProxyHeader(self._version, _address(info.source), _address(info.destination), remaining or b"")


def looks_like_header(data: bytes) -> bool:
    """Whether a connection's first bytes start a PROXY header (v1 or v2)."""
    return data.startswith(V1_SIGNATURE) or data.startswith(V2_SIGNATURE[:8])


class TrustedProxies:
    """The networks whose connections must start with a PROXY header."""

    def __init__(self, networks: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> None:
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        if not self.networks or not isinstance(address, str):
            return False
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return False
        mapped = parsed.ipv4_mapped if parsed.version == 6 else None
        parsed = mapped or parsed
        return any(parsed.version == net.version and parsed in net for net in self.networks)
