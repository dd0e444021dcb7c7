"""The AUTHORIZATION commands other than AUTH: CAPA, QUIT, STLS, USER, PASS, APOP."""

from __future__ import annotations

from pop3shield.core import actions as A
from pop3shield.core import grammar, responses
from pop3shield.core._base import State
from pop3shield.core.settings import Action

#: Dovecot's answer, word for word, to a login over plaintext when disable_plaintext_auth is set
PLAINTEXT_REFUSED = "Plaintext authentication disallowed on non-secure (SSL/TLS) connections."


class Authorization:
    """Mixin of :class:`~pop3shield.core.session.Session`: the commands before login."""

    #: the mechanism of the login under way, for the LoggedIn record (``USER``, ``APOP``, ``PLAIN``...)
    _login_mechanism: str | None

    def _stls_offered(self) -> bool:
        """STLS works here: a certificate, a transport that can, not yet TLS, the protection allows it."""
        return (self.settings.stls_available and self._can_starttls and not self.tls
                and self.engine.action("stls") is not Action.PREVENT)

    def _plaintext_refused(self) -> bool:
        """disable_plaintext_auth: no credentials before TLS, except from a secure (local) peer."""
        return self.settings.disable_plaintext_auth and not self.tls and not self._secure_peer

    def _refuse_plaintext(self) -> bool:
        """Answer a login command with Dovecot's refusal if it may not run here; True if refused."""
        if not self._plaintext_refused():
            return False
        self._error(PLAINTEXT_REFUSED, "AUTH")
        return True

    def _cmd_capa(self, args: tuple[bytes, ...]) -> None:
        caps = [b"CAPA", b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE"]
        if self.state is State.AUTHORIZATION and self._stls_offered():
            caps.append(b"STLS")
        if self.state is State.AUTHORIZATION and not self._plaintext_refused():
            caps.append(b"USER")
            if self.settings.sasl_mechanisms:
                caps.append(b"SASL " + " ".join(self.settings.sasl_mechanisms).encode("ascii"))
        if self.settings.implementation:
            caps.append(b"IMPLEMENTATION " + self.settings.implementation.encode("ascii", "replace"))
        self._send(responses.multiline(responses.ok("Capability list follows"), caps))

    def _cmd_quit_auth(self, args: tuple[bytes, ...]) -> None:
        self._send(responses.ok("Logging out."))
        self._close("quit")

    def _cmd_stls(self, args: tuple[bytes, ...]) -> None:
        """RFC 2595 section 4, where a certificate is configured and the protection does not prevent.

        The protection fires on every STLS (``detect``: an event, then the compliant answer); a
        refused STLS leaves the session open. Input pipelined after the line is never run: with
        ``non_compliant`` preventing, the client is refused and TLS never starts; otherwise the
        bytes are discarded and the handshake begins (the CVE-2011-0411 class of injection).
        """
        trigger = self.engine.trigger("stls", "STLS")
        if trigger.event is not None:
            self._out.append(A.Report(trigger.event))
        if trigger.prevents or not self.settings.stls_available or not (self._can_starttls or self.tls):
            self._error("STLS is not available.")
            return
        if self.tls:
            self._error("TLS is already active.")
            return
        if self.state is not State.AUTHORIZATION:
            self._error("STLS is only valid before login.")
            return
        pending = self._framer.buffered + (1 if self._framer.has_partial else 0)
        if pending:
            if self._violation("non_compliant", "Protocol violation.", reason="input pipelined after STLS",
                               octets=self._framer.buffered):
                return
            self._framer.discard_all()
        self._send(responses.ok("Begin TLS negotiation now."))
        self._ask(A.StartTLS())

    def _check_username(self, raw: bytes) -> str | None:
        """The NFC form of a user name that is valid UTF-8 and made of allowed characters, else
        a violation. The NFC form is what authentication, the maildrop and the logs see."""
        try:
            name: str | None = grammar.normalise_username(raw.decode("utf-8"))
        except UnicodeDecodeError:
            name = None
        problem = "user name is not UTF-8" if name is None else grammar.username_problem(
            name, self.limits.username_extra_chars)
        if problem is None:
            return name
        if not self._violation("non_compliant", "Invalid user name.", "AUTH", reason=problem):
            self._error("Invalid user name.", "AUTH")
        return None

    def _cmd_user(self, args: tuple[bytes, ...]) -> None:
        if self._refuse_plaintext():
            return
        name = self._check_username(args[0])
        if name is None:
            return
        self.user = name
        self._send(responses.ok())

    def _cmd_pass(self, args: tuple[bytes, ...]) -> None:
        if self._refuse_plaintext():
            return
        if self.user is None:
            self._error("No username given.")
            return
        self._authenticate(self.user, args[0], "USER")

    def _cmd_apop(self, args: tuple[bytes, ...]) -> None:
        if self.challenge is None:
            self._error("APOP is not enabled.")
            return
        if self._refuse_plaintext():
            return
        name = self._check_username(args[0])
        if name is None:
            return
        digest = args[1].lower()
        if len(digest) != 32 or any(c not in b"0123456789abcdef" for c in digest):
            if not self._violation("non_compliant", "Invalid APOP digest.", reason="malformed digest"):
                self._error("Invalid APOP digest.", "AUTH")
            return
        self.user = name
        self._authenticate(name, digest, "APOP", self.challenge)

    def _authenticate(self, user: str, secret: bytes, mechanism: str, challenge: bytes | None = None) -> None:
        self._login_mechanism = mechanism
        self._ask(A.Authenticate(user, secret, mechanism, challenge))
