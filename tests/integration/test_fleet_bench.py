"""benchmarks/fleet.py end to end with a handful of devices: every run and link class reported,
the edge cache never costs the bank more than direct fetches, a publish that changed 1/8 of the
blocks costs devices that kept their caches less than devices starting empty.

Run: .venv/bin/python -m pytest -q tests/integration/test_fleet_bench.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_fleet_benchmark_smoke(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.fleet", "--devices", "6",
                          "--prompts", "2", "--concurrency", "3", "--typing-s", "0.2",
                          "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    runs = r["runs"]
    assert list(runs) == ["direct", "prefetch", "edge", "publish", "publish-by-version"]
    for run in runs.values():
        assert run["prompts"] == 12 and len(run["classes"]) == 3
        for c in run["classes"].values():
            assert c["prompts"] == 4 and 0 <= c["full_path_in_budget"] <= 1
            assert c["ttft_p50_ms"] <= c["ttft_p99_ms"]
    assert r["changed_blocks"] == [73, 584]          # subtree 0: 1 + 8 + 64 of 8 + 64 + 512
    assert runs["edge"]["bank_egress_bytes"] <= runs["direct"]["bank_egress_bytes"]
    assert runs["publish"]["bank_egress_bytes"] < runs["publish-by-version"]["bank_egress_bytes"]
    assert r["model_compute"]["prefill_with_path_ms"] > 0
    assert (tmp_path / "fleet.png").stat().st_size > 0
