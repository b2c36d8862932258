"""Shards: per-shard ingest, FAILED_PRECONDITION from a live shard server, rebalance to a new
shard (copies exactly the blocks placement moves), GC of what a shard no longer owns.

Run: .venv/bin/python -m pytest -q tests/integration/test_shards.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import lmdb
import pytest

from membank.artifacts import iter_blocks, load_manifest
from membank.blocks import checksum
from membank.keys import current_key
from membank.placement import moves, shard_blocks
from services.bank_server.gc import gc
from services.bank_server.ingest import ingest
from services.bank_server.rebalance import main as rebalance_main
from services.bank_server.rebalance import rebalance, replaced
from services.bank_server.store import LMDBStore
from services.model_client.bank_client import BankClient, BankError
from testkit.exports import synthetic_export
from tests.conftest import REPO

pytestmark = pytest.mark.integration
MAP = 1 << 30
OLD = ["s0", "s1", "s2"]
NEW = OLD + ["s3"]


def block_keys(path) -> set[bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        out = {bytes(k) for k, _ in txn.cursor() if bytes(k).startswith((b"b/", b"h/"))}
    env.close()
    return out


@pytest.fixture(scope="module")
def shard_export(tmp_path_factory):
    """k=8, ranks (4, 2, 1), d 16: 8 + 64 + 512 blocks, 64 placement groups at level 2."""
    out = tmp_path_factory.mktemp("export_shards")
    synthetic_export(out, bank="sh", version="v1", dtype="float32", d_model=16, mem_layers=[0],
                     branching=8, ranks=[4, 2, 1], seed=3)
    return out


@pytest.fixture
def three_shards(shard_export, tmp_path):
    paths = {s: tmp_path / s for s in NEW}
    for s in OLD:
        ingest(shard_export, paths[s], shard_id=s, shards=OLD, placement_level=2,
               progress=False, map_size=MAP)
    return paths


def test_shard_server_answers_failed_precondition_naming_the_owner(three_shards, shard_export,
                                                                   start_bank_server):
    exported = {(l, n): d for l, n, d in iter_blocks(shard_export, load_manifest(shard_export))}
    with start_bank_server(three_shards["s0"], "--shard-id", "s0") as (address, _), \
            BankClient(address) as c:
        m = c.get_manifest("sh")
        assert m.shards == OLD
        mine = [b for b in shard_blocks(m, "s0") if b[0] == 3][:3]
        got = c.fetch("sh", "v1", [(1, 5), *mine], m)           # level 1: on every shard
        assert all(bytes(got[b]) == exported[b] for b in got)
        theirs = next(b for b in m.blocks() if "s0" not in m.owners(*b))
        with pytest.raises(BankError) as e:
            c.fetch("sh", "v1", [mine[0], theirs], m)
        assert e.value.code == "FAILED_PRECONDITION"
        owner = m.owners(*theirs)[0]
        assert f"shard {owner}" in e.value.message and "s0" in e.value.message
    # a server started with the wrong shard id for its LMDB refuses to start
    proc = subprocess.run([sys.executable, "-m", "services.bank_server.server", "--lmdb",
                           str(three_shards["s0"]), "--port", "0", "--shard-id", "s1",
                           "--no-admin"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "ingested for shard 's0'" in proc.stderr


def test_rebalance_copies_exactly_the_moved_blocks(three_shards):
    before = {s: block_keys(three_shards[s]) for s in OLD}
    with LMDBStore(three_shards["s0"], MAP) as store:
        m = store.manifest("sh", "v1")
    planned = moves(m, replaced(m, "v1-s4", NEW))
    dry = rebalance(three_shards, "sh", "v1", "v1-s4", NEW, dry_run=True, map_size=MAP)
    assert dry["blocks_moved"] == len(planned) and not (three_shards["s3"] / "data.mdb").exists()

    report = rebalance(three_shards, "sh", "v1", "v1-s4", NEW, map_size=MAP)
    assert report["received"] == {"s0": 0, "s1": 0, "s2": 0, "s3": len(planned)}
    # only to the new shard; about a quarter of the 64 level-2 groups (~16)
    assert all(gained == ["s3"] for *_, gained in planned)
    groups = {n for l, n, *_ in planned if l == 2}
    assert 8 <= len(groups) <= 26, len(groups)
    assert {n // 8 for l, n, *_ in planned if l == 3} == groups     # a group moves whole
    # s3 holds exactly the moved blocks, under the old block keys; old shards got nothing new
    assert block_keys(three_shards["s3"]) == m.storage_keys((l, n) for l, n, *_ in planned)
    for s in OLD:
        assert block_keys(three_shards[s]) == before[s]
    # the re-placed version is complete and current on every shard
    for s in NEW:
        with LMDBStore(three_shards[s], MAP) as store:
            assert store.current_version("sh") == "v1-s4"
            m4 = store.manifest("sh", "v1-s4")
            assert m4.shards == NEW and m4.block_version == "v1"
            for l, n in shard_blocks(m4, s):
                assert checksum(store.get(m4.storage_key(l, n))) == m4.checksum(l, n)
    # rerunning is a no-op
    again = rebalance(three_shards, "sh", "v1", "v1-s4", NEW, map_size=MAP)
    assert again["written"]["s3"] == 0

    # GC on an old shard: v1's manifest goes, the blocks it gave away go, shared blocks stay
    report = gc(three_shards["s1"], "sh", keep=0, map_size=MAP)
    gave_away = {m4.storage_key(l, n) for l, n, owners, _ in planned
                 if "s1" in owners and "s1" not in m4.owners(l, n)}
    assert report["deleted"] == ["v1"] and report["blocks_deleted"] == len(gave_away)
    assert block_keys(three_shards["s1"]) == before["s1"] - gave_away
    with LMDBStore(three_shards["s1"], MAP) as store:
        assert store.manifest("sh", "v1") is None
        for l, n in shard_blocks(m4, "s1"):
            assert store.get(m4.storage_key(l, n)) is not None


def test_rebalance_cli_lists_moves(three_shards, capsys):
    args = ["--bank", "sh", "--version", "v1", "--new-version", "v1-s4", "--shards",
            ",".join(NEW), "--map-size-gb", "1", "--list"]
    for s in NEW:
        args += ["--lmdb", f"{s}={three_shards[s]}"]
    rebalance_main(args)
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["dry_run"] and len(lines) - 1 == report["blocks_moved"] > 0
    assert all(line.endswith("-> s3") for line in lines[:-1])
    for s in OLD:
        with LMDBStore(three_shards[s], MAP) as store:
            assert store.current_version("sh") == "v1"                 # a listing changes nothing
    env = lmdb.open(str(three_shards["s0"]), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.get(current_key("sh")) == b"v1"
    env.close()
