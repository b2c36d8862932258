"""benchmarks/cold_path.py end to end on loopback at one round: every mode moves the path's
36.1 MB and the output ends with one JSON line (in place vs copied is
tests/unit/test_memory_model_fetch.py's).

Run: .venv/bin/python -m pytest -q tests/integration/test_cold_path_bench.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_cold_path_benchmark_smoke(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.cold_path", "--links", "none",
                          "--reps", "1", "--no-ttft", "--dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "cold_path" and list(report["links"]) == ["loopback"]
    modes = report["links"]["loopback"]
    assert set(modes) == {"raw-tcp", "dp-in-place", "dp-copy", "grpc-in-place"}
    path_bytes = report["path_bytes"]
    assert path_bytes == 36_126_720                      # the paper's 160M path
    for name, m in modes.items():
        assert m["bytes"] == path_bytes, name
        if name != "raw-tcp":
            assert m["x_raw"] > 0 and m["fetch"] > 0
    assert not list(tmp_path.iterdir())                  # the work directory is removed
