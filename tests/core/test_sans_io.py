"""The core stays sans-I/O: nothing under pop3shield/core imports Twisted, the OS, the clock,
threads, sockets, or any part of pop3shield outside the core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pop3shield.core

CORE = Path(pop3shield.core.__file__).resolve().parent
MODULES = sorted(CORE.rglob("*.py"))


def test_core_modules_found() -> None:
    names = {p.name for p in MODULES}
    assert {"settings.py", "framing.py", "grammar.py", "responses.py", "sasl.py", "protections.py",
            "actions.py", "session.py", "dotstuff.py", "__init__.py", "errors.py", "_screening.py",
            "_sasl_exchange.py", "_transaction.py", "_authorization.py", "_base.py"} <= names


#: top-level modules the core may not import (I/O, the clock, concurrency)
FORBIDDEN = ("twisted", "os", "socket", "time", "threading")


def _forbidden(module: str) -> bool:
    if any(module == name or module.startswith(name + ".") for name in FORBIDDEN):
        return True
    return module.startswith("pop3shield") and not (module == "pop3shield.core"
                                                     or module.startswith("pop3shield.core."))


def forbidden_imports(source: str) -> list[str]:
    """Absolute imports of I/O modules or of pop3shield outside the core (relative ones stay inside)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and module == "pop3shield":
                found += [f"pop3shield.{a.name}" for a in node.names if a.name != "core"]
            elif node.level == 0 and _forbidden(module):
                found.append(module)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _forbidden(arg.value):
                    found.append(arg.value)
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_io_or_outside_import(path: Path) -> None:
    assert forbidden_imports(path.read_text(encoding="utf-8")) == []


def test_the_checker_sees_forbidden_imports() -> None:
    assert forbidden_imports("import os.path") == ["os.path"]
    assert forbidden_imports("import socket, time, threading") == ["socket", "time", "threading"]
    assert forbidden_imports("from pop3shield.mcp import quick_check") == ["pop3shield.mcp"]
    assert forbidden_imports("def f():\n    from pop3shield import mcp\n") == ["pop3shield.mcp"]
    assert forbidden_imports("import pop3shield.maildir") == ["pop3shield.maildir"]
    assert forbidden_imports("import importlib\nimportlib.import_module('pop3shield.mcp')") == ["pop3shield.mcp"]
    assert forbidden_imports("from pop3shield.core import grammar\nfrom pop3shield import core\n"
                             "import timeit, osmium, pop3shield.core.sasl") == []


def twisted_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name == "twisted" or a.name.startswith("twisted.")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and (module == "twisted" or module.startswith("twisted.")):
                found.append(module)
        elif isinstance(node, ast.Call):
            # importlib.import_module("twisted...") / __import__("twisted...")
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("twisted"):
                    found.append(arg.value)
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_twisted_import(path: Path) -> None:
    assert twisted_imports(path.read_text(encoding="utf-8")) == []


def test_the_checker_sees_twisted_imports() -> None:
    assert twisted_imports("import twisted") == ["twisted"]
    assert twisted_imports("import os, twisted.internet.reactor") == ["twisted.internet.reactor"]
    assert twisted_imports("from twisted.internet import defer") == ["twisted.internet"]
    assert twisted_imports("def f():\n    from twisted import logger\n") == ["twisted"]
    assert twisted_imports("import importlib\nimportlib.import_module('twisted.mail')") == ["twisted.mail"]
    assert twisted_imports("from . import twisted_like\nimport twistedx") == []


@pytest.mark.parametrize("module", ["pop3shield.core.session", "pop3shield.core"])
def test_importing_the_core_does_not_load_twisted(module: str) -> None:
    code = (
        "import sys\n"
        f"import {module}\n"
        "from pop3shield.core.session import Session\n"
        "from pop3shield.core.settings import SessionSettings\n"
        "s = Session(SessionSettings(), '127.0.0.1', quick_check=lambda a, f: None)\n"
        "s.start(); s.receive_data(b'CAPA\\r\\nUSER bob\\r\\n')\n"
        "d = Session(SessionSettings(), '127.0.0.1')  # no fast tier handed in\n"
        "d.start(); d.receive_data(b'USER bob\\r\\n')\n"
        "bad = sorted(m for m in sys.modules if m == 'twisted' or m.startswith('twisted.')\n"
        "             or (m.startswith('pop3shield.') and not m.startswith('pop3shield.core')))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    root = CORE.parent.parent
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
