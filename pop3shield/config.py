"""Load and validate the TOML configuration into frozen, typed dataclasses.

The loader is deliberately strict: an unknown key, a wrong type or an out-of-range value stops
the server at start-up with one line that names the file, the dotted key and the problem.  A
hardened server that silently ignores ``idel_timeout = 30`` is running with settings its operator
does not know about.

Relative paths are resolved against the directory of the config file (not the working
directory), so the same file means the same thing however the daemon is started.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import tomllib
import unicodedata
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pop3shield.core.settings import (
    PROTECTION_KEYS,
    Action,
    IPNetwork,
    Override,
    ProtectionsConfig,
    ProtectionSettings,
    SessionSettings,
)

__all__ = [
    "AnalysisConfig",
    "AuthConfig",
    "BackendConfig",
    "ConnectionLimitOverride",
    "Config",
    "ConfigError",
    "EventsConfig",
    "LoggingConfig",
    "MetricsConfig",
    "ServerConfig",
    "StateConfig",
    "TLSConfig",
    "load_config",
    "parse_config",
]

DEFAULT_SOURCE = "<default>"

#: first field of a Twisted server endpoint string we expect to see in ``server.listen``
ENDPOINT_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix", "systemd", "haproxy"})
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
LOG_FORMATS = ("text", "json")
BACKEND_TYPES = ("maildir", "upstream")
#: how the upstream learns the client's address: not at all, Dovecot's XCLIENT, PROXY protocol v2
CLIENT_ADDRESS_MODES = ("none", "xclient", "proxy")
UNKNOWN_COMMAND_MODES = ("bad_command", "violation")
#: RFC 1939 section 3: the autologout timer "MUST be of at least 10 minutes' duration"
RFC1939_MIN_IDLE = 600.0
MIN_LINE_LIMIT = 64
MIN_INPUT_BUFFER = 1024

_HOST_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_REALM_FORM = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
    r":[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*$"
)


class ConfigError(Exception):
    """A configuration problem, shown to the operator as one ``file: key: problem`` line."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = _one_line(file)
        self.key = _one_line(key)
        self.problem = _one_line(problem)
        super().__init__(f"{self.file}: {self.key}: {self.problem}")


#: everything str.splitlines() splits on
_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


def _one_line(text: str) -> str:
    """Escape line breaks so a hostile or odd value cannot forge extra log lines."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii") if ch in _LINE_BREAKS else ch for ch in str(text)
    )


# --------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class ConnectionLimitOverride:
    """``server.connection_limits`` entry: other per-address limits for addresses in these networks."""

    networks: tuple[IPNetwork, ...]
    max_connections_per_ip: int | None = None
    new_connections_per_ip: float | None = None
    new_connections_burst: int | None = None


@dataclass(frozen=True)
class ServerConfig:
    """Listening, greeting and resource limits of the front-end."""

    listen: tuple[str, ...] = ("tcp:1110:interface=127.0.0.1",)
    hostname: str = "localhost"
    implementation: str | None = None
    apop: bool = False
    max_connections: int = 1000
    #: connections from one address not logged in yet: a NAT of a few hundred users logging in
    max_connections_per_ip: int = 300
    #: new connections a second from one address (a token bucket), and its burst; 0 = no limit
    new_connections_per_ip: float = 30.0
    new_connections_burst: int = 300
    #: per-network overrides of the three above, first match wins
    connection_limits: tuple[ConnectionLimitOverride, ...] = ()
    #: sessions logged in as one user from one address (Dovecot's mail_max_userip_connections)
    max_connections_per_user_ip: int = 10
    login_timeout: float = 60.0
    #: seconds from the connection to a login, however busy the client (Dovecot: 180); 0 = none
    login_deadline: float = 180.0
    idle_timeout: float = 600.0
    greeting_delay: float = 0.0
    auth_failure_delay: float = 2.0
    auth_failure_delay_max: float = 15.0
    #: failures counted for the address, the user name, the pair, from which a login is refused without
    #: checking the password (0: always checked); a NAT's address sees many users' typos
    auth_unchecked_address: int = 100
    auth_unchecked_user: int = 30
    auth_unchecked_pair: int = 10
    input_buffer_limit: int = 65536
    thread_pool_size: int = 10
    #: threads that verify password hashes for logins of a user from an address it logged in from
    #: lately, apart from thread_pool_size's mailbox I/O
    hash_threads: int = 4
    #: low-priority threads (nice 19) that verify the other logins (fresh addresses, guessers); 0: half
    #: the cores divided among the workers (at least one), so a flood of first guesses never crowds
    #: out a known user and its hash memory stays bounded
    hash_threads_untrusted: int = 0
    #: peers (CIDR) whose connections must start with a PROXY v1/v2 header naming the client
    proxy_protocol_networks: tuple[IPNetwork, ...] = ()
    #: seconds a trusted proxy has to send that header
    proxy_protocol_timeout: float = 5.0
    #: seconds SIGTERM lets sessions finish before it closes them (without UPDATE)
    shutdown_grace: float = 10.0
    #: worker processes sharing the listening sockets (1: one process, as before); default: the cores
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    #: octets waiting for a client beyond which its connection stops reading and producing
    output_buffer_limit: int = 262144
    #: seconds a client may take no output (or a closing connection may not flush) before the abort
    write_stall_timeout: float = 60.0


@dataclass(frozen=True)
class AuthConfig:
    """Where credentials come from."""

    passwd_file: str | None = None
    allow_plaintext: bool = False
    realm: str | None = None
    #: Dovecot's disable_plaintext_auth: USER/PASS, APOP and AUTH refused before TLS
    disable_plaintext_auth: bool = False
    #: with disable_plaintext_auth, loopback and unix-socket clients may still log in without TLS
    plaintext_auth_loopback: bool = True


@dataclass(frozen=True)
class BackendConfig:
    """The mail store behind the front-end."""

    type: str = "maildir"
    maildir: str = "/var/mail/{user}/Maildir"
    #: upstream mode: the default upstream, a Twisted client endpoint string (``tls:`` = implicit TLS)
    endpoint: str | None = None
    #: upstream mode: a map file of ``USER ENDPOINT`` / ``@DOMAIN ENDPOINT`` lines
    routes: str | None = None
    #: upstream mode: STLS toward a plain ``tcp:`` upstream (required, verified like ``tls:``)
    stls: bool = False
    #: upstream mode: PEM file of the CAs that sign upstream certificates (unset: the system's)
    ca_file: str | None = None
    #: upstream mode: verify the upstream's certificate and host name (false warns at every start)
    verify: bool = True
    #: upstream mode: the name the certificate must carry (unset: the endpoint's host)
    tls_hostname: str | None = None
    #: upstream mode: "none", "xclient" (Dovecot) or "proxy" (PROXY protocol v2 header)
    client_address: str = "none"
    connect_timeout: float = 10.0
    login_timeout: float = 30.0
    response_timeout: float = 60.0
    #: upstream mode: offer XOAUTH2 and OAUTHBEARER, relayed to upstreams that offer them
    oauth: bool = False


@dataclass(frozen=True)
class EventsConfig:
    """The JSON-lines security event stream."""

    path: str | None = None
    rate_limit: int = 60
    global_rate_limit: int = 600


@dataclass(frozen=True)
class LoggingConfig:
    """The operational log."""

    path: str = "-"
    format: str = "text"
    level: str = "info"
    #: info lines of closed sessions per source address per minute, and from all sources
    rate_limit: int = 60
    global_rate_limit: int = 600


STATE_ON_ERROR = ("fail-closed", "fail-open")


@dataclass(frozen=True)
class StateConfig:
    """Where the state shared by several pop3shield processes lives (failure counts, connections)."""

    #: ``redis://[:password@]host:port/db`` (or ``rediss://``, ``unix://``); not set = this process only
    redis: str | None = field(default=None, repr=False)  # may hold a password
    on_error: str = "fail-closed"
    #: seconds each Redis command may take, connecting included
    timeout: float = 0.5
    #: Redis commands waiting for the state's threads; beyond it a command fails at once
    max_queue: int = 256
    #: key prefix, so several deployments can share one Redis
    prefix: str = "pop3shield:"
    #: seconds after which a connection whose process stopped renewing it no longer counts
    connection_ttl: float = 60.0


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint: on when the ``[metrics]`` table is there, unless ``enabled = false``."""

    enabled: bool = False
    #: a Twisted endpoint string; loopback by default (metrics tell who logs in how often)
    listen: str = "tcp:9110:interface=127.0.0.1"


TLS_VERSIONS = ("1.2", "1.3")


@dataclass(frozen=True)
class TLSConfig:
    """The certificate STLS uses (re-read on SIGHUP); without ``certificate`` STLS is never offered."""

    #: PEM file: the server certificate, then its chain (intermediates), leaf first
    certificate: str | None = None
    #: PEM file of the private key; unset: the key is in the certificate file too
    private_key: str | None = None
    #: lowest TLS version accepted
    min_version: str = "1.2"


#: endpoint types the metrics endpoint may listen on (no haproxy: scrapers connect directly)
METRICS_ENDPOINT_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix", "systemd"})


@dataclass(frozen=True)
class AnalysisConfig:
    """The malicious-code detector's slow tier: its threads and its queue, shared fairly by source."""

    threads: int = 2
    #: analyses queued (waiting for a thread) in all
    max_queue: int = 32
    #: threads one source may hold at once; unset: max(1, threads // 2)
    source_threads: int = 1
    #: queued analyses one source may hold; unset: max(1, max_queue // 2)
    source_queue: int = 16
    #: seconds an analysis may wait for a thread before its command is refused ([SYS/TEMP])
    wait: float = 2.0
    #: a source is the client's address collapsed to this network size
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64


@dataclass(frozen=True)
class Config:
    """The whole, validated configuration."""

    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    state: StateConfig = field(default_factory=StateConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    protections: ProtectionsConfig = field(default_factory=ProtectionsConfig)
    source: str = DEFAULT_SOURCE
    tls: TLSConfig = field(default_factory=TLSConfig)

    def session_settings(self) -> SessionSettings:
        """The per-session view the sans-I/O core runs on."""
        return SessionSettings(
            hostname=self.server.hostname,
            implementation=self.server.implementation,
            apop=self.server.apop,
            input_buffer_limit=self.server.input_buffer_limit,
            protections=self.protections,
            sasl_mechanisms=("PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER") if self.backend.oauth
            else ("PLAIN", "LOGIN"),
            stls_available=self.tls.certificate is not None,
            disable_plaintext_auth=self.auth.disable_plaintext_auth,
            plaintext_auth_loopback=self.auth.plaintext_auth_loopback,
        )


# --------------------------------------------------------------------------- table reader

_MISSING: Any = object()


def _type_name(value: object) -> str:
    """TOML's name for the type of a parsed value (bool before int: bool is an int subclass)."""
    if isinstance(value, bool):
        return "boolean"
    names = ((int, "integer"), (float, "float"), (str, "string"), (list, "array"), (dict, "table"))
    for kind, name in names:
        if isinstance(value, kind):
            return name
    return type(value).__name__  # datetime, date, time


def _expected(what: str, value: object) -> str:
    article = "an" if what[0] in "aeiou" else "a"
    return f"expected {article} {what}, got {_type_name(value)}"


@dataclass
class _Context:
    """What every error needs: the file name; what every path needs: its base directory."""

    source: str
    base_dir: Path

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, key, problem)


class _Table:
    """One TOML table under validation; knows its dotted path so errors can name the key."""

    def __init__(self, ctx: _Context, path: str, data: Mapping[str, Any], allowed: Collection[str]):
        self.ctx = ctx
        self.path = path
        self.data = data
        for name, value in data.items():
            if name not in allowed:
                raise ctx.error(self.key(name), _unknown(name, value, allowed, path))

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def error(self, name: str, problem: str) -> ConfigError:
        return self.ctx.error(self.key(name), problem)

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            raise self.error(name, "missing required key")
        return default

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name, default)
        if not isinstance(value, bool):
            raise self.error(name, _expected("boolean", value))
        return value

    def integer(self, name: str, default: int, minimum: int, maximum: int | None = None) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, _expected("integer", value))
        self._check_range(name, value, minimum, maximum)
        return value

    def number(self, name: str, default: float, minimum: float, *, above: bool = False) -> float:
        """A float; TOML ints are accepted because ``timeout = 60`` is what people write."""
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(name, _expected("number", value))
        value = float(value)
        if not math.isfinite(value):
            raise self.error(name, f"must be a finite number, got {value}")
        if above and value <= minimum:
            raise self.error(name, f"must be greater than {minimum:g}, got {value:g}")
        self._check_range(name, value, minimum, None)
        return value

    def string(self, name: str, default: Any = _MISSING, choices: Collection[str] | None = None) -> Any:
        value = self.raw(name, default)
        if value is None and default is None:
            return None
        if not isinstance(value, str):
            raise self.error(name, _expected("string", value))
        if choices is not None and value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise self.error(name, f"must be one of {allowed}, got {value!r}")
        return value

    def array(self, name: str, default: Any = _MISSING) -> list[Any]:
        value = self.raw(name, default)
        if not isinstance(value, list):
            raise self.error(name, _expected("array", value))
        return value

    def table(self, name: str) -> dict[str, Any]:
        value = self.raw(name, {})
        if not isinstance(value, dict):
            raise self.error(name, _expected("table", value))
        return value

    def _check_range(self, name: str, value: float, minimum: float, maximum: float | None) -> None:
        if value < minimum:
            raise self.error(name, f"must be at least {minimum:g}, got {value:g}")
        if maximum is not None and value > maximum:
            raise self.error(name, f"must be at most {maximum:g}, got {value:g}")


def _unknown(name: str, value: object, allowed: Collection[str], path: str) -> str:
    """'unknown key', with a did-you-mean hint because most unknown keys are typos."""
    what = "unknown section" if isinstance(value, dict) else "unknown key"
    home = _section_of(name) if not path else None
    if home:  # a known key above its section header: the header was forgotten (checked first:
        return f"{what} (did you mean '{home}.{name}'?)"  # "hostname" is also close to "state")
    close = difflib.get_close_matches(name, list(allowed), n=1)
    if close:
        return f"{what} (did you mean {close[0]!r}?)"
    return what


def _section_of(name: str) -> str | None:
    """The section a top-level stray key belongs in (a forgotten ``[server]`` header)."""
    for section, kind in _SECTION_CLASSES.items():
        if name in {f.name for f in dataclasses.fields(kind)}:
            return section
    return None


# --------------------------------------------------------------------------- value checks


def _check_control(table: _Table, name: str, value: str) -> None:
    """Control characters in names and paths only ever cause trouble (log forging, NUL paths)."""
    if any(unicodedata.category(ch).startswith("C") for ch in value):
        raise table.error(name, "must not contain control characters")


def _resolve_path(table: _Table, name: str, value: str) -> str:
    """Make a path absolute against the config file's directory, so start-up cwd never matters."""
    if not value:
        raise table.error(name, "must not be empty")
    _check_control(table, name, value)
    if os.path.isabs(value):
        return os.path.normpath(value)
    return os.path.normpath(os.path.join(table.ctx.base_dir, value))


def _hostname(table: _Table, name: str, default: str) -> str:
    value: str = table.string(name, default)
    labels = value.rstrip(".").split(".")
    if not value or len(value) > 255 or not all(_HOST_LABEL.match(label) for label in labels):
        raise table.error(
            name, f"not a plausible host name: {value!r} (letters, digits, '-' and '.'; at most 255)"
        )
    return value


def _implementation(table: _Table, name: str) -> str | None:
    value: str | None = table.string(name, None)
    if value is None:
        return None
    if not value.strip():
        raise table.error(name, "must not be empty (leave the key out to advertise nothing)")
    _check_control(table, name, value)
    if len(value) > 200:
        raise table.error(name, f"must be at most 200 characters, got {len(value)}")
    return value


def _listen(table: _Table, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """Syntactic check only: real endpoint parse errors surface when the server listens."""
    items = table.array(name, list(default))
    if not items:
        raise table.error(name, "must list at least one endpoint")
    result = []
    for index, item in enumerate(items):
        key = f"{name}[{index}]"
        if not isinstance(item, str):
            raise table.error(key, _expected("string", item))
        if not item.strip():
            raise table.error(key, "must not be empty")
        _check_control(table, key, item)
        kind = item.split(":", 1)[0].strip().lower()
        if kind not in ENDPOINT_TYPES:
            known = ", ".join(sorted(ENDPOINT_TYPES))
            raise table.error(key, f"unknown endpoint type {kind!r} (expected one of {known})")
        result.append(item)
    return tuple(result)


# --------------------------------------------------------------------------- sections


def _parse_server(ctx: _Context, data: dict[str, Any]) -> ServerConfig:
    d = ServerConfig()
    t = _Table(ctx, "server", data, _field_names(ServerConfig))
    delay = t.number("auth_failure_delay", d.auth_failure_delay, 0.0)
    config = ServerConfig(
        listen=_listen(t, "listen", d.listen),
        hostname=_hostname(t, "hostname", d.hostname),
        implementation=_implementation(t, "implementation"),
        apop=t.boolean("apop", d.apop),
        max_connections=t.integer("max_connections", d.max_connections, 1),
        # unset: 300, or max_connections when that is lower (a small server need not say it twice)
        max_connections_per_ip=t.integer("max_connections_per_ip", min(d.max_connections_per_ip,
                                                                       t.integer("max_connections",
                                                                                 d.max_connections, 1)), 1),
        new_connections_per_ip=t.number("new_connections_per_ip", d.new_connections_per_ip, 0.0),
        new_connections_burst=t.integer("new_connections_burst", d.new_connections_burst, 1),
        connection_limits=_connection_limits(t),
        max_connections_per_user_ip=t.integer("max_connections_per_user_ip", d.max_connections_per_user_ip, 1),
        login_timeout=t.number("login_timeout", d.login_timeout, 0.0, above=True),
        login_deadline=t.number("login_deadline", d.login_deadline, 0.0),
        idle_timeout=t.number("idle_timeout", d.idle_timeout, RFC1939_MIN_IDLE),
        greeting_delay=_greeting_delay(t, d.greeting_delay),
        auth_failure_delay=delay,
        auth_failure_delay_max=_delay_max(t, delay, d.auth_failure_delay_max),
        auth_unchecked_address=t.integer("auth_unchecked_address", d.auth_unchecked_address, 0),
        auth_unchecked_user=t.integer("auth_unchecked_user", d.auth_unchecked_user, 0),
        auth_unchecked_pair=t.integer("auth_unchecked_pair", d.auth_unchecked_pair, 0),
        input_buffer_limit=t.integer("input_buffer_limit", d.input_buffer_limit, MIN_INPUT_BUFFER),
        thread_pool_size=t.integer("thread_pool_size", d.thread_pool_size, 1, 256),
        hash_threads=t.integer("hash_threads", d.hash_threads, 1, 256),
        hash_threads_untrusted=t.integer("hash_threads_untrusted", d.hash_threads_untrusted, 0, 256),
        proxy_protocol_networks=tuple(_network(t, f"proxy_protocol_networks[{i}]", text) for i, text in
                                      enumerate(t.array("proxy_protocol_networks", []))),
        proxy_protocol_timeout=_proxy_timeout(t, d.proxy_protocol_timeout),
        shutdown_grace=_shutdown_grace(t, d.shutdown_grace),
        workers=t.integer("workers", d.workers, 1, 256),
        output_buffer_limit=t.integer("output_buffer_limit", d.output_buffer_limit, 4096, 64 * 1024 * 1024),
        write_stall_timeout=t.number("write_stall_timeout", d.write_stall_timeout, 0.0, above=True),
    )
    if config.proxy_protocol_networks:
        for index, item in enumerate(config.listen):
            if item.split(":", 1)[0].strip().lower() == "haproxy":
                raise t.error(f"listen[{index}]", "a 'haproxy:' endpoint reads the PROXY header itself, from any "
                                                  "peer; with server.proxy_protocol_networks use a 'tcp:' endpoint")
    if config.max_connections_per_ip > config.max_connections:
        raise t.error(
            "max_connections_per_ip",
            f"must not exceed server.max_connections ({config.max_connections}), "
            f"got {config.max_connections_per_ip}",
        )
    return config


def _connection_limits(table: _Table) -> tuple[ConnectionLimitOverride, ...]:
    """``[{ networks = ["10.0.0.0/8"], max_connections_per_ip = 2000, new_connections_per_ip = 100 }]``."""
    result = []
    for index, item in enumerate(table.array("connection_limits", [])):
        key = table.key(f"connection_limits[{index}]")
        if not isinstance(item, dict):
            raise table.ctx.error(key, _expected("table", item))
        names = ("networks", "max_connections_per_ip", "new_connections_per_ip", "new_connections_burst")
        sub = _Table(table.ctx, key, item, names)
        networks = sub.array("networks")
        if not networks:
            raise sub.error("networks", "must list at least one network")
        if len(item) == 1:
            raise sub.error("networks", "the entry sets no limit (max_connections_per_ip, new_connections_per_ip "
                                        "or new_connections_burst)")
        result.append(ConnectionLimitOverride(
            networks=tuple(_network(sub, f"networks[{i}]", text) for i, text in enumerate(networks)),
            max_connections_per_ip=sub.integer("max_connections_per_ip", None, 1)
            if "max_connections_per_ip" in item else None,
            new_connections_per_ip=sub.number("new_connections_per_ip", 0.0, 0.0)
            if "new_connections_per_ip" in item else None,
            new_connections_burst=sub.integer("new_connections_burst", 1, 1)
            if "new_connections_burst" in item else None,
        ))
    return tuple(result)


def _proxy_timeout(table: _Table, default: float) -> float:
    """Seconds for a trusted proxy's header; it sends it at once, so a long wait only holds a socket."""
    value = table.number("proxy_protocol_timeout", default, 0.0, above=True)
    if value > 60.0:
        raise table.error("proxy_protocol_timeout", f"must be at most 60 seconds, got {value:g}")
    return value


def _shutdown_grace(table: _Table, default: float) -> float:
    """Seconds sessions get to finish after SIGTERM; systemd's TimeoutStopSec must be longer."""
    value = table.number("shutdown_grace", default, 0.0)
    if value > 3600.0:
        raise table.error("shutdown_grace", f"must be at most 3600 seconds, got {value:g}")
    return value


def _greeting_delay(table: _Table, default: float) -> float:
    """Seconds to hold the greeting; a client that talks first is not a POP3 client."""
    value = table.number("greeting_delay", default, 0.0)
    if value > 30.0:
        raise table.error("greeting_delay", f"must be at most 30 seconds, got {value:g}")
    return value


def _delay_max(table: _Table, delay: float, default: float) -> float:
    """The back-off cap; below the base delay the back-off could never start."""
    value = table.number("auth_failure_delay_max", default, 0.0)
    if value < delay:
        raise table.error(
            "auth_failure_delay_max",
            f"must be at least server.auth_failure_delay ({delay:g}), got {value:g}",
        )
    return value


def _parse_auth(ctx: _Context, data: dict[str, Any], upstream: bool = False) -> AuthConfig:
    t = _Table(ctx, "auth", data, _field_names(AuthConfig))
    realm: str | None = t.string("realm", None)
    if realm is not None and not _REALM_FORM.match(realm):
        raise t.error("realm", f"expected 'package.module:attribute', got {realm!r}")
    if realm is not None and upstream:
        raise t.error("realm", "not used with backend.type = \"upstream\" (the upstream is the realm)")
    passwd: str | None = t.string("passwd_file", None)
    if passwd is None and realm is None and not upstream:
        raise t.error("passwd_file", "missing required key (needed unless auth.realm is set)")
    if passwd is not None:
        passwd = _resolve_path(t, "passwd_file", passwd)
        _check_readable(t, "passwd_file", passwd)
    return AuthConfig(
        passwd_file=passwd,
        allow_plaintext=t.boolean("allow_plaintext", False),
        realm=realm,
        disable_plaintext_auth=t.boolean("disable_plaintext_auth", AuthConfig.disable_plaintext_auth),
        plaintext_auth_loopback=t.boolean("plaintext_auth_loopback", AuthConfig.plaintext_auth_loopback),
    )


def _check_readable(table: _Table, name: str, path: str) -> None:
    """Fail at start-up, not at the first login, when the credentials file cannot be read."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise table.error(name, f"cannot read {path}: {exc.strerror or exc}") from None


def _parse_backend(ctx: _Context, data: dict[str, Any]) -> BackendConfig:
    d = BackendConfig()
    t = _Table(ctx, "backend", data, _field_names(BackendConfig))
    kind = t.string("type", d.type, BACKEND_TYPES)
    if kind != "upstream":
        for name in sorted(set(data) - {"type", "maildir"}):
            if data[name] != getattr(d, name):
                raise t.error(name, "only for backend.type = \"upstream\"")
    endpoint = _endpoint(t, "endpoint")
    routes: str | None = t.string("routes", None)
    if routes is not None:
        routes = _resolve_path(t, "routes", routes)
        _check_routes(t, "routes", routes)
    if kind == "upstream" and endpoint is None and routes is None:
        raise t.error("endpoint", "missing required key (backend.type = \"upstream\" needs an "
                                  "endpoint, a routes map, or both)")
    stls = t.boolean("stls", d.stls)
    if stls and endpoint is not None and endpoint.lower().startswith("tls:"):
        raise t.error("stls", "a tls: endpoint is already TLS; STLS is for a plain tcp: endpoint")
    ca_file: str | None = t.string("ca_file", None)
    if ca_file is not None:
        ca_file = _resolve_path(t, "ca_file", ca_file)
        _check_readable(t, "ca_file", ca_file)
    tls_hostname: str | None = t.string("tls_hostname", None)
    if tls_hostname is not None:
        tls_hostname = _hostname(t, "tls_hostname", tls_hostname)
    return BackendConfig(
        type=kind,
        maildir=_maildir(t, "maildir", d.maildir),
        endpoint=endpoint,
        routes=routes,
        stls=stls,
        ca_file=ca_file,
        verify=t.boolean("verify", d.verify),
        tls_hostname=tls_hostname,
        client_address=t.string("client_address", d.client_address, CLIENT_ADDRESS_MODES),
        connect_timeout=t.number("connect_timeout", d.connect_timeout, 0.0, above=True),
        login_timeout=t.number("login_timeout", d.login_timeout, 0.0, above=True),
        response_timeout=t.number("response_timeout", d.response_timeout, 0.0, above=True),
        oauth=t.boolean("oauth", d.oauth),
    )


def _endpoint(table: _Table, name: str) -> str | None:
    from pop3shield.backends.routing import EndpointError, parse_endpoint

    value: str | None = table.string(name, None)
    if value is None:
        return None
    try:
        parse_endpoint(value)
    except EndpointError as exc:
        raise table.error(name, str(exc)) from None
    return value


def _check_routes(table: _Table, name: str, path: str) -> None:
    from pop3shield.backends.routing import RouteMap, RouteMapError

    try:
        RouteMap(None, path)
    except RouteMapError as exc:
        raise table.error(name, str(exc)) from None


def _maildir(table: _Table, name: str, default: str) -> str:
    """The per-user path pattern; ``{user}`` must survive normalisation exactly once."""
    value: str = table.string(name, default)
    resolved = _resolve_path(table, name, value)
    if resolved.count("{user}") != 1:
        raise table.error(name, "must contain '{user}' exactly once (after resolving '..')")
    rest = resolved.replace("{user}", "")
    if "{" in rest or "}" in rest:
        raise table.error(name, "'{user}' is the only placeholder allowed; no other braces")
    return resolved


def _parse_tls(ctx: _Context, data: dict[str, Any]) -> TLSConfig:
    """Paths and the version here; the PEM contents are checked by start-up's preflight."""
    d = TLSConfig()
    t = _Table(ctx, "tls", data, _field_names(TLSConfig))
    paths: dict[str, str | None] = {}
    for name in ("certificate", "private_key"):
        value: str | None = t.string(name, None)
        if value is not None:
            value = _resolve_path(t, name, value)
            _check_readable(t, name, value)
        paths[name] = value
    if paths["private_key"] is not None and paths["certificate"] is None:
        raise t.error("private_key", "needs tls.certificate")
    return TLSConfig(certificate=paths["certificate"], private_key=paths["private_key"],
                     min_version=t.string("min_version", d.min_version, TLS_VERSIONS))


def _parse_events(ctx: _Context, data: dict[str, Any]) -> EventsConfig:
    d = EventsConfig()
    t = _Table(ctx, "events", data, _field_names(EventsConfig))
    path: str | None = t.string("path", None)
    if path == "-":
        raise t.error("path", "'-' is not a file; leave the key out to send events to the log only")
    return EventsConfig(
        path=None if path is None else _resolve_path(t, "path", path),
        rate_limit=t.integer("rate_limit", d.rate_limit, 1),
        global_rate_limit=t.integer("global_rate_limit", d.global_rate_limit, 1),
    )


def _parse_state(ctx: _Context, data: dict[str, Any]) -> StateConfig:
    d = StateConfig()
    t = _Table(ctx, "state", data, _field_names(StateConfig))
    url: str | None = t.string("redis", None)
    if url is not None:
        _check_control(t, "redis", url)
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme not in ("redis", "rediss", "unix"):
            raise t.error("redis", "expected a redis://, rediss:// or unix:// URL")
    timeout = t.number("timeout", d.timeout, 0.0, above=True)
    if timeout > 10.0:
        raise t.error("timeout", f"must be at most 10 seconds (it bounds a login), got {timeout:g}")
    prefix = t.string("prefix", d.prefix)
    _check_control(t, "prefix", prefix)
    ttl = t.number("connection_ttl", d.connection_ttl, 0.0)
    if ttl < 3.0:
        raise t.error("connection_ttl", f"must be at least 3 seconds, got {ttl:g}")
    return StateConfig(redis=url, on_error=t.string("on_error", d.on_error, STATE_ON_ERROR), timeout=timeout,
                       max_queue=t.integer("max_queue", d.max_queue, 1), prefix=prefix, connection_ttl=ttl)


def _parse_logging(ctx: _Context, data: dict[str, Any]) -> LoggingConfig:
    d = LoggingConfig()
    t = _Table(ctx, "logging", data, _field_names(LoggingConfig))
    path: str = t.string("path", d.path)
    return LoggingConfig(
        path=path if path == "-" else _resolve_path(t, "path", path),
        format=t.string("format", d.format, LOG_FORMATS),
        level=t.string("level", d.level, LOG_LEVELS),
        rate_limit=t.integer("rate_limit", d.rate_limit, 1),
        global_rate_limit=t.integer("global_rate_limit", d.global_rate_limit, 1),
    )


def _parse_metrics(ctx: _Context, data: dict[str, Any], present: bool) -> MetricsConfig:
    d = MetricsConfig()
    t = _Table(ctx, "metrics", data, _field_names(MetricsConfig))
    enabled = t.boolean("enabled", present)
    listen: str = t.string("listen", d.listen)
    if not listen.strip():
        raise t.error("listen", "must not be empty")
    _check_control(t, "listen", listen)
    kind = listen.split(":", 1)[0].strip().lower()
    if kind not in METRICS_ENDPOINT_TYPES:
        known = ", ".join(sorted(METRICS_ENDPOINT_TYPES))
        raise t.error("listen", f"unknown endpoint type {kind!r} (expected one of {known})")
    return MetricsConfig(enabled=enabled, listen=listen)


def _parse_analysis(ctx: _Context, data: dict[str, Any]) -> AnalysisConfig:
    d = AnalysisConfig()
    t = _Table(ctx, "analysis", data, _field_names(AnalysisConfig))
    threads = t.integer("threads", d.threads, 1, 64)
    max_queue = t.integer("max_queue", d.max_queue, 1, 100_000)
    source_threads = t.integer("source_threads", max(1, threads // 2), 1, threads)
    source_queue = t.integer("source_queue", max(1, max_queue // 2), 1, max_queue)
    wait = t.number("wait", d.wait, 0.0, above=True)
    if wait > 60.0:
        raise t.error("wait", f"must be at most 60 seconds (the client waits that long), got {wait:g}")
    return AnalysisConfig(threads=threads, max_queue=max_queue, source_threads=source_threads,
                          source_queue=source_queue, wait=wait,
                          ipv4_prefix=t.integer("ipv4_prefix", d.ipv4_prefix, 0, 32),
                          ipv6_prefix=t.integer("ipv6_prefix", d.ipv6_prefix, 0, 128))


# --------------------------------------------------------------------------- protections


def _parse_protections(ctx: _Context, data: dict[str, Any], buffer_limit: int) -> ProtectionsConfig:
    t = _Table(ctx, "protections", data, ("action", *PROTECTION_KEYS))
    default_action = _action(t, "action", Action.PREVENT)
    values: dict[str, Any] = {}
    for key in PROTECTION_KEYS:
        extra = _THRESHOLDS.get(key)
        allowed = ("action", "overrides", *(extra[0] if extra else ()))
        sub = _Table(ctx, t.key(key), t.table(key), allowed)
        values[key] = ProtectionSettings(_action(sub, "action", default_action), _overrides(sub))
        if extra:
            values.update(extra[1](sub, buffer_limit))
    return ProtectionsConfig(**values)


def _action(table: _Table, name: str, default: Action) -> Action:
    choices = [a.value for a in Action]
    return Action(table.string(name, default.value, choices))


def _overrides(table: _Table) -> tuple[Override, ...]:
    result = []
    for index, item in enumerate(table.array("overrides", [])):
        key = table.key(f"overrides[{index}]")
        if not isinstance(item, dict):
            raise table.ctx.error(key, _expected("table", item))
        sub = _Table(table.ctx, key, item, ("networks", "action"))
        networks = sub.array("networks")
        if not networks:
            raise sub.error("networks", "must list at least one network")
        parsed = tuple(_network(sub, f"networks[{i}]", text) for i, text in enumerate(networks))
        action = Action(sub.string("action", _MISSING, [a.value for a in Action]))
        result.append(Override(networks=parsed, action=action))
    return tuple(result)


def _network(table: _Table, name: str, text: object) -> IPNetwork:
    """A CIDR network; host bits set is an error because it usually hides a typo'd prefix."""
    if not isinstance(text, str):
        raise table.error(name, _expected("string", text))
    try:
        network: IPNetwork = ipaddress.ip_network(text, strict=True)
    except ValueError:
        raise table.error(name, _network_problem(text)) from None
    return _unmap(network)


def _network_problem(text: str) -> str:
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return f"not an IP network: {text!r}"
    return f"{text!r} has host bits set (did you mean '{loose}'?)"


def _unmap(network: IPNetwork) -> IPNetwork:
    """``::ffff:192.0.2.0/120`` becomes ``192.0.2.0/24``: peers are matched as IPv4 addresses."""
    mapped = network.network_address.ipv4_mapped if network.version == 6 else None
    if mapped is None or network.prefixlen < 96:
        return network
    return ipaddress.IPv4Network((mapped, network.prefixlen - 96))


def _bad_commands(t: _Table, _buffer_limit: int) -> dict[str, Any]:
    return {"bad_commands_limit": t.integer("limit", ProtectionsConfig.bad_commands_limit, 1)}


def _commands(t: _Table, _buffer_limit: int) -> dict[str, Any]:
    """``limit`` counts the commands before login; after it, ``after_login + per_message * n``.

    ``limit`` used to count the whole connection; an old file's value is still valid and now
    bounds the commands before login only.
    """
    d = ProtectionsConfig()
    return {
        "commands_limit": t.integer("limit", d.commands_limit, 1),
        "commands_after_login": t.integer("after_login", d.commands_after_login, 1),
        "commands_per_message": t.integer("per_message", d.commands_per_message, 0),
    }


def _line_length(t: _Table, buffer_limit: int) -> dict[str, Any]:
    """Line limits below the hard input cap, or the cap would trigger first and mask them."""
    d = ProtectionsConfig()
    limits = {
        "line_length_limit": t.integer("limit", d.line_length_limit, MIN_LINE_LIMIT),
        "sasl_line_limit": t.integer("sasl_limit", d.sasl_line_limit, MIN_LINE_LIMIT),
    }
    for name, value in zip(("limit", "sasl_limit"), limits.values()):
        if value > buffer_limit:
            raise t.error(
                name, f"must not exceed server.input_buffer_limit ({buffer_limit}), got {value}"
            )
    return limits


def _non_compliant(t: _Table, _buffer_limit: int) -> dict[str, Any]:
    d = ProtectionsConfig()
    return {
        "strict_crlf": t.boolean("strict_crlf", d.strict_crlf),
        "unknown_commands": t.string("unknown_commands", d.unknown_commands, UNKNOWN_COMMAND_MODES),
        "username_extra_chars": _username_chars(t, "username_chars", d.username_extra_chars),
    }


def _username_chars(table: _Table, name: str, default: str) -> str:
    """Separators and path characters never belong in a user name that becomes a path."""
    value: str = table.string(name, default)
    for ch in value:
        if ch in "/\\" or ch.isspace() or unicodedata.category(ch).startswith("C"):
            raise table.error(
                name, f"character {ch!r} is not allowed (no control, whitespace, '/' or '\\')"
            )
    return "".join(dict.fromkeys(value))


_ThresholdParser = Callable[[_Table, int], dict[str, Any]]
_THRESHOLDS: dict[str, tuple[tuple[str, ...], _ThresholdParser]] = {
    "max_bad_commands": (("limit",), _bad_commands),
    "max_line_length": (("limit", "sasl_limit"), _line_length),
    "max_commands": (("limit", "after_login", "per_message"), _commands),
    "non_compliant": (("strict_crlf", "unknown_commands", "username_chars"), _non_compliant),
}


# --------------------------------------------------------------------------- entry points

_SECTION_CLASSES: dict[str, type] = {
    "server": ServerConfig,
    "auth": AuthConfig,
    "backend": BackendConfig,
    "events": EventsConfig,
    "logging": LoggingConfig,
    "state": StateConfig,
    "metrics": MetricsConfig,
    "analysis": AnalysisConfig,
    "tls": TLSConfig,
}


def _field_names(kind: type) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(kind))


def parse_config(data: Mapping[str, Any], source: str, base_dir: Path | str) -> Config:
    """Validate parsed TOML; ``base_dir`` anchors relative paths (the config file's directory)."""
    ctx = _Context(source, Path(os.path.abspath(base_dir)))
    root = _Table(ctx, "", data, (*_SECTION_CLASSES, "protections"))
    server = _parse_server(ctx, root.table("server"))
    backend = _parse_backend(ctx, root.table("backend"))
    if backend.type == "upstream" and server.apop:
        raise ctx.error("server.apop", "APOP cannot be relayed (the upstream's challenge differs); "
                                       "set it to false with backend.type = \"upstream\"")
    protections = _parse_protections(ctx, root.table("protections"), server.input_buffer_limit)
    if backend.oauth:
        protections = _oauth_line_limit(ctx, root.table("protections"), protections, server.input_buffer_limit)
    return Config(
        server=server,
        auth=_parse_auth(ctx, root.table("auth"), upstream=backend.type == "upstream"),
        backend=backend,
        events=_parse_events(ctx, root.table("events")),
        logging=_parse_logging(ctx, root.table("logging")),
        state=_parse_state(ctx, root.table("state")),
        metrics=_parse_metrics(ctx, root.table("metrics"), "metrics" in data),
        analysis=_parse_analysis(ctx, root.table("analysis")),
        protections=protections,
        source=source,
        tls=_parse_tls(ctx, root.table("tls")),
    )


#: base64 of a 3 KB OAuth token plus its key/value framing
OAUTH_MIN_SASL_LIMIT = 4096
OAUTH_SASL_LIMIT = 8192


def _oauth_line_limit(ctx: _Context, data: dict[str, Any], protections: ProtectionsConfig,
                      buffer_limit: int) -> ProtectionsConfig:
    """OAuth tokens are 1-3 KB (base64: up to ~4 KB on one SASL line): unless the operator set
    ``sasl_limit``, it becomes 8192 with ``backend.oauth``; a value set below 4096 is an error."""
    table = data.get("max_line_length", {}) if isinstance(data, dict) else {}
    key = "protections.max_line_length.sasl_limit"
    if isinstance(table, dict) and "sasl_limit" in table:
        if protections.sasl_line_limit < OAUTH_MIN_SASL_LIMIT:
            raise ctx.error(key, f"must be at least {OAUTH_MIN_SASL_LIMIT} with backend.oauth "
                                 f"(OAuth tokens are 1-3 KB), got {protections.sasl_line_limit}")
        return protections
    return dataclasses.replace(protections, sasl_line_limit=min(buffer_limit, max(
        protections.sasl_line_limit, OAUTH_SASL_LIMIT)))


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a config file; every failure is a one-line ConfigError."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(source, "-", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(source, "-", "not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "-", f"TOML syntax error: {exc}") from None
    return parse_config(data, source, Path(os.path.abspath(source)).parent)
