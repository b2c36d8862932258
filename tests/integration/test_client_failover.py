"""The device's sharded fetcher against real bank server subprocesses: 2 shards, replication 2.

  shard killed            -> the fetch fails over to the other replica
  slow replica            -> a hedged request to the other replica wins (a TCP relay adds delay)
  block corrupt in LMDB   -> that replica answers DATA_LOSS; the client refetches from the other
  no bank at all          -> MemoryModel decodes anchor-only, flag + reason + log line
  MemoryModel + cache     -> one manifest read per TTL, attached levels kept, disk cache reused

Run: .venv/bin/pytest -q tests/integration/test_client_failover.py
"""
from __future__ import annotations

import logging
import shutil

import lmdb
import pytest

from membank.artifacts import iter_blocks, load_manifest
from services.bank_server.ingest import ingest
from services.model_client.bank_client import BankClient
from services.model_client.device_cache import DeviceCache
from services.model_client.fetcher import FetchPolicy
from services.model_client.memory_model import MemoryModel
from services.model_client.targets import open_bank
from testkit.keys import signing_key, trust
from testkit.net import Relay, free_port
from tests.conftest import FakeEmbedder, run_bank_server

pytestmark = pytest.mark.integration
SHARDS = ["s0", "s1"]
PROMPT = "The atomic number of Ruthenium is"


@pytest.fixture(scope="module")
def shard_lmdbs(tiny_model_export, tmp_path_factory):
    """The tiny model's bank ingested as shards s0, s1 with replication 2 (every block twice)."""
    root = tmp_path_factory.mktemp("failover")
    paths = {s: root / s for s in SHARDS}
    for s in SHARDS:
        ingest(tiny_model_export, paths[s], shard_id=s, shards=SHARDS, replication=2,
               placement_level=1, progress=False, map_size=1 << 30, signing_key=signing_key())
    return paths


@pytest.fixture(scope="module")
def exported(tiny_model_export):
    return {(l, n): d
            for l, n, d in iter_blocks(tiny_model_export, load_manifest(tiny_model_export))}


def start_shards(paths, log_dir):
    """Both shard servers; returns the context managers' (address, proc) pairs by shard."""
    return {s: run_bank_server(paths[s], "--shard-id", s, "--no-admin",
                               log_path=log_dir / f"{s}.log") for s in SHARDS}


@pytest.fixture(scope="module")
def servers(shard_lmdbs, tmp_path_factory):
    logs = tmp_path_factory.mktemp("failover-logs")
    cms = start_shards(shard_lmdbs, logs)
    started = {s: cm.__enter__() for s, cm in cms.items()}
    yield {s: a for s, (a, _) in started.items()}
    for cm in cms.values():
        cm.__exit__(None, None, None)


def manifest_from(address):
    with BankClient(address) as c:
        return c.get_manifest("test")


def path_and_owners(model, manifest):
    path = model.router.route(FakeEmbedder().encode([PROMPT]))[0].tolist()
    blocks = manifest.path_blocks(path)
    return path, blocks, manifest.owners(*blocks[-1])


@pytest.fixture
def model(tiny_model_export):
    return MemoryModel.from_pretrained(tiny_model_export, embedder=FakeEmbedder(), trust=trust())


def test_a_killed_shard_fails_over_to_its_replica(shard_lmdbs, tmp_path, model, exported):
    cms = start_shards(shard_lmdbs, tmp_path)
    started = {s: cm.__enter__() for s, cm in cms.items()}
    try:
        targets = {s: a for s, (a, _) in started.items()}
        m = manifest_from(targets["s0"])
        _, blocks, (primary, secondary) = path_and_owners(model, m)
        with open_bank(targets, policy=FetchPolicy(hedge=False, deadline_s=20)) as f:
            assert {b: bytes(v) for b, v in f.fetch("test", m.version, blocks, m).items()} == \
                {b: exported[b] for b in blocks}
            assert f.stats()["shards"][primary]["rpcs"] == 1 and f.stats()["failovers"] == 0
            proc = started[primary][1]
            proc.kill()
            proc.wait()
            got = f.fetch("test", m.version, blocks, m)
            assert {b: bytes(v) for b, v in got.items()} == {b: exported[b] for b in blocks}
            st = f.stats()
            assert st["failovers"] == 1 and st["errors"] == {"UNAVAILABLE": 1}
            assert st["shards"][secondary]["rpcs"] == 1 and st["down"] == [primary]
            assert f.get_manifest("test") == m          # from the shard that is still up
            assert f.shard_health() == {primary: False, secondary: True} and f.health()
    finally:
        for cm in cms.values():
            cm.__exit__(None, None, None)


def test_a_slow_replica_is_hedged_and_the_hedge_wins(servers, model, exported):
    m = manifest_from(servers["s0"])
    _, blocks, (primary, secondary) = path_and_owners(model, m)
    # every reply segment held 2 s: far beyond the 50 ms hedge delay
    relay = Relay(servers[primary], stall_p=1.0, stall_s=2.0)
    targets = {primary: relay.address, secondary: servers[secondary]}
    try:
        with open_bank(targets, policy=FetchPolicy(hedge_initial_s=0.05, deadline_s=20)) as f:
            got = f.fetch("test", m.version, blocks, m)
            assert {b: bytes(v) for b, v in got.items()} == {b: exported[b] for b in blocks}
            st = f.stats()
            assert (st["hedges"], st["hedge_wins"], st["cancelled"]) == (1, 1, 1)
            assert st["shards"][primary]["rpcs"] == 1 and relay.connections == 1
    finally:
        relay.close()


def test_a_block_corrupt_on_one_replica_is_refetched_from_the_other(shard_lmdbs, tmp_path,
                                                                     model, exported):
    copies = {s: tmp_path / s for s in SHARDS}
    for s in SHARDS:
        shutil.copytree(shard_lmdbs[s], copies[s])
    cms = start_shards(copies, tmp_path)
    started = {s: cm.__enter__() for s, cm in cms.items()}
    try:
        targets = {s: a for s, (a, _) in started.items()}
        m = manifest_from(targets["s0"])
        _, blocks, (primary, secondary) = path_and_owners(model, m)
        level, node = blocks[-1]                     # the path's deepest block, on its primary
        env = lmdb.open(str(copies[primary]), map_size=1 << 30)
        with env.begin(write=True) as txn:
            key = m.storage_key(level, node)
            good = bytes(txn.get(key))
            txn.put(key, bytes([good[0] ^ 0xFF]) + good[1:])     # same size, one byte flipped
        env.close()
        with open_bank(targets, policy=FetchPolicy(hedge=False, deadline_s=20)) as f:
            got = f.fetch("test", m.version, blocks, m)
            assert {b: bytes(v) for b, v in got.items()} == {b: exported[b] for b in blocks}
            st = f.stats()
            assert st["integrity_errors"] == 1 and st["errors"] == {"DATA_LOSS": 1}
            assert st["shards"][primary]["rpcs"] == 1 and st["shards"][secondary]["rpcs"] == 1
    finally:
        for cm in cms.values():
            cm.__exit__(None, None, None)


def test_no_bank_reachable_decodes_anchor_only_with_the_flag(model, caplog):
    targets = {s: f"127.0.0.1:{free_port()}" for s in SHARDS}          # nothing listens
    with open_bank(targets, policy=FetchPolicy(deadline_s=3, attempt_timeout_s=1)) as f, \
            caplog.at_level(logging.WARNING, logger="membank.client"):
        result = model.generate(PROMPT, bank=f, max_new_tokens=3)
    assert result.memory is False and "bank unavailable" in result.anchor_only_reason
    assert "UNAVAILABLE" in result.anchor_only_reason and result.new_tokens >= 1
    assert any("decoding anchor-only" in r.getMessage() for r in caplog.records)
    assert not model.attached


def test_model_reads_the_manifest_once_per_ttl_and_reuses_cached_blocks(servers, tiny_model_export,
                                                                        tmp_path, exported):
    cache_dir = tmp_path / "cache"
    model = MemoryModel.from_pretrained(tiny_model_export, embedder=FakeEmbedder(),
                                        cache=DeviceCache(1 << 20, cache_dir), manifest_ttl_s=3600,
                                        trust=trust())
    with open_bank(servers) as f:
        reads = []
        real = f.get_manifest
        f.get_manifest = lambda *a, **k: reads.append(a) or real(*a, **k)
        first = model.generate(PROMPT, bank=f, max_new_tokens=2)
        blocks = first.fetched_blocks
        assert first.memory and blocks == load_manifest(tiny_model_export).path_blocks(first.path)
        assert first.fetched_bytes == sum(len(exported[b]) for b in blocks)
        again = model.generate(PROMPT, bank=f, max_new_tokens=2)
        assert again.memory and again.fetched_blocks == [] and again.cached_blocks == []  # attached
        assert len(reads) == 1 and f.stats()["rpcs"] == 1
        # a restarted device: memory empty, the disk cache has the path (re-verified on read)
        fresh = MemoryModel.from_pretrained(tiny_model_export, embedder=FakeEmbedder(),
                                            cache=DeviceCache(1 << 20, cache_dir), trust=trust())
        third = fresh.generate(PROMPT, bank=f, max_new_tokens=2)
        assert third.memory and third.fetched_blocks == [] and third.cached_blocks == blocks
        assert f.stats()["rpcs"] == 1 and fresh.cache.level_stats()[1].disk_hits == 1
        assert third.text == first.text                  # same memory, same greedy answer
