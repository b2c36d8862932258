"""benchmarks/abuse.py --quick --blocks tiny runs end to end (a shard and a device HTTP server,
a quiet phase, then every attack at once from 127.0.0.2) and ends with one JSON line of the
documented shape. Only the shape and that each attack ran are checked: what the attacks cost
is the benchmark's to report, not a test's to assert.

Run: .venv/bin/python -m pytest -q tests/integration/test_abuse_benchmark.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.abuse import ATTACKS, PHASES
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_abuse_benchmark_quick(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.abuse", "--quick", "--blocks", "tiny", "--phase-s", "3",
         "--slowloris", "20", "--dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["benchmark"] == "abuse" and r["settings"]["quick"] is True
    assert r["settings"]["blocks"] == "tiny" and len(r["block_mb"]) == 3
    assert set(r["phases"]) == set(PHASES)
    for phase in r["phases"].values():
        for who in ("prompts", "device_http"):
            tally = phase[who]
            assert {"ok", "failed", "codes", "messages", "p50_ms", "p99_ms"} <= set(tally)
            assert sum(tally["codes"].values()) == tally["failed"]
        assert set(phase["shard"]) == {"rss_mb", "fds", "threads"}
        assert phase["shard"]["rss_mb"] > 0 and phase["shard"]["fds"] > 0
    assert r["phases"]["quiet"]["prompts"]["ok"] > 0        # the load ran before the attack
    assert set(r["ratios"]) == {"fetch_p50", "fetch_p99", "rss", "fds"}
    assert set(r["targets"]) == {"no_failed_prompts", "p50_within_1_5x"}
    # every attack ran, none crashed, and every thread was stopped and joined
    assert set(r["attacks"]) == set(ATTACKS), r["attacks"]
    assert not [k for a in r["attacks"].values() for k in a if k.startswith("crashed")], \
        r["attacks"]
    assert r["attack_threads_left"] == []
    assert "| phase  | prompts ok |" in out.stdout
    assert not list(tmp_path.iterdir())       # the work directory was removed
