"""bench/attack.py works: one scenario at a tiny scale against a real server, in seconds."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "attack.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("attack_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes; anything else must not be ours any more
    status = Path(f"/proc/{pid}/status").read_text() if Path(f"/proc/{pid}/status").exists() else ""
    return "State:\tZ" not in status


def test_brute_force_scenario_runs_measures_and_cleans_up(tmp_path):
    out = tmp_path / "attack.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--scenario", "brute-many", "--duration", "3",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {r["scenario"]: r for r in json.loads(out.read_text())["results"]}
    assert list(results) == ["baseline", "brute-many"]
    base, brute = results["baseline"], results["brute-many"]
    # the honest stream ran and, with no attack, every session succeeded
    assert base["sessions"] >= 4 and base["ok"] == base["sessions"], base
    assert base["p50"] > 0 and base["p99"] >= base["p50"]
    assert base["peak_rss_mib"] > 10
    # the attack reached the server: connections from many addresses, wrong passwords refused
    assert brute["attack"]["peak_open"] >= 20, brute["attack"]
    assert brute["attack"].get("PASS refused", 0) >= 1, brute["attack"]
    # no wrong password was ever accepted, and the verdict says so
    assert brute["wrong_accepted"] == 0 and brute["targets"]["no wrong password"] is True
    assert set(brute["targets"]) == {"success 100%", "p99 <= 2x", "memory bounded", "no wrong password"}
    assert "| brute-many |" in proc.stdout and "PASS:no wrong password" in proc.stdout
    assert "allow_plaintext = true" in proc.stdout  # the config used is printed
    # every process the bench started is gone: the servers and the attack process
    pids = [pid for r in results.values() for pid in r["pids"]]
    assert len(pids) == 3
    assert not [pid for pid in pids if _alive(pid)]


def test_each_target_can_fail():
    bench = _bench_module()
    base = bench.Result("baseline", sessions=10, ok=10, p50=0.1, p99=0.2, peak_rss_mib=100.0)
    bad = bench.Result("x", sessions=10, ok=9, p50=0.3, p99=0.41, peak_rss_mib=229.0, wrong_accepted=1)
    bench.judge(bad, base, rss_margin=128.0)
    assert bad.targets == {"success 100%": False, "p99 <= 2x": False, "memory bounded": False,
                           "no wrong password": False}
    good = bench.Result("y", sessions=10, ok=10, p50=0.1, p99=0.4, peak_rss_mib=228.0)
    bench.judge(good, base, rss_margin=128.0)
    assert all(good.targets.values())
    nobody = bench.Result("z")  # no honest session got through at all
    bench.judge(nobody, base, rss_margin=128.0)
    assert not nobody.targets["success 100%"] and not nobody.targets["p99 <= 2x"]


def test_percentile_is_nearest_rank():
    bench = _bench_module()
    values = [float(n) for n in range(1, 101)]
    assert bench.percentile(values, 50) == 50.0
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile([3.0], 99) == 3.0
    assert bench.percentile([], 50) is None
