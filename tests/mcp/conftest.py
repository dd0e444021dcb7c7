"""Fixtures for the Malicious Code Protector tests: corpora, built once per session.

The generated corpora are deterministic (seeded).  The real corpus lives outside the
repository; its tests skip when it is absent, except under ``CI=true`` where its absence is a
failure (a CI run that silently skips the real-world check proves nothing).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generators  # noqa: E402
import realcorpus  # noqa: E402

from pop3shield import mcp  # noqa: E402
from tests.support import skip_or_fail  # noqa: E402

#: attack arguments per generated category in the tests (the benchmark uses more)
ATTACKS_PER_CATEGORY = 100
#: share of the full benign corpus the tests use (the benchmark uses all of it)
BENIGN_SCALE = 0.25


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def attacks() -> dict[str, list[bytes]]:
    return generators.attack_corpus(ATTACKS_PER_CATEGORY, seed=11)


@pytest.fixture(scope="session")
def benign() -> dict[str, list[tuple[bytes, str]]]:
    return generators.benign_corpus(BENIGN_SCALE, seed=13)


@pytest.fixture(scope="session")
def real_entries() -> list[realcorpus.Entry]:
    if not realcorpus.present():
        skip_or_fail(f"real corpus not found at {realcorpus.corpus_dir()} (../shared/mcp-corpus next to the checkout)")
    if not realcorpus.HAVE_ICED:  # the scope filter decodes with iced-x86 (a test dependency)
        if in_ci():
            pytest.fail("CI=true but iced-x86, needed for the corpus scope filter, is missing")
        pytest.skip("iced-x86 not installed")
    return realcorpus.load()


@pytest.fixture
def emulation() -> None:
    """Skip a test that needs unicorn where the optional extra is not installed."""
    if not mcp.emulation_available:
        pytest.skip("unicorn (pop3shield[emulation]) not installed")


@pytest.fixture(autouse=True)
def fresh_cache() -> None:
    """Each test starts with an empty verdict cache, so no test sees another's results."""
    mcp.cache.clear()
