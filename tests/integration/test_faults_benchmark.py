"""benchmarks/faults.py --quick runs end to end (the four faults under load, short phases on a
2-shard cluster) and ends with one JSON line: every scenario present, no failed prompt, each
fault seen by the device client or the servers, and the plot written.

Run: .venv/bin/python -m pytest -q tests/integration/test_faults_benchmark.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_faults_benchmark_quick(tmp_path):
    png = tmp_path / "faults.png"
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.faults", "--quick", "--workdir", str(tmp_path / "work"),
         "--plot", str(png)],
        cwd=REPO, capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["benchmark"] == "faults" and summary["quick"] is True
    scenarios = summary["scenarios"]
    assert set(scenarios) == {"redis", "publish", "kill", "corrupt"}
    for name, s in scenarios.items():
        assert s["failed_prompts"] == 0 and s["loop_failed_prompts"] == 0, (name, s["first_errors"])
        assert set(s["phases"]) == {"before", "during", "after"}
        assert all(p["prompts"] > 0 for p in s["phases"].values()), (name, s["phases"])
        assert s["paths_checked"] > 0 and s["paths_mixed"] == 0, name
        assert s["first_ok_without_ms"] is not None, name
        assert s["recovery_ms"] is not None, (name, s["notes"])
    assert summary["failed_prompts"] == 0
    # each fault was real: seen by the client (failover) or counted by the servers
    assert scenarios["kill"]["phases"]["during"]["rpc_errors"].get("UNAVAILABLE", 0) > 0
    corrupt = scenarios["corrupt"]["phases"]["during"]
    assert corrupt["server"].get("FetchBlocks.DATA_LOSS", 0) > 0
    assert corrupt["server"].get("lmdb.corrupt", 0) > 0
    redis_down = scenarios["redis"]["phases"]["during"]["server"]
    assert redis_down.get("redis.errors", 0) + redis_down.get("redis.skipped", 0) > 0
    publish = scenarios["publish"]
    assert publish["versions"]["v1"] > 0 and publish["versions"]["v2"] > 0
    assert publish["blocks_differing_between_versions"] == "20/20"
    assert set(publish["phases"]["after"]["versions"]) == {"v2"}
    # the table and the plot
    assert "| scenario | phase |" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
