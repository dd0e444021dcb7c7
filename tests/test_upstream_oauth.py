"""XOAUTH2 and OAUTHBEARER: parsed for the user name, relayed unchanged, not mistaken for code."""

from __future__ import annotations

import base64
import random
import string

import pytest

from pop3shield.config import ConfigError, parse_config
from pop3shield.core import actions as A
from pop3shield.core import sasl
from pop3shield.core.session import Session
from pop3shield.core.settings import ProtectionsConfig, SessionSettings

MECHS = ("PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER")


def token(rng: random.Random, size: int) -> bytes:
    """A bearer token shaped like the real ones: JWT (base64url parts) or Google's ya29.*"""
    alphabet = string.ascii_letters + string.digits + "-_"
    if rng.random() < 0.5:
        parts = ["eyJ" + "".join(rng.choice(alphabet) for _ in range(n)) for n in (30, size - 400, 342)]
        return ".".join(parts).encode()
    return ("ya29." + "".join(rng.choice(alphabet) for _ in range(size))).encode()


def xoauth2(user: bytes, tok: bytes) -> bytes:
    return b"user=" + user + b"\x01auth=Bearer " + tok + b"\x01\x01"


def oauthbearer(user: bytes, tok: bytes) -> bytes:
    return b"n,a=" + user + b",\x01host=pop.example.com\x01port=995\x01auth=Bearer " + tok + b"\x01\x01"


def test_parse_xoauth2_and_oauthbearer() -> None:
    msg = xoauth2(b"alice@example.com", b"ya29.abc")
    assert sasl.parse_xoauth2(msg) == sasl.OAuthCredentials(b"alice@example.com", msg)
    msg = oauthbearer(b"bob=2Cx@example.com", b"eyJ.x.y")
    assert sasl.parse_oauthbearer(msg).user == b"bob,x@example.com"
    assert "ya29" not in repr(sasl.parse_xoauth2(xoauth2(b"a", b"ya29.secret")))
    for bad in (b"user=a\x01auth=Bearer t\x01", b"auth=Bearer t\x01\x01", b"user=a\x01auth=Basic t\x01\x01",
                b"user=a\x01auth=Bearer \x01\x01", b"user=a\x1b\x01auth=Bearer t\x01\x01",
                b"user=a\x01auth=Bearer " + b"t" * 20000 + b"\x01\x01"):
        with pytest.raises(sasl.SaslError):
            sasl.parse_xoauth2(bad)
    for bad in (b"n,,\x01auth=Bearer t\x01\x01", b"p=x,a=u,\x01auth=Bearer t\x01\x01", b"n,a=u,auth=Bearer t",
                b"n,a=u,\x01auth=Bearer t\x01auth=Bearer u\x01\x01"):
        with pytest.raises(sasl.SaslError):
            sasl.parse_oauthbearer(bad)


def run(session: Session, data: bytes) -> list:
    return list(session.receive_data(data))


def logged(session: Session, lines: list[bytes]) -> tuple[bytes, list]:
    out, actions = b"", []
    actions += session.start()
    for line in lines:
        actions += run(session, line)
    out = b"".join(a.data for a in actions if isinstance(a, A.Send))
    return out, actions


@pytest.mark.parametrize("mechanism, build", [("XOAUTH2", xoauth2), ("OAUTHBEARER", oauthbearer)])
def test_session_relays_the_message_unchanged(mechanism, build) -> None:
    rng = random.Random(7)
    message = build(b"alice@example.com", token(rng, 2500))
    blob = base64.b64encode(message)
    assert 3000 < len(blob) < 4096
    settings = SessionSettings(sasl_mechanisms=MECHS, protections=ProtectionsConfig(sasl_line_limit=8192))
    # the fast tier sends SASL data on to the slow one, as for any long argument
    session = Session(settings, "192.0.2.1", quick_check=lambda arg, field: None if field == "sasl" else _Clean())
    out, actions = logged(session, [b"CAPA\r\n", b"AUTH " + mechanism.encode() + b"\r\n", blob + b"\r\n"])
    assert b"SASL PLAIN LOGIN XOAUTH2 OAUTHBEARER\r\n" in out
    assert b"+ \r\n" in out
    analyses = [a for a in actions if isinstance(a, A.Analyze)]
    assert len(analyses) == 1  # the slow tier gets the key/value pairs, the token on its own
    assert all(b"\x01" not in arg for arg in analyses[0].arguments)
    assert any(arg.startswith(b"auth=Bearer ") for arg in analyses[0].arguments)
    actions = list(session.analysis_finished([_Clean()] * len(analyses[0].arguments)))
    auth = [a for a in actions if isinstance(a, A.Authenticate)]
    assert len(auth) == 1
    assert (auth[0].username, auth[0].secret, auth[0].mechanism) == ("alice@example.com", message, mechanism)
    assert "Bearer" not in repr(auth[0])


class _Clean:
    malicious = False
    reasons = ()


def test_not_offered_without_the_setting() -> None:
    session = Session(SessionSettings(), "192.0.2.1", quick_check=lambda arg, field: _Clean())
    out, _ = logged(session, [b"AUTH XOAUTH2\r\n"])
    assert out.endswith(b"-ERR Unsupported authentication mechanism.\r\n")


def test_malformed_token_is_non_compliant() -> None:
    settings = SessionSettings(sasl_mechanisms=MECHS, protections=ProtectionsConfig(sasl_line_limit=8192))
    session = Session(settings, "192.0.2.1", quick_check=lambda arg, field: _Clean())
    out, actions = logged(session, [b"AUTH XOAUTH2\r\n", base64.b64encode(b"garbage") + b"\r\n"])
    reports = [a.event for a in actions if isinstance(a, A.Report)]
    assert [r.protection for r in reports] == ["non_compliant"]
    assert not any(isinstance(a, A.Authenticate) for a in actions)


def test_the_detector_reads_tokens_without_false_positives() -> None:
    from pop3shield.core._screening import _sasl_fields
    from pop3shield.mcp import analyze

    rng = random.Random(2026)
    for n in range(40):
        size = rng.randint(1000, 3000)
        message = (xoauth2 if n % 2 else oauthbearer)(b"user%d@example.com" % n, token(rng, size))
        fields = _sasl_fields(base64.b64encode(message), "XOAUTH2" if n % 2 else "OAUTHBEARER")
        for part, field in fields:
            verdict = analyze(part, field)
            assert not verdict.malicious, (n, part[:60], verdict.reasons)


def test_oauth_config_raises_the_sasl_line_limit() -> None:
    base = {"backend": {"type": "upstream", "endpoint": "tcp:host=x:port=110", "oauth": True}}
    config = parse_config(base, "f.toml", "/tmp")
    assert config.protections.sasl_line_limit == 8192
    assert config.session_settings().sasl_mechanisms == MECHS
    explicit = dict(base, protections={"max_line_length": {"sasl_limit": 2048}})
    with pytest.raises(ConfigError) as caught:
        parse_config(explicit, "f.toml", "/tmp")
    assert str(caught.value) == ("f.toml: protections.max_line_length.sasl_limit: must be at least 4096 "
                                 "with backend.oauth (OAuth tokens are 1-3 KB), got 2048")
    with pytest.raises(ConfigError, match=r"backend.oauth: only for backend.type = \"upstream\""):
        parse_config({"auth": {"realm": "a.b:c"}, "backend": {"oauth": True}}, "f.toml", "/tmp")
    plain = parse_config({"backend": {"type": "upstream", "endpoint": "tcp:host=x:port=110"}}, "f.toml", "/tmp")
    assert plain.protections.sasl_line_limit == 2048
    assert plain.session_settings().sasl_mechanisms == ("PLAIN", "LOGIN")
