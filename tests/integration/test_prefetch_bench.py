"""benchmarks/prefetch.py end to end on loopback with a tiny trained model: path agreement per
cut and level (a share in [0, 1], level 1 at least as often right as the leaf), and cold vs
prefetched time to first token from a real bank server.

Run: .venv/bin/python -m pytest -q tests/integration/test_prefetch_bench.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_prefetch_benchmark_smoke(tiny_model_export, tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.prefetch", "--export",
                          str(tiny_model_export), "--prompts", "3", "--links", "none",
                          "--cuts", "0.5,1.0", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "prefetch" and report["prompts"] == 118
    half, whole = report["agreement"]["0.5"], report["agreement"]["1.0"]
    assert whole == [1.0, 1.0]                       # the whole prompt is its own path
    assert all(0 <= s <= 1 for s in half) and half[0] >= half[1]
    loop = report["links"]["loopback"]
    assert loop["cold_bytes"] > 0
    # prefetching the whole prompt leaves nothing to fetch when it is sent
    assert loop["1.0"]["fetched_after_bytes"] == 0
    assert (tmp_path / "prefetch.png").stat().st_size > 0
