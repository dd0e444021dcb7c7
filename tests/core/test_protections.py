"""pop3shield.core.protections: what one connection's engine keeps, and what engines share."""

from __future__ import annotations

from pop3shield.core.protections import ProtectionEngine
from pop3shield.core.settings import Action, ProtectionSettings, ProtectionsConfig


def test_engines_share_their_resolved_actions_but_not_what_they_reported() -> None:
    config = ProtectionsConfig(stls=ProtectionSettings(action=Action.DETECT))
    first, second = ProtectionEngine(config, "192.0.2.1"), ProtectionEngine(config, "192.0.2.2")
    assert first.actions is second.actions  # one dict for every connection that resolves alike
    assert first.action("stls") is Action.DETECT and first.active("stls")
    assert first.trigger("stls", "STLS").event is not None  # detect: the first event is logged
    assert first.trigger("stls", "STLS").event is None  # ... and the next one counted as a repeat
    assert (dict(first.repeats), first.reported) == ({"stls": 1}, {"stls"})
    # the other connection has reported nothing and repeated nothing
    assert (dict(second.repeats), set(second.reported)) == ({}, set())
    assert second.trigger("stls", "STLS").event is not None
    assert ProtectionEngine(config, "192.0.2.3").repeats["stls"] == 0
    assert dict(ProtectionEngine(config, "192.0.2.3").repeats) == {}


def test_a_different_resolution_gets_its_own_actions() -> None:
    off = ProtectionsConfig(stls=ProtectionSettings(action=Action.INACTIVE))
    on = ProtectionsConfig()
    assert ProtectionEngine(off, None).actions is not ProtectionEngine(on, None).actions
    assert not ProtectionEngine(off, None).active("stls") and ProtectionEngine(on, None).active("stls")
