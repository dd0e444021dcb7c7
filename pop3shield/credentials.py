"""``twisted.cred`` credentials for POP3 logins: USER/PASS and SASL with the client's address, APOP.

Both carry the client's address (``client_address``) so that a checker can apply per-user
network rules (a passwd file's ``allow_nets``). ``None`` means the connection has no IP address
(a unix socket); the default of :class:`APOPCredentials`, "not given", passes no ``allow_nets`` entry.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from twisted.cred.credentials import IUsernameHashedPassword, UsernamePassword
from zope.interface import implementer

__all__ = ["APOPCredentials", "AddressedCredentials"]


class AddressedCredentials(UsernamePassword):
    """USER/PASS or SASL credentials plus the client's address (None: no IP, e.g. a unix socket)."""

    def __init__(self, username: bytes, password: bytes, client_address: str | None, standing: int = 1) -> None:
        super().__init__(username, password)
        self.client_address = client_address
        #: the attempt's place in the hashing queue (pop3shield.hashpool: 0 trusted, 1 clean, 2 suspect)
        self.standing = standing

    def __repr__(self) -> str:  # never the password
        return f"<AddressedCredentials {self.username!r} from {self.client_address!r}>"


@implementer(IUsernameHashedPassword)
class APOPCredentials:
    """RFC 1939 APOP: the digest is MD5(challenge + password), checkable only against a plaintext secret."""

    def __init__(self, username: bytes, challenge: bytes, digest: bytes, client_address: Any = "not given") -> None:
        self.username = username
        self.challenge = challenge
        self.digest = digest
        self.client_address = client_address  # None: no IP address; not given: no allow_nets entry passes

    def __repr__(self) -> str:  # never the digest
        return f"<APOPCredentials {self.username!r} from {self.client_address!r}>"

    def checkPassword(self, password: bytes) -> bool:
        expected = hashlib.md5(self.challenge + password).hexdigest().encode("ascii")
        return hmac.compare_digest(expected, self.digest)
