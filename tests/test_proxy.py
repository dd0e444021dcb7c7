"""PROXY protocol v1/v2 from trusted networks: the header comes first, everything else waits for it.

The reader is tested on exact bytes (HAProxy's own v2 layout, built here with struct); the
protocol with StringTransport and a Clock: no greeting, no admission, no session before the
header; the client's address from the header in the session, the per-address limit and the
events; a bad, late or untrusted header closes without a POP3 byte.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from pop3shield.config import ConfigError, parse_config
from pop3shield.core.settings import Action, Override, ProtectionSettings, ProtectionsConfig
from pop3shield.proxyproto import V2_SIGNATURE, BadHeader, HeaderReader, TrustedProxies
from tests.test_protocol import connect, mailroot, make_factory, take  # noqa: F401 (fixture)

PROXY_NET = (ipaddress.ip_network("10.0.0.0/8"),)


def v2(source: str, sport: int, dest: str = "192.0.2.1", dport: int = 110, *, command: int = 1,
       tlvs: bytes = b"") -> bytes:
    """A v2 header the way HAProxy writes it (TCP over IPv4 or IPv6)."""
    if ":" in source:
        family, body = 0x21, socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, dest)
    else:
        family, body = 0x11, socket.inet_aton(source) + socket.inet_aton(dest)
    body += struct.pack("!HH", sport, dport) + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


# --------------------------------------------------------------------------- the reader


def test_v1_header_gives_the_client_and_the_bytes_after_it() -> None:
    header = HeaderReader().feed(b"PROXY TCP4 198.51.100.9 192.0.2.1 51000 110\r\nCAPA\r\n")
    assert header is not None
    assert (header.version, header.source, header.destination) == (1, ("198.51.100.9", 51000), ("192.0.2.1", 110))
    assert header.remaining == b"CAPA\r\n"


def test_v2_header_byte_by_byte() -> None:
    reader = HeaderReader()
    data = v2("2001:db8::7", 40001, "2001:db8::1", 995) + b"USER a\r\n"
    for byte in data[:-9]:
        assert reader.feed(bytes([byte])) is None
    header = reader.feed(data[-9:])
    assert header is not None
    assert header.source == ("2001:db8::7", 40001) and header.destination == ("2001:db8::1", 995)
    assert header.remaining == b"USER a\r\n"


def test_v2_with_tlvs_and_v4_mapped_source() -> None:
    tlv = bytes([0x04]) + struct.pack("!H", 3) + b"\x00\x00\x00"  # PP2_TYPE_NOOP
    header = HeaderReader().feed(v2("::ffff:198.51.100.4", 1, "::ffff:192.0.2.1", 110, tlvs=tlv))
    assert header is not None and header.source == ("198.51.100.4", 1)


def test_v2_local_and_v1_unknown_name_no_client() -> None:
    local = HeaderReader().feed(v2("0.0.0.0", 0, "0.0.0.0", 0, command=0))
    assert local is not None and local.source is None
    unknown = HeaderReader().feed(b"PROXY UNKNOWN\r\n")
    assert unknown is not None and unknown.source is None


@pytest.mark.parametrize("data, reason", [
    (b"USER alice\r\n", "no PROXY header"),
    (b"PROXY TCP4 198.51.100.9 192.0.2.1 51000\r\n", "malformed v1"),
    (b"PROXY TCP4 198.51.100.9 192.0.2.1 port 110\r\n", "malformed v1"),
    (b"PROXY TCP4 not-an-address 192.0.2.1 1 110\r\n", "malformed address"),
    (b"PROXY TCP4 198.51.100.9 192.0.2.1 70000 110\r\n", "port out of range"),
    (b"PROXY TCP9 198.51.100.9 192.0.2.1 1 2\r\n", "malformed v1"),
    (b"PROXY TCP4 " + b"1" * 120, "longer than 107"),
    (b"PROXY TCP4 198.51.100.9 192.0.2.1 51000 110" + b" " * 70 + b"\r\n", "longer than 107"),
    (V2_SIGNATURE + b"\x30\x11\x00\x0c" + b"\x00" * 12, "malformed v2"),  # version 3
    (V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\x00" * 4, "malformed v2"),  # too short for TCP4
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "v2 header of 65551 bytes"),
    (V2_SIGNATURE + b"\x21\x31\x00\xd8" + b"/x".ljust(216, b"\x00"), "not a TCP address"),  # AF_UNIX
])
def test_malformed_headers_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(BadHeader, match=reason):
        HeaderReader().feed(data)


def test_trusted_proxies_match_v4_mapped_peers() -> None:
    trusted = TrustedProxies(PROXY_NET)
    assert "10.1.2.3" in trusted and "::ffff:10.1.2.3" in trusted
    assert "192.0.2.7" not in trusted and None not in trusted and "not-an-ip" not in trusted
    assert not TrustedProxies()


# --------------------------------------------------------------------------- the protocol


def events(root: Path) -> list[dict]:
    path = root / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_greeting_admission_and_session_wait_for_the_header(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, proxy_protocol_networks=PROXY_NET, max_connections_per_ip=1)
    proto, transport = connect(factory, host="10.0.0.5")
    assert transport.value() == b"" and proto.session is None and factory.limits.connections == 0
    proto.dataReceived(b"PROXY TCP4 198.51.100.9 192.0.2.1 51000 110\r")
    assert transport.value() == b"" and proto.session is None
    proto.dataReceived(b"\nUSER alice\r\nPASS secret-pw\r\n")
    assert take(transport).startswith(b"+OK ")
    assert proto.client_address == "198.51.100.9" and proto.session is not None
    # the client's address, not the proxy's
    assert factory.state.count("user:alice\x00198.51.100.9") == 1 and factory.state.count("addr:10.0.0.5") == 0
    assert proto.session.user == "alice" and proto.mailbox is not None
    # a second client through the same proxy is a different address: admitted
    second, transport2 = connect(factory, host="10.0.0.5", port=40001)
    second.dataReceived(v2("198.51.100.10", 52000))
    assert take(transport2).startswith(b"+OK ")
    # and the same client again meets its own per-address limit
    third, transport3 = connect(factory, host="10.0.0.5", port=40002)
    third.dataReceived(v2("198.51.100.10", 52001))
    assert take(transport3) == b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"


def test_events_carry_the_client_address_from_the_header(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, proxy_protocol_networks=PROXY_NET)
    proto, transport = connect(factory, host="10.0.0.5")
    proto.dataReceived(b"PROXY TCP4 198.51.100.9 192.0.2.1 51000 110\r\n")
    proto.dataReceived(b"USER " + b"A" * 300 + b"\r\n")  # a line_length violation: an event
    proto.connectionLost(None)
    found = events(mailroot)
    assert found and all(e["client"] == {"address": "198.51.100.9", "port": 51000} for e in found)


def test_per_address_overrides_use_the_client_address(mailroot: Path) -> None:
    clock = Clock()
    protections = ProtectionsConfig(max_commands=ProtectionSettings(
        Action.PREVENT, overrides=(Override(networks=(ipaddress.ip_network("198.51.100.0/24"),),
                                            action=Action.INACTIVE),)))
    factory = make_factory(mailroot, clock, protections, proxy_protocol_networks=PROXY_NET)
    proto, transport = connect(factory, host="10.0.0.5")
    proto.dataReceived(v2("198.51.100.9", 1))
    assert proto.session is not None
    assert proto.session.engine.actions["max_commands"] is Action.INACTIVE
    other, transport2 = connect(factory, host="10.0.0.5", port=40001)
    other.dataReceived(v2("203.0.113.9", 1))
    assert other.session.engine.actions["max_commands"] is Action.PREVENT


def test_local_command_keeps_the_proxy_as_client(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, proxy_protocol_networks=PROXY_NET)
    proto, transport = connect(factory, host="10.0.0.5")
    proto.dataReceived(v2("0.0.0.0", 0, "0.0.0.0", 0, command=0))
    assert take(transport).startswith(b"+OK ") and proto.client_address == "10.0.0.5"


@pytest.mark.parametrize("data", [b"USER alice\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 x y\r\n",
                                  V2_SIGNATURE + b"\x20\x11\xff\xff"])
def test_bad_header_from_a_trusted_proxy_closes_without_a_byte(mailroot: Path, data: bytes) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, proxy_protocol_networks=PROXY_NET)
    proto, transport = connect(factory, host="10.0.0.5")
    with capturedLogs() as logged:
        proto.dataReceived(data)
    assert transport.value() == b"" and transport.disconnecting and proto.session is None
    lines = [formatEvent(e) for e in logged if e.get("log_namespace") == "pop3shield.server"]
    assert len(lines) == 1 and lines[0].startswith(f"session {proto.session_id} refused: PROXY header from "
                                                   f"10.0.0.5:40000: "), lines
    assert repr(data[:12])[2:-1] not in lines[0]  # the reason, not the bytes
    assert factory.limits.connections == 0
    proto.connectionLost(None)
    assert factory.limits.connections == 0


def test_no_header_in_time_closes_without_a_byte(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, proxy_protocol_networks=PROXY_NET, proxy_protocol_timeout=3.0)
    proto, transport = connect(factory, host="10.0.0.5")
    proto.dataReceived(b"PROXY TCP4 ")  # a slow trickle does not extend the deadline
    clock.advance(2.9)
    proto.dataReceived(b"198")
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.value() == b"" and transport.disconnecting and proto.session is None
    proto.connectionLost(None)
    assert not clock.getDelayedCalls()


def test_header_from_an_untrusted_peer_is_refused(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, proxy_protocol_networks=PROXY_NET)
    proto, transport = connect(factory, host="192.0.2.7")
    assert take(transport).startswith(b"+OK ")  # an ordinary client: greeted at once
    proto.dataReceived(b"PROXY TCP4 198.51.100.9 192.0.2.1 51000 110\r\nUSER alice\r\n")
    assert take(transport) == b"" and transport.disconnecting
    assert proto.client_address == "192.0.2.7"
    proto.connectionLost(None)
    assert factory.limits.connections == 0


def test_untrusted_v2_header_is_refused_and_no_proxy_networks_means_no_header(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock)
    proto, transport = connect(factory, host="10.0.0.5")
    assert take(transport).startswith(b"+OK ")
    proto.dataReceived(v2("198.51.100.9", 1))
    assert take(transport) == b"" and transport.disconnecting


def test_proxied_client_logs_in_and_pipelined_input_after_header_is_kept(mailroot: Path) -> None:
    clock = Clock()
    factory = make_factory(mailroot, clock, proxy_protocol_networks=PROXY_NET)
    proto, transport = connect(factory, host="10.0.0.5")
    proto.dataReceived(v2("198.51.100.9", 51000) + b"USER alice\r\n")
    greeting, reply = take(transport).split(b"\r\n", 1)
    assert greeting.startswith(b"+OK ") and reply.startswith(b"+OK") and reply.endswith(b"\r\n")
    proto.dataReceived(b"PASS secret-pw\r\n")
    assert take(transport) == b"+OK Logged in, 2 messages (58 octets).\r\n"


# --------------------------------------------------------------------------- configuration


AUTH = {"auth": {"realm": "pop3shield.realm:MaildirRealm"}}


def test_config_keys() -> None:
    config = parse_config({"server": {"proxy_protocol_networks": ["127.0.0.0/8", "::1/128"],
                                      "proxy_protocol_timeout": 2}, **AUTH}, "p.toml", ".")
    assert config.server.proxy_protocol_networks == (ipaddress.ip_network("127.0.0.0/8"),
                                                     ipaddress.ip_network("::1/128"))
    assert config.server.proxy_protocol_timeout == 2.0
    assert parse_config(AUTH, "p.toml", ".").server.proxy_protocol_networks == ()


@pytest.mark.parametrize("server, message", [
    ({"proxy_protocol_networks": ["10.0.0.1/8"]},
     "p.toml: server.proxy_protocol_networks[0]: '10.0.0.1/8' has host bits set (did you mean '10.0.0.0/8'?)"),
    ({"proxy_protocol_networks": "10.0.0.0/8"}, "p.toml: server.proxy_protocol_networks: "),
    ({"proxy_protocol_networks": ["10.0.0.0/8"], "listen": ["tcp:110", "haproxy:tcp:1110"]},
     "p.toml: server.listen[1]: a 'haproxy:' endpoint reads the PROXY header itself, from any peer; "
     "with server.proxy_protocol_networks use a 'tcp:' endpoint"),
    ({"proxy_protocol_timeout": 0}, "p.toml: server.proxy_protocol_timeout: must be greater than 0, got 0"),
    ({"proxy_protocol_timeout": 61}, "p.toml: server.proxy_protocol_timeout: must be at most 60 seconds, got 61"),
])
def test_config_errors(server: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"server": server, **AUTH}, "p.toml", ".")
    assert str(info.value).startswith(message)
