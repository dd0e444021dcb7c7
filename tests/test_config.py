"""Tests for pop3shield.config: defaults, every error path, path resolution, the example file."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pop3shield.config import (
    AnalysisConfig,
    AuthConfig,
    BackendConfig,
    Config,
    ConfigError,
    EventsConfig,
    LoggingConfig,
    ServerConfig,
    load_config,
    parse_config,
)
from pop3shield.core.settings import (
    PROTECTION_KEYS,
    Action,
    ProtectionsConfig,
    SessionSettings,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "pop3shield.toml"
SOURCE = "/etc/pop3shield/test.toml"


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    path = tmp_path / "users.passwd"
    path.write_text("# no users\n")
    return path


@pytest.fixture
def base(passwd: Path) -> dict[str, Any]:
    """The smallest valid config."""
    return {"auth": {"passwd_file": str(passwd)}}


def parse(data: dict[str, Any], base_dir: Path | str = "/etc/pop3shield") -> Config:
    return parse_config(data, SOURCE, Path(base_dir))


def with_value(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``data`` with ``value`` set at a dotted path (tables created as needed)."""
    result = copy.deepcopy(data)
    *tables, last = dotted.split(".")
    node = result
    for name in tables:
        node = node.setdefault(name, {})
    node[last] = value
    return result


# --------------------------------------------------------------------------- defaults


def test_defaults(base: dict[str, Any], passwd: Path) -> None:
    config = parse(base)
    assert config.server == ServerConfig()
    assert config.auth == AuthConfig(passwd_file=str(passwd))
    assert config.backend == BackendConfig()
    assert config.events == EventsConfig()
    assert config.logging == LoggingConfig()
    assert config.analysis == AnalysisConfig()
    assert config.protections == ProtectionsConfig()
    assert config.source == SOURCE


def test_default_values_match_the_brief() -> None:
    server = ServerConfig()
    assert server.listen == ("tcp:1110:interface=127.0.0.1",)
    assert server.hostname == "localhost"
    assert server.implementation is None
    assert server.apop is False
    assert (server.max_connections, server.max_connections_per_ip) == (1000, 300)  # issue 10: a NAT
    assert (server.login_timeout, server.idle_timeout) == (60.0, 600.0)
    assert (server.auth_failure_delay, server.auth_failure_delay_max) == (2.0, 15.0)
    assert (server.input_buffer_limit, server.thread_pool_size) == (65536, 10)
    assert server.workers == (os.cpu_count() or 1)  # one process per core
    assert Config().source == "<default>"


def test_max_commands_defaults_and_formula(base: dict[str, Any]) -> None:
    """50 commands before login; after it 1000 plus 5 per message of the maildrop."""
    p = parse(base).protections
    assert (p.commands_limit, p.commands_after_login, p.commands_per_message) == (50, 1000, 5)
    assert p.commands_after_login_limit(0) == 1000
    assert p.commands_after_login_limit(12000) == 61000


def test_max_commands_old_config_stays_valid(base: dict[str, Any]) -> None:
    """A file written when ``limit`` counted the whole connection loads; it bounds the login phase."""
    p = parse(with_value(base, "protections.max_commands", {"limit": 10000, "overrides": []})).protections
    assert p.commands_limit == 10000
    assert (p.commands_after_login, p.commands_per_message) == (1000, 5)


def test_dataclasses_are_frozen(base: dict[str, Any]) -> None:
    config = parse(base)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.idle_timeout = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.auth = AuthConfig()  # type: ignore[misc]


def test_session_settings(base: dict[str, Any]) -> None:
    data = with_value(base, "server.hostname", "pop.example.org")
    data = with_value(data, "server.implementation", "pop3shield")
    data = with_value(data, "server.apop", True)
    data = with_value(data, "server.input_buffer_limit", 4096)
    data = with_value(data, "protections.max_bad_commands.limit", 3)
    config = parse(data)
    settings = config.session_settings()
    assert isinstance(settings, SessionSettings)
    assert settings.hostname == "pop.example.org"
    assert settings.implementation == "pop3shield"
    assert settings.apop is True
    assert settings.input_buffer_limit == 4096
    assert settings.protections is config.protections
    assert settings.protections.bad_commands_limit == 3
    assert settings.sasl_mechanisms == SessionSettings().sasl_mechanisms


def test_full_config_values(base: dict[str, Any], tmp_path: Path) -> None:
    data = copy.deepcopy(base)
    data["server"] = {
        "listen": ["tcp:110", "SSL:995:privateKey=k.pem", "haproxy:tcp:1110", "unix:/run/p.sock"],
        "hostname": "mail-1.example.org.",
        "max_connections": 5,
        "max_connections_per_ip": 5,
        "login_timeout": 1,
        "idle_timeout": 3600,
        "auth_failure_delay": 0,
        "auth_failure_delay_max": 0,
        "input_buffer_limit": 1024,
        "thread_pool_size": 256,
    }
    data["auth"]["allow_plaintext"] = True
    data["backend"] = {"type": "maildir", "maildir": "/srv/{user}"}
    data["events"] = {"path": "/var/log/ev.jsonl", "rate_limit": 1}
    data["logging"] = {"path": "/var/log/p.log", "format": "json", "level": "debug"}
    data["protections"] = {
        "non_compliant": {"strict_crlf": True, "unknown_commands": "violation", "username_chars": "._é"},
        "max_line_length": {"limit": 64, "sasl_limit": 1024},
        "max_commands": {"limit": 1, "after_login": 7, "per_message": 0},
    }
    config = parse(data)
    assert config.server.listen[1] == "SSL:995:privateKey=k.pem"
    assert config.server.login_timeout == 1.0 and isinstance(config.server.login_timeout, float)
    assert config.server.idle_timeout == 3600.0
    assert config.server.thread_pool_size == 256
    assert config.auth.allow_plaintext is True
    assert config.backend.maildir == "/srv/{user}"
    assert config.events == EventsConfig(path="/var/log/ev.jsonl", rate_limit=1)
    assert config.logging == LoggingConfig(path="/var/log/p.log", format="json", level="debug")
    p = config.protections
    assert (p.strict_crlf, p.unknown_commands, p.username_extra_chars) == (True, "violation", "._é")
    assert (p.line_length_limit, p.sasl_line_limit, p.commands_limit) == (64, 1024, 1)
    assert (p.commands_after_login, p.commands_per_message) == (7, 0)
    assert p.commands_after_login_limit(12000) == 7


def test_realm_without_passwd_file() -> None:
    config = parse({"auth": {"realm": "my_pkg.realms:make_realm"}})
    assert config.auth == AuthConfig(realm="my_pkg.realms:make_realm")


# --------------------------------------------------------------------------- paths


def test_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "users").write_text("")
    data = {
        "auth": {"passwd_file": "users"},
        "backend": {"maildir": "../mail/{user}/Maildir"},
        "events": {"path": "log/events.jsonl"},
        "logging": {"path": "./pop3shield.log"},
    }
    config = parse(data, conf_dir)
    assert config.auth.passwd_file == str(conf_dir / "users")
    assert config.backend.maildir == str(tmp_path / "mail" / "{user}" / "Maildir")
    assert config.events.path == str(conf_dir / "log" / "events.jsonl")
    assert config.logging.path == str(conf_dir / "pop3shield.log")


def test_load_config_resolves_against_file_dir_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "users").write_text("")
    conf = conf_dir / "p.toml"
    conf.write_text('[auth]\npasswd_file = "users"\n[events]\npath = "ev.jsonl"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(os.path.relpath(conf, elsewhere))
    assert config.auth.passwd_file == str(conf_dir / "users")
    assert config.events.path == str(conf_dir / "ev.jsonl")
    assert config.source == os.path.relpath(conf, elsewhere)


def test_logging_dash_means_stderr(base: dict[str, Any]) -> None:
    assert parse(with_value(base, "logging.path", "-")).logging.path == "-"


# --------------------------------------------------------------------------- the error table

BAD_VALUES: list[tuple[str, Any, str, str]] = [
    # (dotted key to set, value, expected error key, expected problem fragment)
    ("server.listen", "tcp:110", "server.listen", "expected an array, got string"),
    ("server.listen", [], "server.listen", "at least one"),
    ("server.listen", ["tcp:110", 110], "server.listen[1]", "expected a string, got integer"),
    ("server.listen", [""], "server.listen[0]", "must not be empty"),
    ("server.listen", ["udp:110"], "server.listen[0]", "unknown endpoint type 'udp'"),
    ("server.listen", ["110"], "server.listen[0]", "unknown endpoint type '110'"),
    ("server.hostname", "", "server.hostname", "not a plausible host name"),
    ("server.hostname", "bad host", "server.hostname", "not a plausible host name"),
    ("server.hostname", "x_y.example", "server.hostname", "not a plausible host name"),
    ("server.hostname", "a" * 256, "server.hostname", "not a plausible host name"),
    ("server.hostname", "a..b", "server.hostname", "not a plausible host name"),
    ("server.hostname", 1, "server.hostname", "expected a string, got integer"),
    ("server.implementation", "", "server.implementation", "must not be empty"),
    ("server.implementation", "x\r\n+OK", "server.implementation", "control characters"),
    ("server.implementation", "x" * 201, "server.implementation", "at most 200"),
    ("server.apop", "yes", "server.apop", "expected a boolean, got string"),
    ("server.apop", 1, "server.apop", "expected a boolean, got integer"),
    ("server.max_connections", 0, "server.max_connections", "must be at least 1, got 0"),
    ("server.max_connections", True, "server.max_connections", "expected an integer, got boolean"),
    ("server.max_connections", 1.5, "server.max_connections", "expected an integer, got float"),
    ("server.max_connections", "10", "server.max_connections", "expected an integer, got string"),
    ("server.max_connections_per_ip", 1001, "server.max_connections_per_ip", "must not exceed"),
    ("server.max_connections_per_ip", 0, "server.max_connections_per_ip", "at least 1"),
    ("server.login_timeout", 0, "server.login_timeout", "greater than 0"),
    ("server.login_timeout", -1.0, "server.login_timeout", "greater than 0"),
    ("server.login_timeout", "60", "server.login_timeout", "expected a number, got string"),
    ("server.login_timeout", float("nan"), "server.login_timeout", "finite"),
    ("server.login_timeout", float("inf"), "server.login_timeout", "finite"),
    ("server.idle_timeout", 599.9, "server.idle_timeout", "must be at least 600"),
    ("server.idle_timeout", 30, "server.idle_timeout", "must be at least 600, got 30"),
    ("server.auth_failure_delay", -0.5, "server.auth_failure_delay", "at least 0"),
    ("server.auth_failure_delay_max", 1.0, "server.auth_failure_delay_max", "at least server.auth_failure_delay"),
    ("server.input_buffer_limit", 1023, "server.input_buffer_limit", "at least 1024"),
    ("server.thread_pool_size", 0, "server.thread_pool_size", "at least 1"),
    ("server.thread_pool_size", 257, "server.thread_pool_size", "at most 256"),
    ("server.workers", 0, "server.workers", "at least 1"),
    ("server.workers", 257, "server.workers", "at most 256"),
    ("server.workers", 2.0, "server.workers", "expected an integer, got float"),
    ("server.idel_timeout", 600, "server.idel_timeout", "unknown key (did you mean 'idle_timeout'?)"),
    ("server.bogus", 1, "server.bogus", "unknown key"),
    ("auth.allow_plaintext", "true", "auth.allow_plaintext", "expected a boolean, got string"),
    ("auth.realm", "just_a_module", "auth.realm", "package.module:attribute"),
    ("auth.realm", "a.b:c:d", "auth.realm", "package.module:attribute"),
    ("auth.realm", "1a:b", "auth.realm", "package.module:attribute"),
    ("auth.passwd_file", "", "auth.passwd_file", "must not be empty"),
    ("auth.passwd_file", "/nonexistent/users", "auth.passwd_file", "cannot read /nonexistent/users"),
    ("auth.passwd_file", "/tmp/a\x00b", "auth.passwd_file", "control characters"),
    ("auth.passwd_file", 5, "auth.passwd_file", "expected a string, got integer"),
    ("backend.type", "mbox", "backend.type", "must be one of 'maildir'"),
    ("backend.maildir", "/var/mail/Maildir", "backend.maildir", "'{user}' exactly once"),
    ("backend.maildir", "/var/{user}/{user}", "backend.maildir", "'{user}' exactly once"),
    ("backend.maildir", "/var/{user}/{domain}", "backend.maildir", "only placeholder"),
    ("backend.maildir", "/var/{user}/x}", "backend.maildir", "only placeholder"),
    ("backend.maildir", "/var/{USER}", "backend.maildir", "'{user}' exactly once"),
    ("backend.maildir", "/var/{user}/../x", "backend.maildir", "'{user}' exactly once"),
    ("backend.maildir", "", "backend.maildir", "must not be empty"),
    ("events.path", "-", "events.path", "not a file"),
    ("events.path", "", "events.path", "must not be empty"),
    ("events.rate_limit", 0, "events.rate_limit", "at least 1"),
    ("events.rate_limit", 1.0, "events.rate_limit", "expected an integer, got float"),
    ("logging.format", "xml", "logging.format", "must be one of 'text', 'json'"),
    ("logging.level", "warning", "logging.level", "must be one of"),
    ("logging.level", "INFO", "logging.level", "must be one of"),
    ("logging.path", "", "logging.path", "must not be empty"),
    ("logging.colour", True, "logging.colour", "unknown key"),
    ("protections.action", "block", "protections.action", "must be one of 'prevent', 'detect', 'inactive'"),
    ("protections.stls.action", "off", "protections.stls.action", "must be one of"),
    ("protections.stls.limit", 3, "protections.stls.limit", "unknown key"),
    ("protections.stls", "detect", "protections.stls", "expected a table, got string"),
    ("protections.max_comands", {}, "protections.max_comands", "unknown section (did you mean 'max_commands'?)"),
    ("protections.max_commands.limit", 0, "protections.max_commands.limit", "at least 1"),
    ("protections.max_commands.limt", 5, "protections.max_commands.limt", "unknown key"),
    ("protections.max_commands.after_login", 0, "protections.max_commands.after_login", "at least 1"),
    ("protections.max_commands.after_login", 1.5, "protections.max_commands.after_login", "expected an integer, got float"),
    ("protections.max_commands.per_message", -1, "protections.max_commands.per_message", "at least 0"),
    ("protections.max_commands.per_message", "5", "protections.max_commands.per_message", "expected an integer, got string"),
    ("protections.max_commands.per_messages", 5, "protections.max_commands.per_messages", "unknown key (did you mean 'per_message'?)"),
    ("protections.max_bad_commands.limit", 0, "protections.max_bad_commands.limit", "at least 1"),
    ("protections.max_bad_commands.limit", "5", "protections.max_bad_commands.limit", "expected an integer"),
    ("protections.max_line_length.limit", 63, "protections.max_line_length.limit", "at least 64"),
    ("protections.max_line_length.limit", 70000, "protections.max_line_length.limit", "must not exceed server.input_buffer_limit (65536)"),
    ("protections.max_line_length.sasl_limit", 70000, "protections.max_line_length.sasl_limit", "must not exceed"),
    ("protections.max_line_length.sasl_limit", 10, "protections.max_line_length.sasl_limit", "at least 64"),
    ("protections.non_compliant.strict_crlf", "false", "protections.non_compliant.strict_crlf", "expected a boolean"),
    ("protections.non_compliant.unknown_commands", "ignore", "protections.non_compliant.unknown_commands", "must be one of 'bad_command', 'violation'"),
    ("protections.non_compliant.username_chars", "._/", "protections.non_compliant.username_chars", "'/' is not allowed"),
    ("protections.non_compliant.username_chars", "\\", "protections.non_compliant.username_chars", "is not allowed"),
    ("protections.non_compliant.username_chars", ". ", "protections.non_compliant.username_chars", "' ' is not allowed"),
    ("protections.non_compliant.username_chars", ".\x00", "protections.non_compliant.username_chars", "'\\x00' is not allowed"),
    ("protections.non_compliant.username_chars", ".\t", "protections.non_compliant.username_chars", "is not allowed"),
    ("protections.non_compliant.username_chars", ".\u200b", "protections.non_compliant.username_chars", "is not allowed"),
    ("protections.non_compliant.username_chars", ".\u2028", "protections.non_compliant.username_chars", "is not allowed"),
    ("protections.stls.overrides", {"networks": []}, "protections.stls.overrides", "expected an array, got table"),
    ("protections.stls.overrides", ["10.0.0.0/8"], "protections.stls.overrides[0]", "expected a table, got string"),
    ("protections.stls.overrides", [{"action": "detect"}], "protections.stls.overrides[0].networks", "missing required key"),
    ("protections.stls.overrides", [{"networks": ["10.0.0.0/8"]}], "protections.stls.overrides[0].action", "missing required key"),
    ("protections.stls.overrides", [{"networks": [], "action": "detect"}], "protections.stls.overrides[0].networks", "at least one"),
    ("protections.stls.overrides", [{"networks": ["10.0.0.0/8"], "action": "allow"}], "protections.stls.overrides[0].action", "must be one of"),
    ("protections.stls.overrides", [{"networks": ["10.0.0.0/8"], "action": "detect", "note": "x"}], "protections.stls.overrides[0].note", "unknown key"),
    ("protections.stls.overrides", [{"networks": "10.0.0.0/8", "action": "detect"}], "protections.stls.overrides[0].networks", "expected an array, got string"),
    ("protections.stls.overrides", [{"networks": [10], "action": "detect"}], "protections.stls.overrides[0].networks[0]", "expected a string, got integer"),
    (
        "protections.max_commands.overrides",
        [{"networks": ["10.0.0.0/8"], "action": "detect"}, {"networks": ["192.0.2.10/32", "192.0.2.10/24"], "action": "inactive"}],
        "protections.max_commands.overrides[1].networks[1]",
        "host bits set (did you mean '192.0.2.0/24'?)",
    ),
    (
        "protections.max_commands.overrides",
        [{"networks": ["2001:db8::1/32"], "action": "inactive"}],
        "protections.max_commands.overrides[0].networks[0]",
        "host bits set (did you mean '2001:db8::/32'?)",
    ),
    ("protections.stls.overrides", [{"networks": ["not-an-ip"], "action": "detect"}], "protections.stls.overrides[0].networks[0]", "not an IP network"),
    ("protections.stls.overrides", [{"networks": ["10.0.0.0/33"], "action": "detect"}], "protections.stls.overrides[0].networks[0]", "not an IP network"),
    ("server", "x", "server", "expected a table, got string"),
    ("serevr", {}, "serevr", "unknown section (did you mean 'server'?)"),
    ("hostname", "pop.example.org", "hostname", "unknown key (did you mean 'server.hostname'?)"),
    ("wibble", 1, "wibble", "unknown key"),
]


@pytest.mark.parametrize(
    ("dotted", "value", "key", "problem"),
    BAD_VALUES,
    ids=[f"{row[0]}={row[1]!r}"[:60] for row in BAD_VALUES],
)
def test_bad_config(base: dict[str, Any], dotted: str, value: Any, key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(with_value(base, dotted, value))
    error = info.value
    assert (error.file, error.key) == (SOURCE, key)
    assert problem in error.problem
    assert str(error) == f"{SOURCE}: {key}: {error.problem}"
    assert "\n" not in str(error) and "\r" not in str(error)


def test_line_length_checked_against_a_smaller_buffer(base: dict[str, Any]) -> None:
    data = with_value(base, "server.input_buffer_limit", 1024)
    data = with_value(data, "protections.max_line_length.sasl_limit", 2048)
    with pytest.raises(ConfigError, match=r"sasl_limit: must not exceed server.input_buffer_limit \(1024\)"):
        parse(data)


def test_missing_passwd_file_without_realm() -> None:
    with pytest.raises(ConfigError) as info:
        parse({})
    assert info.value.key == "auth.passwd_file"
    assert "missing required key" in info.value.problem


def test_passwd_file_that_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"auth": {"passwd_file": str(tmp_path)}})
    assert info.value.key == "auth.passwd_file"
    assert "cannot read" in info.value.problem


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads everything")
def test_passwd_file_unreadable(passwd: Path) -> None:
    passwd.chmod(0)
    with pytest.raises(ConfigError, match="auth.passwd_file: cannot read"):
        parse({"auth": {"passwd_file": str(passwd)}})


def test_error_message_is_one_line_even_with_hostile_key(base: dict[str, Any]) -> None:
    data = copy.deepcopy(base)
    data["server"] = {"a\nb": 1}
    with pytest.raises(ConfigError) as info:
        parse(data)
    assert "\n" not in str(info.value)
    assert info.value.key == "server.a\\nb"


def test_config_error_format() -> None:
    error = ConfigError("f.toml", "server.x", "broken")
    assert str(error) == "f.toml: server.x: broken"
    assert (error.file, error.key, error.problem) == ("f.toml", "server.x", "broken")


# --------------------------------------------------------------------------- load_config errors


def test_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.file == str(path)
    assert info.value.key == "-"
    assert "cannot read" in info.value.problem


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r": -: cannot read"):
        load_config(tmp_path)


def test_load_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nhostname = "ok"\nidle_timeout = = 5\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "-"
    assert "TOML syntax error" in info.value.problem
    assert "line 3" in info.value.problem
    assert str(info.value).startswith(f"{path}: -: ")


def test_load_duplicate_key_is_a_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.toml"
    path.write_text("[server]\napop = true\napop = false\n")
    with pytest.raises(ConfigError, match="TOML syntax error"):
        load_config(path)


def test_load_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[server]\nhostname = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "-"


def test_load_validation_error_names_the_file(tmp_path: Path, passwd: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(f'[auth]\npasswd_file = "{passwd}"\n[server]\nidle_timeout = 60\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: server.idle_timeout: must be at least 600, got 60"


# --------------------------------------------------------------------------- protections


def test_protections_default_action_applies_to_all(base: dict[str, Any]) -> None:
    config = parse(with_value(base, "protections.action", "detect"))
    for key in PROTECTION_KEYS:
        assert config.protections.get(key).action is Action.DETECT


def test_protection_action_overrides_section_default(base: dict[str, Any]) -> None:
    data = with_value(base, "protections.action", "detect")
    data = with_value(data, "protections.stls.action", "inactive")
    config = parse(data)
    assert config.protections.stls.action is Action.INACTIVE
    assert config.protections.malicious_code.action is Action.DETECT


@pytest.fixture
def overridden(base: dict[str, Any]) -> Config:
    overrides = [
        {"networks": ["192.0.2.10/32", "2001:db8::/32"], "action": "inactive"},
        {"networks": ["198.51.100.0/24", "::ffff:203.0.113.0/120"], "action": "detect"},
    ]
    return parse(with_value(base, "protections.max_commands.overrides", overrides))


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("192.0.2.10", Action.INACTIVE),
        ("192.0.2.11", Action.PREVENT),
        ("::ffff:192.0.2.10", Action.INACTIVE),  # IPv4-mapped peer matches the IPv4 network
        ("2001:db8::1", Action.INACTIVE),
        ("2001:db8:ffff::1", Action.INACTIVE),
        ("2001:db9::1", Action.PREVENT),
        ("198.51.100.200", Action.DETECT),
        ("::ffff:198.51.100.1", Action.DETECT),
        ("203.0.113.7", Action.DETECT),  # written as an IPv4-mapped network, matched as IPv4
        ("::ffff:203.0.113.7", Action.DETECT),
        ("10.0.0.1", Action.PREVENT),
        ("", Action.PREVENT),
        (None, Action.PREVENT),
        ("not-an-address", Action.PREVENT),
    ],
)
def test_override_matching(overridden: Config, address: str | None, expected: Action) -> None:
    assert overridden.protections.max_commands.action_for(address) is expected
    # the other protections are untouched
    assert overridden.protections.stls.action_for(address) is Action.PREVENT


def test_override_networks_are_parsed(overridden: Config) -> None:
    first, second = overridden.protections.max_commands.overrides
    assert first.networks == (
        ipaddress.ip_network("192.0.2.10/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert first.action is Action.INACTIVE
    assert second.networks[1] == ipaddress.ip_network("203.0.113.0/24")


def test_bare_address_is_a_host_network(base: dict[str, Any]) -> None:
    overrides = [{"networks": ["192.0.2.10", "2001:db8::5"], "action": "detect"}]
    config = parse(with_value(base, "protections.stls.overrides", overrides))
    assert config.protections.stls.overrides[0].networks == (
        ipaddress.ip_network("192.0.2.10/32"),
        ipaddress.ip_network("2001:db8::5/128"),
    )


def test_first_override_wins(base: dict[str, Any]) -> None:
    overrides = [
        {"networks": ["192.0.2.0/28"], "action": "detect"},
        {"networks": ["192.0.2.0/24"], "action": "inactive"},
    ]
    config = parse(with_value(base, "protections.stls.overrides", overrides))
    assert config.protections.stls.action_for("192.0.2.1") is Action.DETECT
    assert config.protections.stls.action_for("192.0.2.100") is Action.INACTIVE


def test_username_chars_deduplicated(base: dict[str, Any]) -> None:
    config = parse(with_value(base, "protections.non_compliant.username_chars", "..--"))
    assert config.protections.username_extra_chars == ".-"


def test_username_chars_may_be_empty(base: dict[str, Any]) -> None:
    config = parse(with_value(base, "protections.non_compliant.username_chars", ""))
    assert config.protections.username_extra_chars == ""


@given(st.text(min_size=1, max_size=8))
def test_username_chars_never_accepts_forbidden(text: str) -> None:
    forbidden = any(
        ch in "/\\" or ch.isspace() or not ch.isprintable() for ch in text
    )
    data = {
        "auth": {"realm": "m:f"},
        "protections": {"non_compliant": {"username_chars": text}},
    }
    try:
        config = parse(data)
    except ConfigError as error:
        assert error.key == "protections.non_compliant.username_chars"
        assert forbidden
    else:
        assert not forbidden
        assert set(config.protections.username_extra_chars) == set(text)


# --------------------------------------------------------------------------- the example file


def example_text(passwd: Path) -> str:
    text = EXAMPLE.read_text(encoding="utf-8")
    line = 'passwd_file = "/etc/pop3shield/users.passwd"'
    assert text.count(line) == 1, "the example must point at /etc/pop3shield/users.passwd"
    return text.replace(line, f'passwd_file = "{passwd}"')


def test_example_config_loads_with_defaults(tmp_path: Path, passwd: Path) -> None:
    """The example documents the defaults: loaded, it must equal the built-in defaults."""
    path = tmp_path / "pop3shield.toml"
    path.write_text(example_text(passwd), encoding="utf-8")
    config = load_config(path)
    assert config.server == ServerConfig()
    assert config.auth == AuthConfig(passwd_file=str(passwd))
    assert config.backend == BackendConfig()
    assert config.events == EventsConfig()
    assert config.logging == LoggingConfig()
    assert config.analysis == AnalysisConfig()
    assert config.protections == ProtectionsConfig()


def _documented_keys(text: str) -> set[str]:
    """Every 'key = ' in the example, active or commented out, with its section."""
    keys: set[str] = set()
    section = ""
    for line in text.splitlines():
        stripped = line.lstrip("# ").strip()
        header = re.fullmatch(r"\[([a-z_.]+)\]", line.strip())
        if header:
            section = header.group(1)
            continue
        match = re.match(r"([a-z][a-z0-9_]*) = ", stripped)
        if match and not line.startswith("#   "):
            keys.add(f"{section}.{match.group(1)}")
    return keys


def test_example_documents_every_key() -> None:
    documented = _documented_keys(EXAMPLE.read_text(encoding="utf-8"))
    expected: set[str] = set()
    for section, kind in [
        ("server", ServerConfig),
        ("auth", AuthConfig),
        ("backend", BackendConfig),
        ("events", EventsConfig),
        ("logging", LoggingConfig),
        ("analysis", AnalysisConfig),
    ]:
        expected |= {f"{section}.{f.name}" for f in dataclasses.fields(kind)}
    expected.add("protections.action")
    thresholds = {
        "max_bad_commands": ["limit"],
        "max_line_length": ["limit", "sasl_limit"],
        "max_commands": ["limit", "after_login", "per_message"],
        "non_compliant": ["strict_crlf", "unknown_commands", "username_chars"],
    }
    for key in PROTECTION_KEYS:
        for name in ["action", "overrides", *thresholds.get(key, [])]:
            expected.add(f"protections.{key}.{name}")
    assert expected <= documented, sorted(expected - documented)


def test_example_as_shipped_only_lacks_the_passwd_file() -> None:
    """Unmodified, the example is valid except for a passwd file that may not exist here."""
    if os.access("/etc/pop3shield/users.passwd", os.R_OK):
        assert load_config(EXAMPLE).auth.passwd_file == "/etc/pop3shield/users.passwd"
        return
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE)
    assert info.value.key == "auth.passwd_file"
    assert "cannot read /etc/pop3shield/users.passwd" in info.value.problem


def test_example_overrides_snippet_is_valid(base: dict[str, Any]) -> None:
    """The commented overrides example in [protections] must itself be valid config."""
    text = EXAMPLE.read_text(encoding="utf-8").split("[protections]\n", 1)[1]
    lines = [line[4:] for line in text.splitlines() if line.startswith("#   ")]
    snippet = tomllib.loads("\n".join(lines))
    config = parse(with_value(base, "protections.stls.overrides", snippet["overrides"]))
    assert config.protections.stls.action_for("192.0.2.10") is Action.INACTIVE
    assert config.protections.stls.action_for("2001:db8::1") is Action.INACTIVE
