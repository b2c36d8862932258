"""benchmarks/fetch.py runs end to end (tiny byte counts) and ends with one JSON line.

Run: .venv/bin/python -m pytest -q tests/integration/test_fetch_benchmark.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_fetch_benchmark_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.fetch", "--work", str(tmp_path), "--sizes", "1.7,6.9",
         "--clients", "1,2", "--mb-per-point", "20", "--rounds", "1",
         "--systems", "membank-dp,membank,membank-raw,grpc-floor,tcp,tcp-rcvbuf,redis,http"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "fetch"
    points = {(r["size_mb"], r["clients"], r["system"]) for r in summary["results"]}
    assert len(points) == 2 * 2 * 8
    assert all(r["mb_s"] > 0 and r["p99_ms"] >= r["median_ms"] > 0 for r in summary["results"])
    assert "single_client_6.9MB_x_tcp" in summary["targets"]
    assert "single_client_6.9MB_x_tcp" in summary["targets"]["dataplane"]
    assert summary["targets"]["judged_on"] == "membank-dp"


def test_dataplane_latency_benchmark_smoke(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.dataplane_latency", "--work", str(tmp_path),
         "--sizes", "1.7", "--fetches", "20", "--rounds", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "dataplane_latency"
    (row,) = summary["results"]
    assert row["size_mb"] == 1.7 and row["fetches"] == 20
    d, t = row["raw_dp"], row["raw_tcp"]
    assert 0 < d["ttfb_us"] < d["total_us"] and 0 < t["ttfb_us"] < t["total_us"]
    assert row["client_dp_us"] > 0 and row["client_tcp_us"] > 0
