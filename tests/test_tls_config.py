"""The new keys ([tls], auth.disable_plaintext_auth, server.shutdown_grace): validation with one
``FILE: key: problem`` line, the example file documenting them, start-up's warnings, the routing
map's forced reload, and the config comparison SIGHUP logs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import trustme

from pop3shield.backends.routing import RouteMap, RouteMapError
from pop3shield.config import Config, ConfigError, TLSConfig, load_config, parse_config
from pop3shield.lifecycle import config_changes
from pop3shield.service import preflight
from tests.support.pop3shield_server import REPO_ROOT
from tests.test_cli import good_config, run_cli


def _parse(tmp_path: Path, **sections: dict) -> Config:
    passwd = tmp_path / "users.passwd"
    passwd.touch()
    data = {"auth": {"passwd_file": str(passwd)}, **sections}
    if "auth" in sections:
        data["auth"] = {"passwd_file": str(passwd), **sections["auth"]}
    return parse_config(data, "test.toml", tmp_path)


def test_tls_keys(tmp_path: Path) -> None:
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    config = _parse(tmp_path, tls={"certificate": "c.pem", "min_version": "1.3"})
    assert config.tls == TLSConfig(certificate=str(cert), private_key=None, min_version="1.3")
    assert config.session_settings().stls_available
    assert not _parse(tmp_path).session_settings().stls_available
    for tls, problem in [
        ({"private_key": "c.pem"}, "test.toml: tls.private_key: needs tls.certificate"),
        ({"certificate": "missing.pem"}, f"test.toml: tls.certificate: cannot read {tmp_path / 'missing.pem'}: "
                                         "No such file or directory"),
        ({"certificate": "c.pem", "min_version": "1.1"}, "test.toml: tls.min_version: must be one of '1.2', "
                                                         "'1.3', got '1.1'"),
        ({"certficate": "c.pem"}, "test.toml: tls.certficate: unknown key (did you mean 'certificate'?)"),
    ]:
        with pytest.raises(ConfigError) as info:
            _parse(tmp_path, tls=tls)
        assert str(info.value) == problem


def test_auth_and_server_keys(tmp_path: Path) -> None:
    config = _parse(tmp_path, auth={"disable_plaintext_auth": True, "plaintext_auth_loopback": False},
                    server={"shutdown_grace": 0})
    settings = config.session_settings()
    assert settings.disable_plaintext_auth and not settings.plaintext_auth_loopback
    assert config.server.shutdown_grace == 0.0
    assert _parse(tmp_path).server.shutdown_grace == 10.0
    for server, problem in [({"shutdown_grace": -1}, "must be at least 0, got -1"),
                            ({"shutdown_grace": 4000}, "must be at most 3600 seconds, got 4000"),
                            ({"shutdown_grace": "10"}, "expected a number, got string")]:
        with pytest.raises(ConfigError) as info:
            _parse(tmp_path, server=server)
        assert str(info.value) == f"test.toml: server.shutdown_grace: {problem}"
    with pytest.raises(ConfigError, match=r"^test.toml: auth.disable_plaintext_auth: expected a boolean"):
        _parse(tmp_path, auth={"disable_plaintext_auth": "yes"})


def test_the_example_documents_the_tls_section() -> None:
    text = (REPO_ROOT / "etc" / "pop3shield.toml").read_text()
    section = text.split("\n[tls]\n", 1)[1].split("\n[", 1)[0]
    documented = set(re.findall(r"^#? ?([a-z_]+) = ", section, re.M))
    assert documented == {f.name for f in dataclasses.fields(TLSConfig)}


def test_a_broken_certificate_stops_start_up_with_one_line(tmp_path: Path) -> None:
    ca = trustme.CA()
    conf = good_config(tmp_path)
    key = tmp_path / "key.pem"
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(key))
    conf.write_text(conf.read_text() + f'[tls]\ncertificate = "{key}"\n')
    for command in (("check-config",), ("run", "--config")):
        result = run_cli(tmp_path, *command, str(conf))
        assert result.returncode == 2
        assert result.stderr.splitlines() == [f"pop3shield: {conf}: tls.certificate: {key}: no PEM certificate in it"]


def test_start_up_warns_about_tls_settings_that_cannot_work(tmp_path: Path) -> None:
    ca = trustme.CA()
    conf = good_config(tmp_path)
    cert = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
    base = conf.read_text()
    conf.write_text(base + f'[tls]\ncertificate = "{cert}"\n')
    assert [w.split(": ", 2)[1] for w in preflight(load_config(conf)).warnings] == ["protections.stls.action"]
    conf.write_text(base.replace("[auth]\n", "[auth]\ndisable_plaintext_auth = true\n"))
    (warning,) = preflight(load_config(conf)).warnings
    assert warning == (f"{conf}: auth.disable_plaintext_auth: no tls.certificate and no ssl: listener: "
                       f"only loopback clients can log in")
    conf.write_text(base.replace("[auth]\n", "[auth]\ndisable_plaintext_auth = true\n") + f'[tls]\ncertificate = '
                    f'"{cert}"\n[protections.stls]\naction = "inactive"\n')
    assert preflight(load_config(conf)).warnings == ()


def test_routing_map_reload_is_forced_and_a_broken_map_keeps_the_routes(tmp_path: Path) -> None:
    path = tmp_path / "routes"
    path.write_text("alice tcp:host=127.0.0.1:port=110\n")
    routes = RouteMap(None, str(path))
    stamp = path.stat()
    path.write_text("carol tcp:host=127.0.0.2:port=110\n")  # same size; the mtime may not move
    import os

    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert routes.reload() == 1
    assert routes.lookup("carol") is not None and routes.lookup("alice") is None
    (tmp_path / "good").write_text(path.read_text())
    path.write_text("carol not-an-endpoint\n")
    with pytest.raises(RouteMapError):
        routes.reload()
    assert routes.lookup("carol") == RouteMap(None, str(tmp_path / "good")).lookup("carol")  # still in use


def test_config_changes_name_the_dotted_keys(tmp_path: Path) -> None:
    running = _parse(tmp_path)
    same = _parse(tmp_path)
    assert config_changes(running, same) == []
    other = _parse(tmp_path, server={"listen": ["tcp:110"], "hostname": "mail.test"},
                   protections={"stls": {"action": "detect"}})
    assert config_changes(running, other) == ["server.listen", "server.hostname", "protections.stls.action"]
