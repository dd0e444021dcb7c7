"""The test helpers that decide between skipping and failing: ../shared is found next to the
checkout, and its absence is a failure under CI=true."""

from __future__ import annotations

from pathlib import Path

import pytest

import tests.support as support


def test_shared_dir_is_next_to_the_checkout() -> None:
    assert support.REPO_ROOT == Path(__file__).resolve().parents[1]
    assert support.shared_path("README.md") == support.REPO_ROOT.parent / "shared" / "README.md"


def test_a_missing_shared_dir_skips_locally_and_fails_in_ci(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(support, "REPO_ROOT", tmp_path / "checkout")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="not at .*/shared/README.md"):
        support.shared_dir("README.md")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true: missing prerequisites are failures"):
        support.shared_dir("README.md")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "README.md").write_text("notes\n")
    assert support.shared_dir("README.md") == tmp_path / "shared" / "README.md"
