"""The server certificate STLS hands to ``transport.startTLS``, re-read on SIGHUP.

Twisted's :class:`~twisted.internet.ssl.CertificateOptions` gives the safe defaults: TLS 1.2 at
least (``tls.min_version`` may raise it to 1.3), no TLS compression, the server's cipher order,
Twisted's cipher list (no RC4, no 3DES, no export or anonymous suites). The key is checked against
the certificate when the options are built, so a mismatched pair is refused at start-up, or on a
SIGHUP (then the previous certificate stays in use).
"""

from __future__ import annotations

import re
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from pop3shield.config import TLSConfig

__all__ = ["CertificateError", "ServerTLS", "load_options"]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.S)


class CertificateError(ValueError):
    """A certificate or key file that cannot serve: ``key`` names the setting, the text the problem."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(problem)
        self.key = key
        self.problem = problem


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise CertificateError(key, f"cannot read {path}: {exc.strerror or exc}") from None


def load_options(config: TLSConfig) -> ssl.CertificateOptions:
    """BLOCKING (reads the files): the options for ``startTLS``; raises :class:`CertificateError`."""
    assert config.certificate is not None
    data = _read("tls.certificate", config.certificate)
    blocks = _CERTIFICATE.findall(data)
    if not blocks:
        raise CertificateError("tls.certificate", f"{config.certificate}: no PEM certificate in it")
    try:
        chain = [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as exc:
        raise CertificateError("tls.certificate", f"{config.certificate}: not a valid certificate ({exc})") from None
    key_path = config.private_key or config.certificate
    key_name = "tls.private_key" if config.private_key else "tls.certificate"
    key_data = data if config.private_key is None else _read(key_name, key_path)
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise CertificateError(key_name, f"{key_path}: no readable PEM private key "
                                         f"(an encrypted key is not supported)") from None
    try:
        options = ssl.CertificateOptions(privateKey=key, certificate=chain[0], extraCertChain=chain[1:],
                                         raiseMinimumTo=_VERSIONS[config.min_version])
        options.getContext()  # builds the context now: the key must match the certificate
    except Exception as exc:  # noqa: BLE001 - OpenSSL's errors come in several types
        raise CertificateError(key_name, f"{key_path}: the private key does not fit the certificate "
                                         f"{config.certificate} ({exc})") from None
    return options


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The current options; :meth:`replace` swaps in a reloaded set (on the reactor).

    It is itself the connection creator handed to ``startTLS`` and to the implicit-TLS listeners
    that use ``[tls]``, so each new handshake takes the options current at that moment.
    """

    def __init__(self, config: TLSConfig, options: Any | None = None) -> None:
        self.config = config
        self.options = options if options is not None else load_options(config)

    def serverConnectionForTLS(self, protocol: Any) -> Any:
        """IOpenSSLServerConnectionCreator: a connection from the current options."""
        return self.options.serverConnectionForTLS(protocol)

    def replace(self, options: Any) -> None:
        """New handshakes use ``options``; sessions already in TLS keep theirs."""
        self.options = options
