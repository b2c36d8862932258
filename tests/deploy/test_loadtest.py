"""loadtests/: the device model (pure), the gRPC reporting interceptor against a real server,
and (when locust is installed: `make loadtest` installs it, `make test` does not) a short
headless locust run against a real server."""
from __future__ import annotations

import csv
import importlib.util
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from membank.manifest import Manifest
from services.model_client.bank_client import BankError

REPO = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"loadtests_{name}",
                                                  REPO / "loadtests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


device = load("device")
instrument = load("grpc_instrument")


# -- device model -------------------------------------------------------------------------------
def test_zipf_paths_cover_the_tree_and_follow_popularity():
    z = device.ZipfLeaves(branching=4, depth=2, s=1.1, seed=0)
    assert z.n_leaves == 16
    assert sorted(z.leaf_by_rank) == list(range(16))
    assert [z.path(leaf) for leaf in (0, 5, 15)] == [[0, 0], [1, 1], [3, 3]]
    assert abs(sum(z.probability(l) for l in range(16)) - 1.0) < 1e-9
    rng = random.Random(1)
    counts = Counter(z.sample_leaf(rng) for _ in range(20_000))
    top, second, last = z.leaf_by_rank[0], z.leaf_by_rank[1], z.leaf_by_rank[-1]
    assert counts[top] > counts[second] > counts[last] > 0
    assert abs(counts[top] / 20_000 - z.probability(top)) < 0.02
    # same seed, same ranks; another seed, another order
    assert device.ZipfLeaves(4, 2, seed=0).leaf_by_rank == z.leaf_by_rank
    assert device.ZipfLeaves(4, 2, seed=1).leaf_by_rank != z.leaf_by_rank


def test_device_cache_fetches_only_missing_blocks_lru():
    c = device.DeviceCache(capacity=3)
    assert c.missing([(1, 0), (2, 1)]) == [(1, 0), (2, 1)]
    c.put((1, 0), 10)
    c.put((2, 1), 5)
    assert c.missing([(1, 0), (2, 2)]) == [(2, 2)]        # (1, 0) hit, now most recent
    c.put((2, 2), 5)
    c.put((2, 3), 5)                                      # evicts the LRU: (2, 1)
    assert (2, 1) not in c and (1, 0) in c and len(c) == 3 and c.nbytes == 20
    assert (c.hits, c.misses) == (1, 3) and c.hit_ratio == 0.25
    c.clear()
    assert len(c) == 0


def test_the_load_test_fetches_what_the_device_plans():
    """ShardedBank asks each group of the device's plan (fetcher.plan_groups) of its first
    replica: the load test measures the RPCs a device sends; shards marked down go last."""
    from loadtests.load_loop import ShardedBank
    from services.model_client.fetcher import ShardedFetcher

    m = Manifest(bank="b", version="v1", dtype="float32", d_model=4, mem_layers=[0],
                 branching=4, ranks=[1, 1, 1], checksums=[["x"] * 4, ["x"] * 16, ["x"] * 64],
                 shards=["s0", "s1", "s2"], replication=2, placement_level=2)
    sent = []

    class Client:
        def __init__(self, name):
            self.name = name

        def fetch(self, bank, version, ids, manifest):
            sent.append((self.name, list(ids)))
            return {b: bytearray(1) for b in ids}

        def close(self):
            pass

    targets = {s: s for s in m.shards}
    bank = ShardedBank(targets, client=lambda addr, timeout_s: Client(addr))
    device = ShardedFetcher(targets, client_factory=Client)
    rng = random.Random(0)
    for _ in range(30):
        path = m.path_blocks([rng.randrange(4) for _ in range(3)])
        sent.clear()
        assert len(bank.fetch(m, path)) == 3
        assert sent == [(g.replicas[0], g.blocks) for g in device.plan(m, path)]
        first = sent[0][0]
        bank._mark_down(first, "UNAVAILABLE")
        sent.clear()
        bank.fetch(m, path)
        assert all(shard != first for shard, _ in sent)     # another replica, while down
        bank._down_until.clear()
    device.close()


def test_parse_targets_named_plain_and_mismatched():
    assert device.parse_targets("shard-1=h:2, shard-0=h:1") == {"shard-1": "h:2", "shard-0": "h:1"}
    assert device.parse_targets("h:1,h:2", ["s0", "s1"]) == {"s0": "h:1", "s1": "h:2"}
    assert device.parse_targets("h:1") == {"shard-0": "h:1"}
    for spec, ids, msg in (("", None, "no bank address"), ("a=h:1,h:2", None, "name all or none"),
                           ("h:1,h:2", ["s0"], "2 addresses for the manifest's 1 shards")):
        with pytest.raises(ValueError, match=msg):
            device.parse_targets(spec, ids)


# -- interceptor against a real server -------------------------------------------------------------
def test_instrumented_client_reports_every_rpc(bank_server):
    reports = []
    with instrument.InstrumentedBankClient(bank_server, lambda **kw: reports.append(kw)) as client:
        m: Manifest = client.get_manifest("test")
        blocks = client.fetch("test", m.version, m.path_blocks([1, 0]), m)
        with pytest.raises(BankError):
            client.get_manifest("no-such-bank")
    assert [r["name"] for r in reports] == ["GetManifest", "FetchBlocks L1+L2", "GetManifest"]
    manifest_r, fetch_r, missing_r = reports
    assert manifest_r["exception"] is None and manifest_r["response_length"] > 0
    assert fetch_r["exception"] is None
    assert fetch_r["response_length"] == sum(len(b) for b in blocks.values())
    assert missing_r["exception"] is not None
    assert all(r["request_type"] == "grpc" and r["response_time"] >= 0 for r in reports)


# -- a short locust run ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.integration
def test_headless_locust_smoke(bank_server, tmp_path):
    # find_spec, never import: importing locust monkey-patches this whole process with gevent
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust comes with the `load` extra (make loadtest), not with make test")
    cmd = [sys.executable, "-m", "locust", "-f", str(REPO / "loadtests" / "locustfile.py"),
           "--headless", "-u", "2", "-r", "2", "-t", "3s", "--host", bank_server,
           "--only-summary", "--csv", str(tmp_path / "lt")]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "MEMBANK_LOADTEST_BANK": "test"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {row["Name"]: row for row in csv.DictReader(open(tmp_path / "lt_stats.csv"))}
    assert int(rows["prompt"]["Request Count"]) > 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert any(name.startswith("FetchBlocks L") for name in rows)
    assert "device cache hit ratio" in r.stdout + r.stderr
