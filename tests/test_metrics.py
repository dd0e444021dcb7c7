"""Prometheus metrics: scraped over HTTP from a real running pop3shield after real sessions."""

from __future__ import annotations

import json
import poplib
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pop3shield.config import ConfigError, parse_config
from pop3shield.metrics import COMMAND_KEYWORDS, CommandScanner, Metrics
from pop3shield.mcp.verdict import Verdict
from tests.support.messages import write_maildir
from tests.support.pop3shield_server import Pop3ShieldServer
from tests.support.raw import PASSWORD, Client

SERVER = "auth_failure_delay = 0.0\nauth_failure_delay_max = 0.0"
METRICS_LINE = re.compile(r"metrics on http://(?P<host>[0-9.]+):(?P<port>\d+)/metrics \((?P<description>[^)]*)\)")


# --------------------------------------------------------------------------- helpers


def _metrics_address(server: Pop3ShieldServer, timeout: float = 10.0) -> tuple[str, int, str]:
    """The metrics endpoint the server says it listens on (its log line)."""
    assert server.log_path is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = server.log_path.read_text(errors="replace") if server.log_path.exists() else ""
        m = METRICS_LINE.search(text)
        if m:
            return m.group("host"), int(m.group("port")), m.group("description")
        time.sleep(0.05)
    raise AssertionError("no metrics line in the server log\n" + server.diagnostics())


def scrape(host: str, port: int) -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode("utf-8")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, parsed with prometheus_client's own parser."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed.get((name, tuple(sorted(labels.items()))), 0.0)


def _wait_closed(host: str, port: int) -> dict:
    """Scrape until no connection is open (the server's side of the close may lag the client's)."""
    deadline = time.monotonic() + 10
    while True:
        parsed = samples(scrape(host, port))
        if value(parsed, "pop3shield_connections_open") == 0 or time.monotonic() > deadline:
            return parsed
        time.sleep(0.05)


def _raw_session(host: str, port: int, lines: list[bytes]) -> tuple[bytes, bytes]:
    """Send each line after the previous answer; everything received until the server closes."""
    sent = b""
    received = b""
    with socket.create_connection((host, port), timeout=10) as sock:
        def read_line() -> None:
            nonlocal received
            while not received.endswith(b"\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    return
                received += chunk

        read_line()
        for line in lines:
            sock.sendall(line)
            sent += line
            start = len(received)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return sent, received
                received += chunk
                if received[start:].endswith(b"\r\n"):
                    break
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(65536):
            received += chunk
    return sent, received


# --------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def shield(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pop3ShieldServer]:
    tmp = tmp_path_factory.mktemp("metrics")
    root = tmp / "mail"
    write_maildir(root / "alice" / "Maildir")
    server = Pop3ShieldServer(server_toml=SERVER,
                              extra_toml='[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n')
    server.start(tmp / "run", {"alice": PASSWORD}, root)
    try:
        yield server
    finally:
        server.stop()


def test_counters_after_real_sessions(shield: Pop3ShieldServer) -> None:
    host, port, description = _metrics_address(shield)
    assert host == "127.0.0.1" and description == "tcp:0:interface=127.0.0.1"
    before = _wait_closed(host, port)

    # a poplib session: login, STAT, RETR 1, QUIT
    conn = poplib.POP3(shield.host, shield.port, timeout=10)
    conn.user("alice")
    conn.pass_(PASSWORD)
    count, _ = conn.stat()
    assert count == 9
    conn.retr(1)
    conn.quit()
    # a poplib session with a wrong password
    conn = poplib.POP3(shield.host, shield.port, timeout=10)
    conn.user("alice")
    with pytest.raises(poplib.error_proto) as refused:
        conn.pass_("wrong")
    assert refused.value.args[0].startswith(b"-ERR [AUTH]")
    conn.quit()
    # a protection firing: USER with no name (prevent: the connection is closed)
    client = Client(shield)
    client.send(b"USER\r\n")
    assert client.line().startswith(b"-ERR")
    assert client.closed()

    after = _wait_closed(host, port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("pop3shield_connections_total", result="accepted") == 3
    assert delta("pop3shield_connections_total", result="refused") == 0
    assert value(after, "pop3shield_connections_open") == 0
    assert delta("pop3shield_logins_total", mechanism="USER", result="ok") == 1
    assert delta("pop3shield_logins_total", mechanism="USER", result="auth") == 1
    assert delta("pop3shield_commands_total", command="USER") == 3
    assert delta("pop3shield_commands_total", command="PASS") == 2
    assert delta("pop3shield_commands_total", command="STAT") == 1
    assert delta("pop3shield_commands_total", command="RETR") == 1
    assert delta("pop3shield_commands_total", command="QUIT") == 2
    assert delta("pop3shield_commands_total", command="other") == 0
    # the protection, counted the way the event file records it
    prevented = [e for e in shield.events() if e.get("protection") == "empty_username"]
    assert [e["action"] for e in prevented] == ["prevent"]
    assert delta("pop3shield_security_events_total", protection="empty_username", action="prevent") == 1
    # the detector's tier 0 looked at the arguments (user names, message numbers)
    assert delta("pop3shield_detector_verdicts_total", tier="0", verdict="clean") > 0
    assert value(after, "pop3shield_analysis_queue_depth") == 0
    # the scrape itself renders in the reactor's thread pool: that pool is read live
    assert value(after, "pop3shield_threadpool_working", pool="reactor") >= 1
    assert value(after, "pop3shield_threadpool_queue_depth", pool="reactor") == 0
    assert ("pop3shield_threadpool_queue_depth", (("pool", "analysis"),)) in after
    # the hash pool's own queues, both sides (idle again after the logins)
    assert value(after, "pop3shield_threadpool_queue_depth", pool="hash") == 0
    assert value(after, "pop3shield_threadpool_working", pool="hash_untrusted") == 0
    assert value(after, "pop3shield_log_dropped_lines_total", log="events") == 0
    assert ("pop3shield_log_dropped_lines_total", (("log", "events"),)) in after
    assert ("pop3shield_log_dropped_lines_total", (("log", "server"),)) in after


def test_bytes_sent_and_received_are_exact(shield: Pop3ShieldServer) -> None:
    host, port, _ = _metrics_address(shield)
    before = _wait_closed(host, port)
    sent, received = _raw_session(shield.host, shield.port,
                                  [b"CAPA\r\n", b"USER alice\r\n", f"PASS {PASSWORD}\r\n".encode(), b"LIST\r\n",
                                   b"RETR 2\r\n", b"QUIT\r\n"])
    assert received.startswith(b"+OK") and received.endswith(b"\r\n")
    after = _wait_closed(host, port)
    assert (value(after, "pop3shield_received_bytes_total")
            - value(before, "pop3shield_received_bytes_total")) == len(sent)
    assert value(after, "pop3shield_sent_bytes_total") - value(before, "pop3shield_sent_bytes_total") == len(received)
    assert (value(after, "pop3shield_commands_total", command="CAPA")
            - value(before, "pop3shield_commands_total", command="CAPA")) == 1


def test_a_client_chosen_keyword_never_becomes_a_label(shield: Pop3ShieldServer) -> None:
    host, port, _ = _metrics_address(shield)
    before = _wait_closed(host, port)
    evil = [b"XEVILKEYWORD\r\n", b'X"} 1e9\r\n', b"\x1b[2J\r\n", b"retr{a=\"b\"}\r\n", b"\r\n"]
    with socket.create_connection((shield.host, shield.port), timeout=10) as sock:
        sock.recv(1024)
        for line in evil:
            sock.sendall(line)
            data = sock.recv(1024)
            if not data:
                break
    text = scrape(host, port)
    after = _wait_closed(host, port)
    labels = {dict(key[1]).get("command") for key in after if key[0] == "pop3shield_commands_total"}
    assert labels <= COMMAND_KEYWORDS | {"other"}
    assert "XEVIL" not in text and "\x1b" not in text and "1e9" not in text
    assert value(after, "pop3shield_commands_total", command="other") > value(
        before, "pop3shield_commands_total", command="other")


def test_detector_verdicts_of_real_exploits(shield: Pop3ShieldServer) -> None:
    """Cyrus' USER overflow is decided by tier 0; alphanumeric shellcode in PASS needs tier 1."""
    import random
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent / "mcp"))
    import generators as gen  # tests/mcp/generators.py, the detector's corpus builder

    rng = random.Random(2449)
    host, port, _ = _metrics_address(shield)
    before = _wait_closed(host, port)
    client = Client(shield)
    client.send(b"USER " + gen.gen_cyrus(rng) + b"\r\n")
    assert client.line().startswith(b"-ERR")
    client.close()
    middle = _wait_closed(host, port)
    client = Client(shield)
    client.send(b"USER alice\r\n")
    assert client.line().startswith(b"+OK")
    client.send(b"PASS " + gen.gen_alnum(rng)[:240] + b"\r\n")
    assert client.line().startswith(b"-ERR")
    client.close()
    after = _wait_closed(host, port)

    def delta(old: dict, new: dict, name: str, **labels: str) -> float:
        return value(new, name, **labels) - value(old, name, **labels)

    verdicts = "pop3shield_detector_verdicts_total"
    assert delta(before, middle, verdicts, tier="0", verdict="malicious") >= 1
    assert delta(before, middle, verdicts, tier="0", verdict="undecided") == 0
    assert delta(before, middle, "pop3shield_analysis_queue_seconds_count") == 0  # no tier 1 work
    undecided = delta(middle, after, verdicts, tier="0", verdict="undecided")
    deep = {v: delta(middle, after, verdicts, tier="1", verdict=v) for v in ("clean", "malicious", "refused")}
    assert undecided >= 1
    assert sum(deep.values()) == undecided  # every undecided argument got exactly one tier 1 verdict
    assert deep["refused"] == 0
    # tier 1 finds this code (on a loaded machine its time budget may run out first: the known
    # load sensitivity of the alphanumeric case); either way the counters agree with the events
    assert delta(before, after, "pop3shield_security_events_total", protection="malicious_code",
                 action="prevent") == 1 + min(1, deep["malicious"])
    assert delta(middle, after, "pop3shield_analysis_queue_seconds_count") == 1  # one Analyze, timed
    assert value(after, "pop3shield_analysis_queue_depth") == 0


def test_only_metrics_is_served(shield: Pop3ShieldServer) -> None:
    host, port, _ = _metrics_address(shield)
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://{host}:{port}/", timeout=10)
    assert missing.value.code == 404


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_the_endpoint_binds_loopback_by_default(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    write_maildir(root / "alice" / "Maildir")
    server = Pop3ShieldServer(server_toml=SERVER, extra_toml="[metrics]\n")
    server.start(tmp_path / "run", {"alice": PASSWORD}, root)
    try:
        host, port, description = _metrics_address(server)
        assert (host, port, description) == ("127.0.0.1", 9110, "tcp:9110:interface=127.0.0.1")
        assert "pop3shield_connections_open" in scrape(host, port)
        other = _non_loopback_address()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, 9110), timeout=3).close()
    finally:
        server.stop()


def test_no_metrics_section_no_endpoint(shield: Pop3ShieldServer, tmp_path: Path) -> None:
    root = tmp_path / "mail"
    write_maildir(root / "alice" / "Maildir")
    server = Pop3ShieldServer(server_toml=SERVER)
    server.start(tmp_path / "run", {"alice": PASSWORD}, root)
    try:
        Client(server).close()
        time.sleep(0.3)
        assert server.log_path is not None
        assert "metrics on" not in server.log_path.read_text()
    finally:
        server.stop()


# --------------------------------------------------------------------------- config


def _parse(text: dict) -> object:
    base = {"auth": {"realm": "pop3shield.demo:Realm"}}
    return parse_config({**base, **text}, "p.toml", "/")


def test_config_the_section_enables_it() -> None:
    assert _parse({}).metrics.enabled is False  # type: ignore[attr-defined]
    on = _parse({"metrics": {}}).metrics  # type: ignore[attr-defined]
    assert (on.enabled, on.listen) == (True, "tcp:9110:interface=127.0.0.1")
    off = _parse({"metrics": {"enabled": False, "listen": "unix:/run/m.sock"}}).metrics  # type: ignore[attr-defined]
    assert (off.enabled, off.listen) == (False, "unix:/run/m.sock")


@pytest.mark.parametrize("table, message", [
    ({"listen": "http:9110"}, "p.toml: metrics.listen: unknown endpoint type 'http' (expected one of "
                              "ssl, systemd, tcp, tcp6, unix)"),
    ({"listen": ""}, "p.toml: metrics.listen: must not be empty"),
    ({"listen": 9110}, "p.toml: metrics.listen: expected a string, got integer"),
    ({"enabled": "yes"}, "p.toml: metrics.enabled: expected a boolean, got string"),
])
def test_config_errors_are_one_line(table: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        _parse({"metrics": table})
    assert str(error.value) == message


def test_config_unknown_key() -> None:
    with pytest.raises(ConfigError) as error:
        _parse({"metrics": {"port": 9110}})
    assert str(error.value).startswith("p.toml: metrics.port: unknown key")


# --------------------------------------------------------------------------- units


def test_registries_are_separate() -> None:
    one, two = Metrics(), Metrics()
    one.command(b"NOOP")
    assert value(samples(generate_latest(one.registry).decode()), "pop3shield_commands_total", command="NOOP") == 1
    assert value(samples(generate_latest(two.registry).decode()), "pop3shield_commands_total", command="NOOP") == 0


def test_labels_come_from_fixed_sets_only() -> None:
    m = Metrics()
    for word in (b"stat", b"Retr", b"\xff\xfe", b"LIST\x00", b"AUTHX", b"", b"QUIT"):
        m.command(word)
    m.login("XOAUTH2", "ok")
    m.login("GSSAPI\n", "auth")
    m.login("USER", "weird")
    m.upstream.upstream_error("timeout")
    m.upstream.upstream_error('x"}\n')
    parsed = samples(generate_latest(m.registry).decode())
    assert value(parsed, "pop3shield_commands_total", command="STAT") == 1
    assert value(parsed, "pop3shield_commands_total", command="RETR") == 1
    assert value(parsed, "pop3shield_commands_total", command="QUIT") == 1
    assert value(parsed, "pop3shield_commands_total", command="other") == 4
    assert value(parsed, "pop3shield_logins_total", mechanism="XOAUTH2", result="ok") == 1
    assert value(parsed, "pop3shield_logins_total", mechanism="other", result="auth") == 1
    assert value(parsed, "pop3shield_logins_total", mechanism="USER", result="unavailable") == 1
    assert value(parsed, "pop3shield_upstream_errors_total", reason="timeout") == 1
    assert value(parsed, "pop3shield_upstream_errors_total", reason="other") == 1


def test_detector_verdicts_and_queue_time() -> None:
    m = Metrics()
    answers = iter([None, Verdict(False), Verdict(True, ("getpc",)), Verdict(False)])
    check = m.counting_quick_check(lambda argument, field: next(answers))
    assert check is not None
    assert [check(b"x", "text") for _ in range(4)][2] == Verdict(True, ("getpc",))
    m.deep_verdicts([Verdict(False), None, Verdict(True, ("sled",)), None, None])
    m.analysis_waited(0.003)
    m.upstream.observe_upstream(0.2)
    parsed = samples(generate_latest(m.registry).decode())
    assert value(parsed, "pop3shield_detector_verdicts_total", tier="0", verdict="undecided") == 1
    assert value(parsed, "pop3shield_detector_verdicts_total", tier="0", verdict="clean") == 2
    assert value(parsed, "pop3shield_detector_verdicts_total", tier="0", verdict="malicious") == 1
    assert value(parsed, "pop3shield_detector_verdicts_total", tier="1", verdict="clean") == 1
    assert value(parsed, "pop3shield_detector_verdicts_total", tier="1", verdict="malicious") == 1
    assert value(parsed, "pop3shield_detector_verdicts_total", tier="1", verdict="refused") == 3
    assert value(parsed, "pop3shield_analysis_queue_seconds_count") == 1
    assert value(parsed, "pop3shield_analysis_queue_seconds_bucket", le="0.0025") == 0
    assert value(parsed, "pop3shield_analysis_queue_seconds_bucket", le="0.005") == 1
    assert value(parsed, "pop3shield_upstream_seconds_sum") == pytest.approx(0.2)
    assert m.counting_quick_check(None) is None


def test_command_scanner_splits_lines_and_keeps_little() -> None:
    seen: list[bytes] = []
    scanner = CommandScanner()
    for chunk in (b"US", b"ER alice\r\nPA", b"SS x\r\nSTAT\r\n\r\nLIST 1\n"):
        scanner.feed(chunk, False, seen.append)
    assert seen == [b"USER", b"PASS", b"STAT", b"", b"LIST"]
    scanner.feed(b"A" * 1_000_000, False, seen.append)  # a line with no end yet
    assert len(scanner._head) <= 5
    scanner.feed(b"\r\n", False, seen.append)
    assert seen[-1] == b"AAAAA"
    sasl: list[bytes] = []
    scanner.feed(b"dGVzdA==\r\n", True, sasl.append)  # an AUTH exchange line is not a command
    scanner.feed(b"*\r\n", True, sasl.append)
    assert sasl == []


def test_example_documents_the_metrics_keys() -> None:
    import dataclasses

    from pop3shield.config import MetricsConfig, load_config
    from tests.test_config import EXAMPLE, _documented_keys

    documented = _documented_keys(EXAMPLE.read_text(encoding="utf-8"))
    assert {f"metrics.{f.name}" for f in dataclasses.fields(MetricsConfig)} <= documented
    try:
        shipped = load_config(EXAMPLE).metrics
    except ConfigError as error:  # no /etc/pop3shield/users.passwd here: the sections before parse
        assert error.key == "auth.passwd_file"
        import tomllib

        data = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
        shipped = _parse({"metrics": data["metrics"]}).metrics  # type: ignore[attr-defined]
    assert (shipped.enabled, shipped.listen) == (False, "tcp:9110:interface=127.0.0.1")


def test_preflight_warns_when_metrics_listen_everywhere(tmp_path: Path) -> None:
    from pop3shield.service import preflight

    (tmp_path / "mail").mkdir()
    passwd = tmp_path / "users"
    passwd.write_text("alice:{BLF-CRYPT}$2b$04$" + "a" * 53 + "\n")
    passwd.chmod(0o600)

    def warnings(metrics: dict) -> list[str]:
        config = parse_config({"auth": {"passwd_file": str(passwd)},
                               "backend": {"maildir": str(tmp_path / "mail/{user}/Maildir")},
                               "metrics": metrics}, "p.toml", tmp_path)
        return [w for w in preflight(config).warnings if "metrics" in w]

    assert warnings({"listen": "tcp:9110"}) == [
        "p.toml: metrics.listen: 'tcp:9110' serves the metrics on every interface "
        "(give interface= the address the scraper comes from)"]
    assert warnings({"listen": "tcp6:9110:interface=\\:\\:"}) != []
    assert warnings({}) == []
    assert warnings({"listen": "tcp:9110", "enabled": False}) == []


def test_refused_connections_are_counted(tmp_path: Path) -> None:
    root = tmp_path / "mail"
    write_maildir(root / "alice" / "Maildir")
    server = Pop3ShieldServer(server_toml=SERVER + "\nmax_connections = 1\nmax_connections_per_ip = 1",
                              extra_toml='[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n')
    server.start(tmp_path / "run", {"alice": PASSWORD}, root)
    try:
        host, port, _ = _metrics_address(server)
        before = _wait_closed(host, port)
        first = Client(server)  # holds the one connection allowed, logged in (a waiting one would be evicted)
        assert first.greeting.startswith(b"+OK")
        first.send(b"USER alice\r\n")
        assert first.line().startswith(b"+OK")
        first.send(f"PASS {PASSWORD}\r\n".encode())
        assert first.line().startswith(b"+OK")
        refused = socket.create_connection((server.host, server.port), timeout=10)
        reply = refused.recv(1024)
        refused.close()
        assert reply.startswith(b"-ERR [SYS/TEMP]")
        during = samples(scrape(host, port))
        assert value(during, "pop3shield_connections_open") == 1
        first.send(b"QUIT\r\n")
        assert first.line().startswith(b"+OK")
        first.close()
        after = _wait_closed(host, port)
        for result, expected in (("accepted", 1), ("refused", 1)):
            assert (value(after, "pop3shield_connections_total", result=result)
                    - value(before, "pop3shield_connections_total", result=result)) == expected
        assert value(after, "pop3shield_connections_open") == 0
    finally:
        server.stop()


def test_a_stalled_event_file_does_not_stall_the_server(tmp_path: Path) -> None:
    """The event file is a FIFO nobody reads: once the pipe is full, sessions still get answers."""
    import os

    root = tmp_path / "mail"
    write_maildir(root / "alice" / "Maildir")
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / "events.jsonl", 0o600)
    reader = os.open(run / "events.jsonl", os.O_RDONLY | os.O_NONBLOCK)  # held open, never read (yet)
    server = Pop3ShieldServer(server_toml=SERVER, events_toml="rate_limit = 100000\nglobal_rate_limit = 100000",
                              extra_toml='[metrics]\nlisten = "tcp:0:interface=127.0.0.1"\n')
    try:
        server.start(run, {"alice": PASSWORD}, root)
        host, port, _ = _metrics_address(server)
        attacks = 300  # ~400 bytes of JSON each: more than a pipe holds
        started = time.monotonic()
        for _ in range(attacks):
            client = Client(server)
            client.send(b"USER\r\n")
            assert client.line().startswith(b"-ERR")
            client.close()
        assert os.read(reader, 1)  # the pipe did fill...
        conn = poplib.POP3(server.host, server.port, timeout=10)  # ... and the server still answers
        conn.user("alice")
        conn.pass_(PASSWORD)
        assert conn.stat()[0] == 9
        conn.quit()
        assert time.monotonic() - started < 60
        parsed = _wait_closed(host, port)
        assert value(parsed, "pop3shield_security_events_total", protection="empty_username",
                     action="prevent") == attacks
        assert value(parsed, "pop3shield_log_dropped_lines_total", log="events") == 0  # all queued
        data = b""
        deadline = time.monotonic() + 10
        while data.count(b"\n") < attacks - 1 and time.monotonic() < deadline:
            try:
                data += os.read(reader, 65536)
            except BlockingIOError:
                time.sleep(0.02)
        records = [json.loads(line) for line in data.split(b"\n")[1:] if line.strip()]
        assert len(records) == attacks - 1  # the byte read above was the first record's first byte
        assert {r["protection"] for r in records} == {"empty_username"}
    finally:
        server.stop()
        os.close(reader)


def test_command_scanner_does_not_care_how_the_bytes_are_cut() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")), max_size=8), st.data())
    def check(lines: list[bytes], data: st.DataObject) -> None:
        stream = b"".join(line + b"\r\n" for line in lines)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
        seen: list[bytes] = []
        scanner = CommandScanner()
        for start, end in zip([0, *cuts], [*cuts, len(stream)]):
            scanner.feed(stream[start:end], False, seen.append)
        assert seen == [line[:5].partition(b" ")[0].rstrip(b"\r") for line in lines]

    check()


def test_log_writer_drops_and_errors_are_read_at_scrape_time() -> None:
    from pop3shield.logsetup import QueuedWriter

    class Full:
        def write(self, text: str) -> None:
            raise OSError(28, "No space left on device")

        def flush(self) -> None:
            pass

    writer = QueuedWriter(Full(), limit=10)  # type: ignore[arg-type]
    for i in range(4):
        writer.write(f"{i}\n")
    assert writer.close(5)
    m = Metrics()
    m.watch(writers=[("events", lambda: writer), ("server", lambda: None)])
    parsed = samples(generate_latest(m.registry).decode())
    assert value(parsed, "pop3shield_log_write_errors_total", log="events") == 4
    assert value(parsed, "pop3shield_log_dropped_lines_total", log="events") == 0
    assert not any(dict(key[1]).get("log") == "server" for key in parsed)  # no writer: no series


class LineByLineScanner:
    """The scanner as it was, one line at a time: the reference for the one-split scanner."""

    def __init__(self) -> None:
        self._head, self._started, self._sasl = b"", False, False

    def feed(self, data: bytes, in_sasl: bool, count) -> None:
        start, size = 0, len(data)
        while start < size:
            end = data.find(b"\n", start)
            stop = size if end < 0 else end
            if not self._started:
                self._started, self._sasl = True, in_sasl
            room = 5 - len(self._head)
            if room > 0:
                self._head += data[start:min(stop, start + room)]
            if end < 0:
                return
            if not self._sasl:
                count(self._head.partition(b" ")[0].rstrip(b"\r"))
            self._head, self._started = b"", False
            start = end + 1


def test_command_scanner_counts_as_the_line_by_line_scanner_did() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(st.binary(max_size=9), st.booleans()), max_size=10))
    def check(reads: list[tuple[bytes, bool]]) -> None:
        new, old = CommandScanner(), LineByLineScanner()
        seen_new: list[bytes] = []
        seen_old: list[bytes] = []
        for data, in_sasl in reads:  # the session may enter or leave SASL between any two reads
            new.feed(data, in_sasl, seen_new.append)
            old.feed(data, in_sasl, seen_old.append)
            assert seen_new == seen_old
            # what is kept of a line begun and not ended (its SASL-ness matters only then)
            assert (new._head, new._started) == (old._head, old._started)
            assert not new._started or new._sasl == old._sasl

    check()
    scanner, seen = CommandScanner(), []
    scanner.feed(b"STAT\r\nLIST 1\r\n\nNOOP\r\nUIDL 1\r\nQU", False, seen.append)
    scanner.feed(b"IT\r\n", True, seen.append)  # begun before the SASL exchange: a command
    assert seen == [b"STAT", b"LIST", b"", b"NOOP", b"UIDL", b"QUIT"]


def test_a_read_of_commands_counts_as_each_command_would() -> None:
    keywords = [b"STAT", b"LIST", b"UIDL", b"NOOP", b"stat", b"\xff", b"LIST", b""] * 7
    one, batched = Metrics(), Metrics()
    for keyword in keywords:
        one.command(keyword)
    batched.commands_seen(keywords[:1])
    batched.commands_seen(keywords[1:])
    assert generate_latest(one.registry) == generate_latest(batched.registry)


def test_verdicts_expose_what_a_prometheus_counter_exposes() -> None:
    from prometheus_client import CollectorRegistry, Counter

    m = Metrics()
    reference = CollectorRegistry()
    counter = Counter("pop3shield_detector_verdicts", m.verdicts.documentation, ["tier", "verdict"],
                      registry=reference)
    assert generate_latest(m.registry).decode().count("pop3shield_detector_verdicts") == 2  # help and type
    answers = [None, Verdict(False), Verdict(True, ("getpc",)), Verdict(False), None]
    check = m.counting_quick_check(lambda argument, field: answers.pop(0))
    assert check is not None
    for _ in range(5):
        verdict = check(b"x", "text")
        name = "undecided" if verdict is None else "malicious" if verdict.malicious else "clean"
        counter.labels("0", name).inc()
    m.deep_verdicts([None, Verdict(False)])
    counter.labels("1", "refused").inc()
    counter.labels("1", "clean").inc()

    def family(registry) -> str:
        text = generate_latest(registry).decode()
        return "\n".join(line for line in text.splitlines() if "pop3shield_detector_verdicts" in line)

    assert family(m.registry) == family(reference)
    names = [line.split()[2] for line in generate_latest(m.registry).decode().splitlines()
             if line.startswith("# TYPE")]
    assert names.index("pop3shield_detector_verdicts_total") == names.index("pop3shield_commands_total") + 3


def test_upstream_latency_exposes_what_a_prometheus_histogram_exposes() -> None:
    """The relay's round trips are observed as plain numbers; the scrape shows the same family a
    prometheus_client Histogram with those buckets shows, bounds included (le is inclusive)."""
    from prometheus_client import CollectorRegistry, Histogram

    from pop3shield.metrics import _LATENCY_BUCKETS

    m = Metrics()
    reference = CollectorRegistry()
    histogram = Histogram("pop3shield_upstream_seconds", m.upstream_latency.documentation,
                          buckets=_LATENCY_BUCKETS, registry=reference)
    for seconds in (0.0, 0.001, 0.005, 0.0051, 0.2, 1.0, 29.9, 30.0, 31.0, 1e6, 0.05):
        m.upstream.observe_upstream(seconds)
        histogram.observe(seconds)

    def family(registry) -> str:
        text = generate_latest(registry).decode()
        return "\n".join(line for line in text.splitlines() if "pop3shield_upstream_seconds" in line)

    assert family(m.registry) == family(reference)
    assert 'pop3shield_upstream_seconds_bucket{le="+Inf"} 11.0' in family(m.registry)


_SCANNER_PIECES = [b"STAT", b"QUIT", b"LIST 1", b"RETR 12", b"AUTHX", b"\r", b"\n", b"\r\n", b" ", b"x", b"\xff"]


@pytest.mark.parametrize("seed", range(5))
def test_a_read_of_one_whole_line_is_scanned_as_in_pieces(seed: int) -> None:
    """The scanner takes a read that is exactly one line without splitting it; the keywords it
    finds are those found when the same bytes arrive one octet at a time."""
    import random

    rng = random.Random(seed)
    for _ in range(2000):
        line = b"".join(rng.choice(_SCANNER_PIECES) for _ in range(rng.randint(0, 4))).replace(b"\n", b"")
        data = line + rng.choice([b"\r\n", b"\n"])
        in_sasl = rng.random() < 0.2
        whole = CommandScanner().keywords(data, in_sasl)
        bytewise, scanner = [], CommandScanner()
        for i in range(len(data)):
            bytewise += scanner.keywords(data[i:i + 1], in_sasl)
        assert whole == bytewise, (data, in_sasl)
