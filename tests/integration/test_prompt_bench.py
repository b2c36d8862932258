"""benchmarks/prompt.py end to end at tiny sizes on loopback: the scenarios fetch what they should,
the Zipf mix accounts for every block, a PNG is written, and the output ends with one JSON line.

Run: .venv/bin/python -m pytest -q tests/integration/test_prompt_bench.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_prompt_benchmark_smoke(tmp_path):
    png = tmp_path / "prompt.png"
    out = subprocess.run([sys.executable, "-m", "benchmarks.prompt", "--quick", "--links", "none",
                          "--no-paper", "--reps", "1", "--zipf-prompts", "60", "--preset", "tiny",
                          "--plot", str(png), "--dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "prompt" and list(report["links"]) == ["loopback"]
    demo = report["links"]["loopback"]["demo"]
    assert set(demo) == {"anchor-only", "cold", "warm-shallow", "warm"}
    blocks = report["demo_block_bytes"]          # per level, shallow first
    # cold fetches the whole path, warm-shallow only the leaf, warm and anchor-only nothing
    assert demo["cold"]["fetched_bytes"] == sum(blocks)
    assert demo["warm-shallow"]["fetched_bytes"] == blocks[-1]
    assert demo["warm"]["fetched_bytes"] == 0 and demo["anchor-only"]["fetched_bytes"] == 0
    assert demo["anchor-only"]["fetch"] == 0 and demo["cold"]["fetch"] > 0
    for sc in demo.values():
        assert sc["ttft"] >= sc["prefill"] > 0
    z = report["zipf"]["demo"]
    assert z["prompts"] == 60 and z["path_bytes"] == sum(blocks)
    for level in z["levels"].values():   # every prompt's block at every level is accounted for
        assert level["attached"] + level["cache"] + level["fetched"] == 60
        assert 0 <= level["hit_ratio"] <= 1
    assert 0 < z["bytes_per_prompt"] < z["path_bytes"]   # a skewed mix reuses shallow blocks
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "TTFT by step" in out.stdout
