"""The HTML report of an event file a real pop3shield wrote, opened in headless Chromium: the
screenshot is a non-blank PNG, and the charts' elements and totals in the DOM Chromium built
match the event file (counted here independently of the report code)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.support import require_binary
from tests.support.messages import write_maildir
from tests.support.pop3shield_server import REPO_ROOT, Pop3ShieldServer
from tests.support.raw import PASSWORD, Client

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--window-size=1000,1500"]
#: set to a path to keep the screenshot (how docs/events-report.png was made)
SAVE = os.environ.get("POP3SHIELD_SAVE_REPORT_SCREENSHOT")

#: (bytes sent, the reply starts with) -- each on a connection of its own; the server closes it
ATTACKS = [
    (b"USER " + b"a" * 300 + b"\r\n", b"-ERR"),                     # max_line_length
    (b"US3R alice\r\n", b"-ERR"),                                  # non_compliant
    (b"GET / HTTP/1.1\r\n", b"-ERR"),                              # non_compliant
    (b"USER <script>alert(1)</script>\r\n", b"-ERR"),               # non_compliant, markup in the command
    (b"USER\r\n", b"-ERR"),                                        # empty_username
    (b"USER al\x00ice\r\n", b"-ERR"),                              # non_compliant and malicious_code
    (b"USER \x90\x90\x90\x90\x90\x90\x90\x90\x31\xc0\x50\x68//sh\r\n", b"-ERR"),  # malicious_code
]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    return require_binary("chromium")


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    profile.mkdir()
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          timeout=120, env={**os.environ, "HOME": str(profile)})


def _png_pixels(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and the decompressed scanlines of a PNG (no library needed to check it)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


class _Dom(HTMLParser):
    """Elements with the report's ids and data attributes, as Chromium serialised them."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text_of: dict[str, str] = {}
        self._open_id: str | None = None
        self.scripts = 0
        self.rows: dict[str, int] = Counter()
        self._table: str | None = None
        self.cells: list[str] = []
        self._in_td = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attributes))
        if tag == "script":
            self.scripts += 1
        if tag == "table":
            self._table = attributes.get("id")
        if tag == "tr" and self._table:
            self.rows[self._table] += 1
        if tag == "td" and self._table == "latest":
            self._in_td = True
            self.cells.append("")
        if "id" in attributes:
            self._open_id = attributes["id"]
            self.text_of[self._open_id] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None
        if tag == "td":
            self._in_td = False
        self._open_id = None

    def handle_data(self, data: str) -> None:
        if self._open_id is not None:
            self.text_of[self._open_id] += data
        if self._in_td:
            self.cells[-1] += data

    def having(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements
                if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def test_html_report_in_headless_chromium(tmp_path: Path) -> None:
    chromium = _chromium()
    root = tmp_path / "mail"
    write_maildir(root / "alice" / "Maildir")
    server = Pop3ShieldServer(server_toml="auth_failure_delay = 0.0\nauth_failure_delay_max = 0.0",
                              events_toml="rate_limit = 100000")
    server.start(tmp_path / "run", {"alice": PASSWORD}, root)
    try:
        for round_ in range(4):  # a few seconds apart, so the time chart has several bars
            for data, reply in ATTACKS[: 4 + round_]:
                client = Client(server)
                client.send(data)
                assert client.line().startswith(reply)
                client.close()
            client = Client(server)
            client.send(b"USER alice\r\nPASS wrong\r\nQUIT\r\n")
            client.close()
            time.sleep(1.1)
    finally:
        server.stop()
    events = server.events()
    security = [e for e in events if e["type"] == "security"]
    by_protection = Counter(e["protection"] for e in security)
    by_action = Counter(e["action"] for e in security)
    by_source = Counter(e["client"]["address"] for e in security)
    assert {"max_line_length", "non_compliant", "empty_username", "malicious_code"} <= set(by_protection)

    report = tmp_path / "report.html"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "pop3shield", "events", server.events_path.name,
                           "--html", str(report)], capture_output=True, text=True, timeout=60, env=env,
                          cwd=server.events_path.parent)
    assert done.returncode == 0, done.stderr
    assert f"{len(events)} records ({len(security)} security events)" in done.stdout

    shot = tmp_path / "report.png"
    result = _run_chromium(chromium, tmp_path / "profile-1", f"--screenshot={shot}", report.as_uri())
    assert result.returncode == 0 and shot.exists(), result.stderr.decode(errors="replace")[-2000:]
    width, height, pixels = _png_pixels(shot.read_bytes())
    assert (width, height) == (1000, 1500)
    assert len(set(pixels)) > 32, "the screenshot is blank"
    assert shot.stat().st_size < 400_000
    if SAVE:
        shutil.copyfile(shot, SAVE)

    result = _run_chromium(chromium, tmp_path / "profile-2", "--dump-dom", report.as_uri())
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    dom = _Dom()
    dom.feed(result.stdout.decode("utf-8"))

    assert dom.text_of["total-security"].strip() == str(len(security))
    assert dom.text_of["total-records"].strip() == str(len(events))
    assert dom.text_of["total-malformed"].strip() == "0"
    # the time chart: its segments add up, per protection, to the file's counts
    segments = dom.having("rect", **{"class": "segment"})
    seen: Counter[str] = Counter()
    for segment in segments:
        seen[segment["data-protection"]] += int(segment["data-count"])
    assert seen == by_protection
    buckets = dom.having("g", **{"class": "bucket"})
    assert len(buckets) >= 3 and sum(int(b["data-count"]) for b in buckets) == len(security)
    # the action and source charts
    actions = {a["data-key"]: int(a["data-count"]) for a in _children(dom, "chart-actions")
               if a.get("class") == "item"}
    assert actions == dict(by_action)
    sources = {a["data-key"]: int(a["data-count"]) for a in _children(dom, "chart-sources")
               if a.get("class") == "item"}
    assert sources == dict(by_source)
    # the latest events, newest first, with what the attacker typed shown as text, not markup
    assert dom.rows["latest"] == 1 + min(50, len(security))
    assert dom.scripts == 0
    assert "USER <script>alert(1)</script>" in dom.cells
    assert dom.rows["by-protection-action"] == 1 + len({(e["protection"], e["action"]) for e in security})


def _children(dom: _Dom, chart_id: str) -> list[dict[str, str]]:
    """The elements after ``<svg id=chart_id>`` up to the next svg."""
    out, inside = [], False
    for tag, attrs in dom.elements:
        if tag == "svg":
            inside = attrs.get("id") == chart_id
            continue
        if inside:
            out.append(attrs)
    return out
