"""The AUTHORIZATION commands other than AUTH: CAPA, QUIT, STLS, USER, PASS, APOP."""

from __future__ import annotations

from pop3shield.core import actions as A
from pop3shield.core import grammar, responses
from pop3shield.core._base import State


class Authorization:
    """Mixin of :class:`~pop3shield.core.session.Session`: the commands before login."""

    #: the mechanism of the login under way, for the LoggedIn record (``USER``, ``APOP``, ``PLAIN``...)
    _login_mechanism: str | None

    def _cmd_capa(self, args: tuple[bytes, ...]) -> None:
        caps = [b"CAPA", b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING", b"AUTH-RESP-CODE"]
        if self.state is State.AUTHORIZATION:
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
        """STLS is not offered; the session stays open whatever the protection's action."""
        trigger = self.engine.trigger("stls", "STLS")
        if trigger.event is not None:
            self._out.append(A.Report(trigger.event))
        self._error("STLS is not available.")

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
        name = self._check_username(args[0])
        if name is None:
            return
        self.user = name
        self._send(responses.ok())

    def _cmd_pass(self, args: tuple[bytes, ...]) -> None:
        if self.user is None:
            self._error("No username given.")
            return
        self._authenticate(self.user, args[0], "USER")

    def _cmd_apop(self, args: tuple[bytes, ...]) -> None:
        if self.challenge is None:
            self._error("APOP is not enabled.")
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
