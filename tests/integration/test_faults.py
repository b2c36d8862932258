"""Faults under load against a local cluster (services/bank_server/cluster.py): real shard
subprocesses over their own LMDBs, a real redis-server, loopback only.

Each test runs a threaded load loop (loadtests/load_loop.py: devices fetching Zipf-popular
paths, placement-routed, failing over across replicas), injects one fault, and checks what a
device sees (no failed prompt, no path mixing versions) and what the servers report. Every wait
is bounded by a prompt count and a timeout, never by a sleep that must be long enough.

  - Redis stopped during load: no failed fetch; Redis back: the tier is used again (hits).
  - A new version published during load: no errors, no path mixes versions, devices move on.
  - A shard SIGKILLed (replication 2): no failed prompt; restarted, it serves again.
  - A block corrupted on one replica's disk: DATA_LOSS there (never sent), the device gets it
    from the other replica; the shard's metrics count the corrupt read and the DATA_LOSS.

The two replica tests drive the device's own multi-shard client
(services/model_client/fetcher.py `ShardedFetcher`: placement, failover, hedging); the Redis
and publish tests use the load loop's small placement client (`ShardedBank`).

Run: .venv/bin/python -m pytest -q tests/integration/test_faults.py
"""
from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

from loadtests.load_loop import LoadLoop
from services.bank_server.cluster import run_local_cluster
from services.model_client.bank_client import BankClient, BankError
from services.model_client.fetcher import FetchPolicy, ShardedFetcher
from services.model_client.targets import open_bank
from testkit.exports import synthetic_export
from tests.conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(180)]

PROMPTS = 120        # prompts per phase: enough for every popular path to be fetched many times
WAIT_S = 60          # bound of any one phase (a loaded 2-core machine is slow, never stuck)


def fault_export(out: Path, version: str, seed: int) -> Path:
    """k=4, depth 2 (4 + 16 blocks of 24 KiB / 12 KiB), float32: small, placement-meaningful."""
    synthetic_export(out, bank="fault", version=version, dtype="float32", d_model=64,
                     mem_layers=[0, 1], branching=4, ranks=[16, 8], seed=seed)
    return out


@pytest.fixture(scope="module")
def export_v1(tmp_path_factory) -> Path:
    return fault_export(tmp_path_factory.mktemp("fault_v1"), "v1", seed=11)


@pytest.fixture(scope="module")
def export_v2(tmp_path_factory) -> Path:
    return fault_export(tmp_path_factory.mktemp("fault_v2"), "v2", seed=12)


def redis_hits(cluster) -> int:
    return sum(s["tiers"]["redis"]["hits"] for s in cluster.stats().values())


def assert_no_failed_prompt(report) -> None:
    assert report.prompts > 0
    assert report.errors == [], report.errors[:5]


# -- Redis ------------------------------------------------------------------------------------
def test_redis_stopped_during_load_no_failed_fetch_and_picked_up_again(export_v1, tmp_path):
    with run_local_cluster(export_v1, shards=2, redis=True, workdir=tmp_path,
                           server_args=["--redis-retry-after-s", "0.2"]) as cluster, \
            LoadLoop(cluster.targets, "fault", threads=3) as load:
        assert wait_for(lambda: redis_hits(cluster) > 0, WAIT_S), "redis tier never hit"
        assert load.wait_prompts(PROMPTS, WAIT_S)

        cluster.stop_redis(kill=True)
        mark_down = len(load.report.prompt_ms)
        assert load.wait_prompts(PROMPTS, WAIT_S)
        # the shards noticed (breaker open or calls counted as errors/skipped), and kept serving
        redis_down = [s["tiers"]["redis"] for s in cluster.stats().values()]
        assert all(r["errors"] + r["skipped"] > 0 for r in redis_down), redis_down
        during = redis_hits(cluster)

        cluster.start_redis()            # empty (no persistence), same port
        mark_up = len(load.report.prompt_ms)
        # picked up again: the empty Redis is refilled and hit (bounded by the breaker's probe)
        assert wait_for(lambda: redis_hits(cluster) > during, WAIT_S), "redis not used again"
        assert all(s["tiers"]["redis"]["breaker"] == "closed" for s in cluster.stats().values())
        assert load.wait_prompts(PROMPTS // 2, WAIT_S)
    report = load.report
    assert_no_failed_prompt(report)
    assert report.failed_rpcs == 0          # Redis never turns into a failed fetch
    ms = report.prompt_ms
    phases = {"up": ms[:mark_down], "down": ms[mark_down:mark_up], "back": ms[mark_up:]}
    print("prompt p50 ms by phase:",
          {k: round(sorted(v)[len(v) // 2], 2) for k, v in phases.items() if v})


# -- publish --------------------------------------------------------------------------------
def test_publish_during_load_no_errors_and_no_mixed_versions(export_v1, export_v2, tmp_path):
    with run_local_cluster(export_v1, shards=2, workdir=tmp_path) as cluster, \
            LoadLoop(cluster.targets, "fault", threads=3, manifest_s=0.1) as load:
        assert load.wait_prompts(PROMPTS, WAIT_S)
        m2 = cluster.publish(export_v2)
        assert m2.version == "v2"
        assert wait_for(lambda: load.report.versions["v2"] >= PROMPTS, WAIT_S)
        report = load.stop()
        # a device holding v1's manifest is refused v2's bytes: the check that keeps a path
        # from mixing versions is real (v1 and v2 blocks differ: other seeds)
        with BankClient(cluster.targets[m2.owners(1, 0)[0]]) as c:
            m1 = c.get_manifest("fault", "v1")
            assert c.get_manifest("fault").version == "v2"
            assert m1.checksum(1, 0) != m2.checksum(1, 0)
            forged = m1.model_copy(update={"version": "v2"})
            with pytest.raises(BankError) as e:
                c.fetch("fault", "v2", [(1, 0)], forged)
            assert e.value.code == "DATA_LOSS", e.value
    assert_no_failed_prompt(report)
    # every path was fetched with one manifest, each block's header and bytes checked against
    # it: a block of the other version would have been a failed RPC
    assert report.failed_rpcs == 0 and report.failovers == {}
    assert report.versions["v1"] > 0 and report.versions["v2"] >= PROMPTS


# -- replicas: shard killed, block corrupted (the device's ShardedFetcher) ----------------------
def device_fetcher(targets, *, hedge: bool = True) -> ShardedFetcher:
    # a shard that answered UNAVAILABLE is tried last for 0.5 s (default 5 s): it rejoins sooner
    return open_bank(targets, policy=FetchPolicy(down_s=0.5, deadline_s=10, hedge=hedge))


def fetches_ok(cluster, shard: str) -> int:
    """FetchBlocks answered OK by `shard` since it (re)started (its admin /v1/stats)."""
    return cluster.shard(shard).stats()["rpcs"].get("FetchBlocks", {}).get("OK", 0)


def test_sigkill_a_shard_with_replication_2_no_failed_prompt_and_it_rejoins(export_v1, tmp_path):
    with run_local_cluster(export_v1, shards=3, replication=2, workdir=tmp_path) as cluster, \
            device_fetcher(cluster.targets, hedge=False) as fetcher, \
            LoadLoop(cluster.targets, "fault", threads=3, fetcher=fetcher) as load:
        # no hedging: a hedge to the other replica could absorb the killed shard's UNAVAILABLE
        # before failover counts it, and this test is about failover
        assert load.wait_prompts(PROMPTS, WAIT_S)
        # the busiest shard: a primary replica of popular paths (the fetcher asks primaries)
        victim = max(cluster.shards, key=lambda s: fetches_ok(cluster, s))
        assert fetches_ok(cluster, victim) > 0
        cluster.kill(victim)                                   # SIGKILL: no drain
        assert not cluster.shard(victim).alive
        assert load.wait_prompts(PROMPTS, WAIT_S)
        cluster.restart(victim)                                # same port, fresh counters
        assert cluster.shard(victim).alive
        # it rejoins: devices send it fetches again (down_s, then gRPC's reconnect)
        assert wait_for(lambda: fetches_ok(cluster, victim) >= 20, WAIT_S)
        report = load.stop()
    assert_no_failed_prompt(report)
    stats = report.failovers                                   # the fetcher's own counters
    assert stats["errors"].get("UNAVAILABLE", 0) > 0 and stats["failovers"] > 0, stats


def corrupt_on_disk(lmdb_dir: Path, block: bytes) -> int:
    """Flip one byte of `block`'s bytes inside data.mdb (bit rot under LMDB, not an LMDB
    write); the serving process sees it through the shared page cache. Returns the offset."""
    data = lmdb_dir / "data.mdb"
    raw = data.read_bytes()
    at = raw.find(block)
    assert at >= 0 and raw.find(block, at + 1) < 0, "block bytes not found exactly once"
    offset = at + len(block) // 2
    with open(data, "r+b") as f:
        f.seek(offset)
        f.write(bytes([raw[offset] ^ 0xFF]))
    return offset


def test_corrupt_block_on_one_replica_served_from_the_other(export_v1, tmp_path):
    with run_local_cluster(export_v1, shards=2, replication=2, workdir=tmp_path) as cluster:
        targets = cluster.targets
        with BankClient(targets["shard-0"]) as c:
            m = c.get_manifest("fault")
            good = bytes(c.fetch("fault", m.version, [(2, 5)], m)[(2, 5)])
        bad_shard = m.owners(2, 5)[0]       # first replica in placement order: asked first
        corrupt_on_disk(cluster.shard(bad_shard).lmdb, good)

        with BankClient(targets[bad_shard]) as c:         # that replica refuses to send it
            with pytest.raises(BankError) as e:
                c.fetch("fault", m.version, [(2, 5)], m)
            assert e.value.code == "DATA_LOSS" and "checksum" in e.value.message

        with device_fetcher(targets) as fetcher:
            got = fetcher.fetch("fault", m.version, [(1, 1), (2, 5)], m)   # from the other
            assert bytes(got[(2, 5)]) == good
            assert fetcher.stats()["integrity_errors"] == 1
            with LoadLoop(targets, "fault", threads=3, fetcher=fetcher) as load:   # under load
                assert load.wait_prompts(PROMPTS * 2, WAIT_S)
        report = load.report
        stats = cluster.shard(bad_shard).stats()
        with urllib.request.urlopen(f"http://{cluster.shard(bad_shard).admin_address}/metrics",
                                    timeout=5) as r:
            metrics = r.read().decode()
    assert_no_failed_prompt(report)
    assert report.failovers["integrity_errors"] >= 2       # (2, 5)'s path was asked again
    assert stats["tiers"]["lmdb"]["corrupt"] >= 2
    assert stats["rpcs"]["FetchBlocks"]["DATA_LOSS"] >= 2
    assert 'code="DATA_LOSS"' in metrics and 'method="FetchBlocks"' in metrics
