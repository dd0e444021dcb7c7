"""Typed settings the sans-I/O core runs on.

The config loader (``pop3shield.config``) builds these from TOML; tests build them directly.
Keeping them here, free of Twisted and file handling, lets the core and the fuzzers run on
nothing but these values.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Action(str, enum.Enum):
    """What a protection does when it triggers."""

    PREVENT = "prevent"
    DETECT = "detect"
    INACTIVE = "inactive"


PROTECTION_KEYS: tuple[str, ...] = (
    "empty_username",
    "empty_password",
    "non_compliant",
    "stls",
    "malicious_code",
    "max_bad_commands",
    "max_line_length",
    "max_commands",
)

#: Characters allowed in a user name besides letters and digits of any script.
DEFAULT_USERNAME_EXTRA = ".-_@+="


def _normalise_address(address: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parse a peer address; an IPv4-mapped IPv6 address counts as its IPv4 address."""
    if not address:
        return None
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class Override:
    """Another action for clients in these networks (a monitoring host, a trusted relay)."""

    networks: tuple[IPNetwork, ...]
    action: Action

    def matches(self, address: str | None) -> bool:
        ip = _normalise_address(address)
        if ip is None:
            return False
        return any(ip.version == net.version and ip in net for net in self.networks)


@dataclass(frozen=True)
class ProtectionSettings:
    """The action of one protection, with per-source overrides (first match wins)."""

    action: Action = Action.PREVENT
    overrides: tuple[Override, ...] = ()

    def action_for(self, address: str | None) -> Action:
        for override in self.overrides:
            if override.matches(address):
                return override.action
        return self.action


@dataclass(frozen=True)
class ProtectionsConfig:
    """All eight protections and their thresholds."""

    empty_username: ProtectionSettings = ProtectionSettings()
    empty_password: ProtectionSettings = ProtectionSettings()
    non_compliant: ProtectionSettings = ProtectionSettings()
    stls: ProtectionSettings = ProtectionSettings()
    malicious_code: ProtectionSettings = ProtectionSettings()
    max_bad_commands: ProtectionSettings = ProtectionSettings()
    max_line_length: ProtectionSettings = ProtectionSettings()
    max_commands: ProtectionSettings = ProtectionSettings()
    #: more -ERR replies than this in one connection is a violation
    bad_commands_limit: int = 10
    #: octets including CRLF (RFC 2449: at least 255 must be accepted)
    line_length_limit: int = 255
    #: octets including CRLF of a SASL continuation line (AUTH PLAIN blobs can be long)
    sasl_line_limit: int = 2048
    #: commands before login (CAPA, USER, PASS, AUTH and their retries need a handful)
    commands_limit: int = 50
    #: commands after login: ``commands_after_login + commands_per_message * messages``, counted
    #: from the login on; the per-message part covers LIST n, UIDL n, TOP n, RETR n and DELE n
    commands_after_login: int = 1000
    commands_per_message: int = 5
    #: a bare-LF line ending becomes a non_compliant violation
    strict_crlf: bool = False
    #: "bad_command" (an -ERR that counts) or "violation" (non_compliant)
    unknown_commands: str = "bad_command"
    #: characters allowed in user names besides letters and digits of any script
    username_extra_chars: str = DEFAULT_USERNAME_EXTRA

    def commands_after_login_limit(self, messages: int) -> int:
        """The ``max_commands`` limit of a session logged in to a maildrop of ``messages``."""
        return self.commands_after_login + self.commands_per_message * messages

    def get(self, key: str) -> ProtectionSettings:
        if key not in PROTECTION_KEYS:
            raise KeyError(key)
        settings: ProtectionSettings = getattr(self, key)
        return settings


@dataclass(frozen=True)
class SessionSettings:
    """Everything one POP3 session needs to know about the server it runs in."""

    hostname: str = "localhost"
    #: IMPLEMENTATION capability text; None advertises nothing (no fingerprint)
    implementation: str | None = None
    #: APOP is off by default: it needs plaintext-equivalent secrets
    apop: bool = False
    #: SASL mechanisms offered, in CAPA order
    sasl_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    #: hard cap on buffered, not yet processed input (always on, whatever the protections say)
    input_buffer_limit: int = 65536
    protections: ProtectionsConfig = field(default_factory=ProtectionsConfig)
    #: a certificate is configured: STLS may be offered (when the ``stls`` protection allows it)
    stls_available: bool = False
    #: Dovecot's disable_plaintext_auth: USER/PASS, APOP and AUTH only over TLS
    disable_plaintext_auth: bool = False
    #: with disable_plaintext_auth, loopback (and connections without an IP address) count as secure
    plaintext_auth_loopback: bool = True
