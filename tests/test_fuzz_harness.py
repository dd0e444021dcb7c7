"""The atheris harness itself works: its seeds and random inputs run clean without atheris."""

from __future__ import annotations

import random
import runpy
from pathlib import Path

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
harness = runpy.run_path(str(FUZZ / "fuzz_session.py"), run_name="fuzz_harness")


def test_seed_corpus_runs_clean() -> None:
    seeds = sorted((FUZZ / "corpus").iterdir())
    assert seeds
    for seed in seeds:
        harness["run"](seed.read_bytes())


def test_random_inputs_run_clean() -> None:
    rng = random.Random(1939)
    vocabulary = [b"USER alice\r\n", b"PASS good\r\n", b"RETR 1\r\n", b"AUTH PLAIN\r\n", b"\x00", b"\r", b"\n",
                  b"A" * 300, b"\x90" * 50, b"DELE 1\r\n", b"QUIT\r\n", b"STLS\r\n", b"TOP 1 99999999\r\n"]
    for _ in range(500):
        parts = [rng.choice(vocabulary) if rng.random() < 0.7 else rng.randbytes(rng.randint(0, 40))
                 for _ in range(rng.randint(1, 30))]
        harness["run"](bytes([rng.randrange(256)]) + b"".join(parts))


def test_harness_catches_a_broken_response() -> None:
    try:
        harness["check_send"](b"+OK no line end")
    except AssertionError:
        return
    raise AssertionError("check_send accepted a response without CRLF")
