"""Upstream mode in the config ([backend] type = "upstream") and the routing map."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from pop3shield.backends.routing import (
    EndpointError,
    RouteMap,
    RouteMapError,
    parse_endpoint,
    parse_routes,
)
from pop3shield.config import ConfigError, load_config, parse_config

SOURCE = "/etc/pop3shield/test.toml"


def parse(data: dict[str, Any], base_dir: Path | str = "/etc/pop3shield"):
    return parse_config(data, SOURCE, Path(base_dir))


def upstream(**backend: Any) -> dict[str, Any]:
    return {"backend": {"type": "upstream", "endpoint": "tcp:host=127.0.0.1:port=110", **backend}}


def error(data: dict[str, Any], base_dir: Path | str = "/etc/pop3shield") -> str:
    with pytest.raises(ConfigError) as caught:
        parse(data, base_dir)
    text = str(caught.value)
    assert "\n" not in text
    return text


def test_upstream_needs_no_passwd_file_and_has_defaults() -> None:
    config = parse(upstream())
    b = config.backend
    assert (b.type, b.endpoint, b.routes, b.stls, b.ca_file, b.verify, b.tls_hostname) == (
        "upstream", "tcp:host=127.0.0.1:port=110", None, False, None, True, None)
    assert (b.client_address, b.connect_timeout, b.login_timeout, b.response_timeout) == (
        "none", 10.0, 30.0, 60.0)
    assert config.auth.passwd_file is None


def test_upstream_errors() -> None:
    assert error({"backend": {"type": "upstream"}}) == (
        f"{SOURCE}: backend.endpoint: missing required key (backend.type = \"upstream\" needs an "
        "endpoint, a routes map, or both)")
    assert error(upstream(endpoint="imap:host=x")) == (
        f"{SOURCE}: backend.endpoint: unknown endpoint type 'imap' (expected tcp, tcp6, unix or tls)")
    assert error(upstream(endpoint="tcp:host=x:port=0")).endswith("needs port=1..65535, got '0'")
    assert error(upstream(endpoint="tls:host=x:port=995:certificate=a.pem")).endswith(
        "unsupported argument 'certificate' (host, port, timeout, bindAddress)")
    assert error(upstream(endpoint="tls:host=x:port=995", stls=True)) == (
        f"{SOURCE}: backend.stls: a tls: endpoint is already TLS; STLS is for a plain tcp: endpoint")
    assert error(upstream(client_address="haproxy")) == (
        f"{SOURCE}: backend.client_address: must be one of 'none', 'xclient', 'proxy', got 'haproxy'")
    assert error(upstream(login_timeout=0)) == (
        f"{SOURCE}: backend.login_timeout: must be greater than 0, got 0")
    assert error(upstream(ca_file="/nonexistent/ca.pem")) == (
        f"{SOURCE}: backend.ca_file: cannot read /nonexistent/ca.pem: No such file or directory")
    assert error(upstream(verifi=False)) == f"{SOURCE}: backend.verifi: unknown key (did you mean 'verify'?)"


def test_apop_cannot_be_relayed() -> None:
    data = upstream()
    data["server"] = {"apop": True}
    assert error(data) == (f"{SOURCE}: server.apop: APOP cannot be relayed (the upstream's challenge "
                           "differs); set it to false with backend.type = \"upstream\"")


def test_upstream_keys_refused_in_maildir_mode(tmp_path: Path) -> None:
    passwd = tmp_path / "p"
    passwd.write_text("")
    data = {"auth": {"passwd_file": str(passwd)}, "backend": {"endpoint": "tcp:host=x:port=1"}}
    assert error(data) == f"{SOURCE}: backend.endpoint: only for backend.type = \"upstream\""
    # the documented defaults written out are fine
    data["backend"] = {"verify": True, "stls": False, "client_address": "none"}
    assert parse(data).backend.type == "maildir"


def test_routes_file_is_checked_at_start(tmp_path: Path) -> None:
    routes = tmp_path / "routes"
    routes.write_text("alice tcp:host=10.0.0.1:port=110\nbob\n")
    assert error(upstream(routes="routes"), tmp_path) == (
        f"{SOURCE}: backend.routes: {routes}:2: expected 'USER ENDPOINT' or '@DOMAIN ENDPOINT'")
    routes.write_text("# ok\n\n@Example.ORG tls:host=pop.example.org:port=995\n")
    config = parse({"backend": {"type": "upstream", "routes": "routes"}}, tmp_path)
    assert config.backend.routes == str(routes) and config.backend.endpoint is None


def test_example_file_documents_the_upstream_keys() -> None:
    text = (Path(__file__).resolve().parent.parent / "etc" / "pop3shield.toml").read_text()
    for key in ("endpoint", "routes", "stls", "ca_file", "verify", "tls_hostname", "client_address",
                "connect_timeout", "login_timeout", "response_timeout", "oauth"):
        assert f"\n{key} =" in text or f"\n# {key} =" in text, key


def test_upstream_config_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "pop3shield.toml"
    path.write_text('[backend]\ntype = "upstream"\nendpoint = "tls:host=mail.internal:port=995"\n'
                    'client_address = "xclient"\n')
    config = load_config(path)
    assert config.backend.client_address == "xclient"


# -- endpoints and the routing map ------------------------------------------------------


def test_endpoints() -> None:
    e = parse_endpoint("tls:host=mail.internal:port=995")
    assert (e.implicit_tls, e.host, e.description) == (True, "mail.internal", "tcp:host=mail.internal:port=995")
    e = parse_endpoint("tcp:mail.internal:110")
    assert (e.implicit_tls, e.host, e.description) == (False, "mail.internal", "tcp:mail.internal:110")
    e = parse_endpoint("tcp6:host=\\:\\:1:port=110")
    assert e.host == "::1"
    assert parse_endpoint("unix:path=/run/dovecot/pop3").host is None
    for bad in ("", "tcp:port=110", "tcp:host=x", "tcp:host=x:port=110:host=y", "tcp:host=x\n:port=1"):
        with pytest.raises(EndpointError):
            parse_endpoint(bad)


def test_route_lookup_order(tmp_path: Path) -> None:
    path = tmp_path / "routes"
    path.write_text("alice@example.org tcp:host=10.0.0.1:port=110\n"
                    "@example.org      tcp:host=10.0.0.2:port=110\n"
                    "bob               tls:host=10.0.0.3:port=995\n")
    default = parse_endpoint("tcp:host=10.0.0.9:port=110")
    routes = RouteMap(default, str(path))
    assert routes.lookup("alice@example.org").host == "10.0.0.1"
    assert routes.lookup("carol@EXAMPLE.org").host == "10.0.0.2"
    assert routes.lookup("bob").implicit_tls
    assert routes.lookup("dave@example.com") is default
    assert RouteMap(None, str(path)).lookup("dave") is None


def test_route_map_reloads_and_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "routes"
    path.write_text("alice tcp:host=10.0.0.1:port=110\n")
    logged: list[str] = []

    class Log:
        def info(self, fmt: str, **kw: Any) -> None:
            logged.append("info " + fmt.format(**kw))

        def error(self, fmt: str, **kw: Any) -> None:
            logged.append("error " + fmt.format(**kw))

    routes = RouteMap(None, str(path), log=Log())
    assert routes.lookup("alice").host == "10.0.0.1"
    path.write_text("alice tcp:host=10.0.0.5:port=110\n")
    os.utime(path, ns=(1, 10**18))  # a different mtime even within one clock tick
    assert routes.lookup("alice").host == "10.0.0.5"
    path.write_text("alice tcp:host=10.0.0.6\n")  # broken: no port
    os.utime(path, ns=(1, 2 * 10**18))
    assert routes.lookup("alice").host == "10.0.0.5"
    assert routes.lookup("alice").host == "10.0.0.5"
    assert logged == [f"info reloaded routing map {path}: 1 routes",
                      f"error routing map {path} not reloaded, keeping the previous routes: "
                      f"{path}:1: needs port=1..65535, got ''"]  # once per broken version


def test_route_map_errors(tmp_path: Path) -> None:
    with pytest.raises(RouteMapError, match=r"routes:1: 'a' is listed twice|:2: 'a' is listed twice"):
        parse_routes("routes", b"a tcp:host=x:port=1\na tcp:host=y:port=1\n")
    with pytest.raises(RouteMapError, match=r"^routes:1: '@' is not an @domain$"):
        parse_routes("routes", b"@ tcp:host=x:port=1\n")
    with pytest.raises(RouteMapError, match=r"^routes: not valid UTF-8$"):
        parse_routes("routes", b"\xff tcp:host=x:port=1\n")
    with pytest.raises(RouteMapError, match=r"cannot read"):
        RouteMap(None, str(tmp_path / "missing"))


def test_settings_from_config_checks_the_ca_file(tmp_path: Path) -> None:
    from pop3shield.backends.upstream import settings_from_config

    (tmp_path / "ca.pem").write_text("not a certificate\n")
    config = parse(upstream(endpoint="tls:host=mail:port=995", ca_file="ca.pem"), tmp_path)
    with pytest.raises(ConfigError) as caught:
        settings_from_config(config)
    assert str(caught.value) == f"{SOURCE}: backend.ca_file: no PEM certificate in the CA file"
    settings = settings_from_config(parse(upstream(client_address="proxy", login_timeout=5)))
    assert (settings.endpoint.host, settings.client_address, settings.login_timeout) == ("127.0.0.1", "proxy", 5.0)


def test_service_builds_the_upstream_backend_and_preflight_knows_it(tmp_path: Path) -> None:
    from twisted.internet import reactor

    from pop3shield.backends.upstream import UpstreamBackend
    from pop3shield.service import build_backend, preflight

    config = parse(upstream(verify=False), tmp_path)  # no Maildir anywhere, no passwd file
    report = preflight(config)
    assert report.warnings == (f"{SOURCE}: backend.verify: false: upstream TLS certificates are not verified",)
    backend = build_backend(config, reactor)
    from zope.interface.verify import verifyObject

    from pop3shield.backends import IBackend

    assert isinstance(backend, UpstreamBackend) and backend.checker is None
    assert verifyObject(IBackend, backend)
    passwd = tmp_path / "users"
    passwd.write_text("alice:{PLAIN}x::::::\n")
    data = upstream()
    data["auth"] = {"passwd_file": str(passwd), "allow_plaintext": True}
    assert build_backend(parse(data, tmp_path), reactor).checker is not None
