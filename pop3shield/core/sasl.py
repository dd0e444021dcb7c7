"""SASL pieces for RFC 5034 AUTH: strict base64, PLAIN and LOGIN, and XOAUTH2/OAUTHBEARER.

XOAUTH2 and OAUTHBEARER (RFC 7628) are only ever relayed (upstream mode): they are parsed enough
to name the user for the protections and the routing, and the message passes on unchanged.

Strictness matters: a lenient base64 decoder is where smuggled bytes and parser differentials
hide, so anything that is not canonical base64 is refused.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field

_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")

#: LOGIN's prompts, base64 of "Username:" and "Password:" as every client expects
LOGIN_USER_PROMPT = b"VXNlcm5hbWU6"
LOGIN_PASSWORD_PROMPT = b"UGFzc3dvcmQ6"


class SaslError(ValueError):
    """The client's SASL data is malformed."""


@dataclass(frozen=True)
class PlainCredentials:
    """What PLAIN carries; ``authzid`` is empty or equal to ``authcid`` (unless ``authcid`` is blank)."""

    authzid: bytes
    authcid: bytes
    password: bytes


def decode_base64(data: bytes) -> bytes:
    """Decode canonical base64 only; ``=`` alone is the empty response (RFC 5034)."""
    if data == b"=":
        return b""
    if not _BASE64.match(data):
        raise SaslError("invalid base64")
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SaslError("invalid base64") from exc
    if base64.b64encode(decoded) != data:
        raise SaslError("non-canonical base64")
    return decoded


def parse_plain(message: bytes) -> PlainCredentials:
    """Split a PLAIN message ``authzid NUL authcid NUL passwd`` (RFC 4616).

    An empty (or blank) ``authcid`` is returned as it is whatever the ``authzid`` says: it is an
    empty user name, the session's ``empty_username`` business, not a malformed message.
    """
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise SaslError("PLAIN needs exactly two NUL separators")
    authzid, authcid, password = parts
    if authzid and authzid != authcid and authcid.strip(b" "):
        raise SaslError("proxy authorization is not supported")
    return PlainCredentials(authzid, authcid, password)


#: RFC 7628's key/value separator (also XOAUTH2's)
_KV = b"\x01"
#: the longest OAuth SASL message accepted (tokens are 1-3 KB; generous, still bounded)
MAX_OAUTH_MESSAGE = 16384


@dataclass(frozen=True)
class OAuthCredentials:
    """Who an XOAUTH2 or OAUTHBEARER message names; ``message`` is relayed as it is."""

    user: bytes
    message: bytes = field(repr=False)


def _bearer(pairs: list[bytes], mechanism: str) -> None:
    auth = [p for p in pairs if p.startswith(b"auth=")]
    if len(auth) != 1 or not auth[0].startswith(b"auth=Bearer ") or not auth[0][12:].strip(b" "):
        raise SaslError(f"{mechanism} needs one auth=Bearer token")
    for pair in pairs:
        if any(b < 0x20 or b == 0x7F for b in pair):
            raise SaslError(f"control characters in {mechanism} data")


def parse_xoauth2(message: bytes) -> OAuthCredentials:
    """``user=USER ^A auth=Bearer TOKEN ^A ^A`` (Google's and Microsoft's XOAUTH2)."""
    if len(message) > MAX_OAUTH_MESSAGE:
        raise SaslError("XOAUTH2 message too long")
    if not message.endswith(_KV + _KV):
        raise SaslError("XOAUTH2 must end with two ^A")
    pairs = message[:-2].split(_KV)
    if len(pairs) < 2 or not pairs[0].startswith(b"user="):
        raise SaslError("XOAUTH2 must start with user=")
    _bearer(pairs[1:], "XOAUTH2")
    if any(b < 0x20 or b == 0x7F for b in pairs[0]):
        raise SaslError("control characters in XOAUTH2 data")
    return OAuthCredentials(pairs[0][5:], message)


def parse_oauthbearer(message: bytes) -> OAuthCredentials:
    """RFC 7628: ``gs2-header ^A kvpairs ^A``; the user is the gs2 header's ``a=`` (required
    here: pop3shield needs the name before the upstream sees the token)."""
    if len(message) > MAX_OAUTH_MESSAGE:
        raise SaslError("OAUTHBEARER message too long")
    header, sep, rest = message.partition(_KV)
    if not sep or not rest.endswith(_KV + _KV) and not rest.endswith(_KV):
        raise SaslError("OAUTHBEARER needs a gs2 header and ^A-terminated pairs")
    fields = header.split(b",")
    if len(fields) != 3 or fields[0] not in (b"n", b"y") or fields[2] != b"":
        raise SaslError("OAUTHBEARER gs2 header must be 'n,a=USER,'")
    if not fields[1].startswith(b"a="):
        raise SaslError("OAUTHBEARER must name the user (a=USER)")
    user = fields[1][2:].replace(b"=2C", b",").replace(b"=3D", b"=")
    pairs = [p for p in rest.rstrip(_KV).split(_KV)]
    _bearer(pairs, "OAUTHBEARER")
    if any(b < 0x20 or b == 0x7F for b in user):
        raise SaslError("control characters in OAUTHBEARER data")
    return OAuthCredentials(user, message)
