"""nmap's ``pop3-capabilities`` script (with ``-sV``) against a real running server.

nselib/pop3.lua ``capabilities()`` sends CAPA and reads the answer up to the first ``.`` it sees:
a period in the status line (``+OK Capability list follows.``) left it an empty list, and nmap
printed no capabilities for pop3shield. Dovecot (bare ``+OK``) is the reference.

``-sV`` matters: on a port that is not 110 the script only runs once service detection has named
the service ``pop3``. Its probes send an empty line and an HTTP request on connections of their
own; pop3shield calls those ``non_compliant`` (a scanner is no POP3 client), which must not keep
the script, on its own connection, from getting its answer.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.interop.conftest import SERVER_KINDS, _start
from tests.support import require_binary

NMAP_TIMEOUT = 120


@pytest.fixture(params=SERVER_KINDS)
def scanned(request, tmp_path):
    box = _start(request.param, tmp_path)
    request.node._interop_mailbox = box  # for the failure report hook
    try:
        yield box
    finally:
        box.server.stop()


def run_nmap(host: str, port: int, *extra: str) -> str:
    nmap = require_binary("nmap")
    argv = [nmap, "-Pn", "-n", "-p", str(port), *extra, "--script", "pop3-capabilities", host]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=NMAP_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{argv}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def capabilities(output: str) -> set[str]:
    """The names in ``| pop3-capabilities: USER SASL(PLAIN LOGIN) TOP ...``."""
    match = re.search(r"^\|_?\s*pop3-capabilities:\s*(.*)$", output, re.M)
    assert match, f"nmap printed no pop3-capabilities line:\n{output}"
    names = re.sub(r"\([^)]*\)", "", match.group(1)).split()
    return set(names)


def test_nmap_pop3_capabilities_with_service_detection(scanned) -> None:
    box = scanned
    output = run_nmap(box.host, box.port, "-sV")
    assert re.search(rf"^{box.port}/tcp\s+open\s+pop3\b", output, re.M), output
    caps = capabilities(output)
    assert {"USER", "UIDL", "TOP", "SASL"} <= caps, output
    assert re.search(r"SASL\(PLAIN LOGIN\)", output), output
    if box.kind == "pop3shield":
        events = [e for e in box.server.events() if e.get("type") == "security"]
        # the CAPA the script sends is POP3: only -sV's probes (empty line, HTTP) are refused
        assert not any(e["command"].startswith("CAPA") for e in events), events
        assert {e["protection"] for e in events} <= {"non_compliant"}, events
