"""SASL pieces for RFC 5034 AUTH: strict base64 and the PLAIN and LOGIN mechanisms.

Strictness matters: a lenient base64 decoder is where smuggled bytes and parser differentials
hide, so anything that is not canonical base64 is refused.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

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
