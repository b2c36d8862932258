"""benchmarks/delta_publish.py end to end on the tiny preset: three versions from real
continued training (a subtree job merged, then a whole-bank continuation), ingested by content
and by version, one device replaying its trace across both publishes.

Run: .venv/bin/python -m pytest -q tests/integration/test_delta_publish_bench.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_delta_publish_benchmark_smoke(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.delta_publish", "--config", "tiny",
                          "--anchor-steps", "10", "--cotrain-steps", "10", "--continue-steps",
                          "5", "--prompts", "20", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    v2, v3 = report["publishes"]
    # the subtree job changed subtree 0 only (k = 2, depth 2: its level-1 block and 2 leaves)
    assert (v2["version"], v2["changed_blocks"], v2["blocks"]) == ("v2", 3, 6)
    for row in (v2, v3):
        # ingest by content writes exactly the changed blocks; by version, all of them
        assert row["ingest_bytes_content"] == row["changed_bytes"]
        assert row["ingest_bytes_version"] == report["bank_bytes"]
        assert row["refetch_within_bound"] and row["anchor_only_prompts"] == 0
        assert row["refetch_bytes_content"] <= row["refetch_bytes_today"]
    assert report["warm_v1"]["fetched_bytes"] > 0
    assert (tmp_path / "delta_publish.png").stat().st_size > 0
