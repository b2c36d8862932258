"""benchmarks/sizing.py: a short run measures every process, and its recommendations follow
the measurements (more load or bigger blocks never get smaller requests).

Run: .venv/bin/python -m pytest -q tests/integration/test_sizing_benchmark.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.sizing import recommend
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def _mi(s: str) -> int:
    return int(s.removesuffix("Mi"))


def _m(s: str) -> int:
    return int(s.removesuffix("m"))


def test_sizing_short_run():
    out = subprocess.run([sys.executable, "-m", "benchmarks.sizing", "--duration", "3",
                          "--scales", "1"], cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["server"]["errors"] == 0 and report["server"]["prompts_per_s"] > 0
    assert report["server"]["cpu_ms_per_prompt"] > 0 and report["server"]["peak_anon_mb"] > 0
    assert report["ingest"][0]["peak_anon_mb"] > 0
    assert report["redis"]["evicted_keys"] > 0            # the LRU really was full
    assert report["redis"]["rss_over_maxmemory"] > 0.9
    for rec in report["recommended"].values():
        assert _mi(rec["server"]["limits"]["memory"]) >= _mi(rec["server"]["requests"]["memory"])


def test_recommend_grows_with_load_and_block_size():
    ingest = [{"peak_anon_mb": 90.0}]
    server = {"cpu_ms_per_prompt": 4.0, "peak_anon_mb": 55.0}
    rds = {"rss_over_maxmemory": 1.05}
    small = recommend(ingest, server, rds, 50, 0, 200, max_block_mb=0.4)
    busy = recommend(ingest, server, rds, 500, 0, 200, max_block_mb=0.4)
    big = recommend(ingest, server, rds, 50, 0, 200, max_block_mb=27.5)
    lru = recommend(ingest, server, rds, 50, 512, 200, max_block_mb=0.4)
    # 4 ms x 50/s x 1.5 = 0.3 cores; x 10 the load: 3 cores
    assert _m(small["server"]["requests"]["cpu"]) == 300
    assert _m(busy["server"]["requests"]["cpu"]) == 3000
    assert _mi(big["server"]["requests"]["memory"]) > _mi(small["server"]["requests"]["memory"])
    assert (_mi(lru["server"]["requests"]["memory"])
            >= _mi(small["server"]["requests"]["memory"]) + 512)
    # Redis: 200 MB x 1.05 x 1.2 = 252 MB -> 256Mi, request = limit
    assert small["redis"]["limits"]["memory"] == small["redis"]["requests"]["memory"] == "256Mi"
