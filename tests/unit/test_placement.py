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
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout
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
