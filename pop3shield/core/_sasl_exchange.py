"""The RFC 5034 AUTH exchange: PLAIN, LOGIN and (relayed) XOAUTH2/OAUTHBEARER, strict base64,
empty identities refused."""

from __future__ import annotations

from pop3shield.core import responses, sasl
from pop3shield.core._base import State
from pop3shield.core.framing import Line


class SaslExchange:
    """Mixin of :class:`~pop3shield.core.session.Session`: AUTH and its continuation lines."""

    #: the mechanism of the AUTH exchange in progress (None outside one)
    _sasl_exchange: str | None
    #: LOGIN's user name, between its two continuation lines
    _sasl_user: bytes | None

    def _cmd_auth(self, args: tuple[bytes, ...]) -> None:
        if self._refuse_plaintext():  # Authorization's, in the Session
            return
        if not args:
            mechs = [m.encode("ascii") for m in self.settings.sasl_mechanisms]
            self._send(responses.multiline(responses.ok("Supported mechanisms follow"), mechs))
            return
        mechanism = args[0].upper().decode("ascii", "replace")
        if mechanism not in self.settings.sasl_mechanisms:
            self._error("Unsupported authentication mechanism.")
            return
        self._sasl_exchange = mechanism
        self._sasl_user = None
        if len(args) == 1:
            self._enter_sasl(sasl.LOGIN_USER_PROMPT if mechanism == "LOGIN" else b"")
            return
        self.state = State.SASL
        self._sasl_response(Line(args[1], bare_lf=False))

    def _enter_sasl(self, prompt: bytes) -> None:
        self.state = State.SASL
        self._send(responses.continuation(prompt))

    def _sasl_fail(self, text: str, code: str | None = None) -> None:
        self.state = State.AUTHORIZATION
        self._sasl_exchange = None
        self._error(text, code)

    def _sasl_response(self, line: Line) -> None:
        """One client line of an AUTH exchange (initial response or continuation)."""
        data = line.content
        if data == b"*":
            self._sasl_fail("Authentication cancelled.")
            return
        try:
            decoded = sasl.decode_base64(data)
        except sasl.SaslError as exc:
            if not self._violation("non_compliant", "Invalid base64 data.", reason=str(exc)):
                self._sasl_fail("Invalid base64 data.")
            return
        if self._sasl_exchange == "PLAIN":
            self._sasl_plain(decoded, data)
        elif self._sasl_exchange in ("XOAUTH2", "OAUTHBEARER"):
            self._sasl_oauth(decoded, self._sasl_exchange)
        else:
            self._sasl_login(decoded, data)

    def _sasl_oauth(self, decoded: bytes, mechanism: str) -> None:
        """XOAUTH2/OAUTHBEARER (relayed only): the named user goes through the same checks as
        any login; the whole message is the secret the upstream gets unchanged."""
        if not decoded:
            self._sasl_empty("empty_password", "No token given.")
            return
        parse = sasl.parse_xoauth2 if mechanism == "XOAUTH2" else sasl.parse_oauthbearer
        try:
            creds = parse(decoded)
        except sasl.SaslError as exc:
            if not self._violation("non_compliant", f"Invalid {mechanism} data.", reason=str(exc)):
                self._sasl_fail(f"Invalid {mechanism} data.", "AUTH")
            return
        self._sasl_credentials(creds.user, decoded, decoded, mechanism)

    def _sasl_plain(self, decoded: bytes, data: bytes) -> None:
        try:
            creds = sasl.parse_plain(decoded)
        except sasl.SaslError as exc:
            if not self._violation("non_compliant", "Invalid PLAIN data.", reason=str(exc)):
                self._sasl_fail("Invalid PLAIN data.", "AUTH")
            return
        self._sasl_credentials(creds.authcid, creds.password, data, "PLAIN")

    def _sasl_login(self, decoded: bytes, data: bytes) -> None:
        """LOGIN: the user name first (refused at once if empty), then the password."""
        if self._sasl_user is None:
            if not decoded.strip(b" "):
                self._sasl_empty("empty_username", "No username given.")
                return
            self._sasl_user = decoded
            self._send(responses.continuation(sasl.LOGIN_PASSWORD_PROMPT))
            return
        user, self._sasl_user = self._sasl_user, None
        self._sasl_credentials(user, decoded, data, "LOGIN")

    def _sasl_credentials(self, user: bytes, password: bytes, data: bytes, mechanism: str) -> None:
        self.state = State.AUTHORIZATION
        self._sasl_exchange = None
        if not user.strip(b" "):
            self._sasl_empty("empty_username", "No username given.")
        elif not password.strip(b" "):
            self._sasl_empty("empty_password", "No password given.")
        else:
            name = self._check_username(user)
            if name is not None:
                self.user = name
                self._authenticate(name, password, mechanism)

    def _sasl_empty(self, key: str, text: str) -> None:
        """An empty SASL identity or password: the protection, else an [AUTH] failure."""
        self.state = State.AUTHORIZATION
        if not self._violation(key, text, "AUTH"):
            self._sasl_fail(text, "AUTH")
