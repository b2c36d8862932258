"""membank/placement.py: stable, replicated, shallow levels everywhere, minimal movement.

Run: .venv/bin/python -m pytest -q tests/unit/test_placement.py
"""
import json
import os
import subprocess
import sys

import pytest

from membank.placement import ancestor, owners

SHARDS = [f"shard-{i}" for i in range(5)]
KW = dict(shards=SHARDS, replication=2, placement_level=2, branching=16)
SAMPLE = [(2, 5), (3, 17), (4, 1234), (2, 200)]
# computed once; a change here means every deployed bank would be re-placed
EXPECTED = {(2, 5): ["shard-4", "shard-2"], (3, 17): ["shard-3", "shard-1"],
            (4, 1234): ["shard-0", "shard-4"], (2, 200): ["shard-1", "shard-4"]}


def test_hard_values():
    for block in SAMPLE:
        assert owners("demo", *block, **KW) == EXPECTED[block]


def test_stable_across_processes():
    code = ("import json; from membank.placement import owners; "
            f"print(json.dumps([owners('demo', l, n, **{KW!r}) for l, n in {SAMPLE!r}]))")
    for seed in ("1", "987654"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout
        assert json.loads(out) == [EXPECTED[b] for b in SAMPLE]


@pytest.mark.parametrize("replication", [1, 2, 3, 5, 9])
def test_replicas_are_distinct(replication):
    for node in range(256):
        got = owners("b", 2, node, shards=SHARDS, replication=replication, placement_level=2,
                     branching=16)
        assert len(got) == min(replication, len(SHARDS))
        assert len(set(got)) == len(got)
        assert set(got) <= set(SHARDS)


def test_levels_above_placement_level_are_on_every_shard():
    for node in range(16):
        assert owners("b", 1, node, **KW) == SHARDS
    assert owners("b", 2, 0, **{**KW, "placement_level": 3}) == SHARDS


def test_deep_blocks_follow_their_ancestor():
    for node in range(16 ** 3):
        anc = ancestor(node, 4, 2, 16)
        assert owners("b", 4, node, **KW) == owners("b", 2, anc, **KW)


def test_spread_over_shards():
    primaries = [owners("b", 2, n, **KW)[0] for n in range(256)]
    assert set(primaries) == set(SHARDS)


@pytest.mark.parametrize("replication", [1, 2])
def test_adding_a_shard_only_moves_blocks_to_it(replication):
    kw = dict(replication=replication, placement_level=2, branching=16)
    moved = 0
    for node in range(256):
        before = owners("b", 2, node, shards=SHARDS, **kw)
        after = owners("b", 2, node, shards=SHARDS + ["shard-new"], **kw)
        assert set(after) - set(before) <= {"shard-new"}
        if after != before:
            moved += 1
            assert "shard-new" in after
    assert 0 < moved < 256


def test_no_shards():
    with pytest.raises(ValueError):
        owners("b", 2, 0, shards=[], replication=1, placement_level=1, branching=2)


# -- shard sets: what a shard keeps, what moves when one is added (membank/placement.py) --------
from membank.manifest import Manifest  # noqa: E402
from membank.placement import moves, shard_blocks  # noqa: E402


def manifest(shards, replication=1, placement_level=2, branching=8, ranks=(4, 2, 1)):
    return Manifest(bank="b", version="v1", dtype="float32", d_model=4, mem_layers=[0],
                    branching=branching, ranks=list(ranks),
                    checksums=[["0" * 16] * branching ** l for l in range(1, len(ranks) + 1)],
                    shards=shards, replication=replication, placement_level=placement_level)


@pytest.mark.parametrize("replication", [1, 2])
def test_shard_blocks_partition_the_bank(replication):
    m = manifest(["a", "b", "c"], replication=replication)
    per_shard = {s: set(shard_blocks(m, s)) for s in m.shards}
    every = set(m.blocks())
    assert set(shard_blocks(m, None)) == every
    for block in every:
        holders = [s for s in m.shards if block in per_shard[s]]
        want = 3 if block[0] < m.placement_level else replication
        assert len(holders) == want


@pytest.mark.parametrize("replication", [1, 2])
def test_adding_a_fourth_shard_moves_about_a_quarter_of_the_groups(replication):
    before = manifest(["s0", "s1", "s2"], replication=replication, branching=16, ranks=(2, 1, 1))
    after = before.model_copy(update={"shards": ["s0", "s1", "s2", "s3"]})
    moved = moves(before, after)
    assert all(gained == ["s3"] for _, _, _, gained in moved)       # only to the new shard
    deep = [(l, n) for l, n, _, _ in moved if l >= before.placement_level]
    groups = {n // 16 ** (l - 2) for l, n in deep}
    frac = len(groups) / 16 ** 2
    want = replication / 4
    assert abs(frac - want) < 0.08, (frac, want)                    # 256 groups: ~0.25 / ~0.5
    # a group moves whole: every block under a moved group moves, none under the others
    for level in (2, 3):
        for node in range(16 ** level):
            assert ((level, node) in {(l, n) for l, n, _, _ in moved}) == \
                (node // 16 ** (level - 2) in groups)
    # the shallow level is on every shard, so the new shard receives all of it
    assert {(l, n) for l, n, _, _ in moved if l == 1} == {(1, n) for n in range(16)}
    # and what each old shard keeps is unchanged or smaller
    for s in before.shards:
        assert set(shard_blocks(after, s)) <= set(shard_blocks(before, s))
