"""Smoke runs of the storage benchmarks (benchmarks/tiers.py, benchmarks/paper_scale.py).

Run: .venv/bin/python -m pytest -q tests/integration/test_storage_benchmarks.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_tiers_quick(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.tiers", "--quick", "--dir",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    report = last_json(out)
    for label in ("64KB", "1MB"):
        assert set(report["results"][label]) >= {"lmdb-warm", "lmdb-cold", "redis", "lru",
                                                 "serve-old", "serve-new"}
    assert list(tmp_path.iterdir()) == []          # the work dir is cleaned up


@pytest.mark.slow
def test_paper_scale_small(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks.paper_scale", "--dir", str(tmp_path),
                          "--cold", "2", "--warm", "3", "--paths", "1"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, check=True).stdout
    report = last_json(out)
    assert report["build"]["blocks"] == 4 + 16 + 64
    assert set(report["fetch"]) == {"level1", "level2", "level3", "path"}
