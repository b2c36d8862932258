"""benchmarks/hedging.py runs end to end (a few fetches) and ends with one JSON line.

Run: .venv/bin/python -m pytest -q tests/integration/test_hedging_benchmark.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_hedging_benchmark_smoke():
    # every relayed segment stalls (both replicas equally slow: hedging cannot help, and the
    # hedge delay learned from them is as slow); the stalls show up in the relayed modes only
    out = subprocess.run([sys.executable, "-m", "benchmarks.hedging", "--fetches", "12", "--warmup",
                          "2", "--stall-p", "1", "--stall-ms", "5"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "hedging" and summary["stalls"] > 0
    modes = summary["modes"]
    assert set(modes) == {"bankclient", "fetcher", "fetcher-hedged", "direct-bankclient",
                          "direct-fetcher"}
    assert all(m["max_ms"] >= m["p99_ms"] >= m["p50_ms"] > 0 for m in modes.values())
    assert modes["fetcher"]["hedges"] == 0 and modes["direct-fetcher"]["rpcs"] >= 12
    assert modes["bankclient"]["p50_ms"] > modes["direct-bankclient"]["p50_ms"]
