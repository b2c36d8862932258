"""DeviceCache: deepest level evicted first, LRU within a level, byte budget, disk tier that
survives a restart with every block re-verified, corrupt files dropped.

Run: .venv/bin/pytest -q tests/unit/test_device_cache.py
"""
import os

import pytest

from membank.blocks import checksum
from membank.manifest import Manifest
from services.model_client.device_cache import DeviceCache, file_name

# k=2, ranks (4, 2, 1), d 8, float32, 1 layer: block bytes per level 384, 192, 96
RANKS = [4, 2, 1]
SIZE = {1: 384, 2: 192, 3: 96}


def block(level, node, salt=0):
    return bytes([(level * 31 + node * 7 + salt) % 256]) * SIZE[level]


def manifest(version="v1", shares=None, salt=0):
    sums = [[checksum(block(lv, n, salt)) for n in range(2 ** lv)] for lv in (1, 2, 3)]
    return Manifest(bank="b", version=version, dtype="float32", d_model=8, mem_layers=[0],
                    branching=2, ranks=RANKS, checksums=sums, shares_blocks_of=shares)


M = manifest()


def put(cache, level, node, m=M):
    return cache.put(m, level, node, bytearray(block(level, node)), verified=True)


def test_budget_and_deepest_level_evicted_first():
    # room for 2 level-1 + 2 level-2 + 2 level-3 blocks = 1344 bytes
    cache = DeviceCache(budget_bytes=1344)
    for lv, n in [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]:
        assert put(cache, lv, n)
    assert cache.used_bytes == 1344
    # a new level-2 block: the two level-3 blocks go first (deepest), not a level-1 or level-2 one
    put(cache, 2, 2)
    assert cache.used_bytes <= cache.budget_bytes
    assert {k[2:4] for k in cache.keys()} == {(1, 0), (1, 1), (2, 0), (2, 1), (2, 2)}
    put(cache, 1, 0)             # already there: replaced in place, no eviction, no double count
    assert cache.used_bytes == 2 * 384 + 3 * 192
    st = cache.level_stats()
    assert st[3].evictions == 2 and st[3].bytes == 0 and st[2].blocks == 3
    assert sum(s.bytes for s in st.values()) == cache.used_bytes


def test_lru_within_a_level():
    cache = DeviceCache(budget_bytes=3 * 96)
    for n in range(3):
        put(cache, 3, n)
    assert cache.get(M, 3, 0) is not None           # 0 is now the most recently used
    put(cache, 3, 3)
    assert [k[3] for k in cache.keys()] == [2, 0, 3]   # 1 was the least recently used
    put(cache, 3, 4)
    assert [k[3] for k in cache.keys()] == [0, 3, 4]


def test_hits_misses_and_bytes_per_level():
    cache = DeviceCache(budget_bytes=10_000)
    assert cache.get(M, 1, 0) is None
    put(cache, 1, 0)
    assert bytes(cache.get(M, 1, 0)) == block(1, 0)
    assert cache.get(M, 2, 0) is None
    s = cache.stats()["levels"]
    assert (s[1]["hits"], s[1]["misses"], s[1]["bytes"], s[1]["hit_ratio"]) == (1, 1, 384, 0.5)
    assert (s[2]["hits"], s[2]["misses"], s[2]["bytes"]) == (0, 1, 0)


def test_block_larger_than_budget_is_not_cached_and_bad_block_refused():
    cache = DeviceCache(budget_bytes=200)
    assert not put(cache, 1, 0) and cache.used_bytes == 0
    with pytest.raises(ValueError):
        cache.put(M, 2, 0, bytearray(block(2, 1)))    # not verified by the caller: hashed, refused
    assert cache.put(M, 2, 0, bytearray(block(2, 0)))  # hashed and accepted


def test_keyed_by_block_version_and_checked_against_the_asking_manifest():
    cache = DeviceCache(budget_bytes=10_000)
    put(cache, 1, 1)
    replaced = manifest(version="v1-s4", shares="v1")           # re-placed: same blocks
    assert bytes(cache.get(replaced, 1, 1)) == block(1, 1)
    other = manifest(version="v2", salt=1)                      # new weights: other keys
    assert cache.get(other, 1, 1) is None
    # same block version but a manifest listing another checksum: never returned
    liar = manifest(version="v1", salt=9)
    assert cache.get(liar, 1, 1) is None


def test_disk_tier_survives_a_restart_and_is_reverified(tmp_path):
    cache = DeviceCache(budget_bytes=10_000, directory=tmp_path)
    for lv, n in [(1, 0), (2, 1), (3, 3)]:
        put(cache, lv, n)
    assert sorted(os.listdir(tmp_path)) == sorted(file_name(("b", "v1", lv, n))
                                                  for lv, n in [(1, 0), (2, 1), (3, 3)])
    again = DeviceCache(budget_bytes=10_000, directory=tmp_path)   # a new process
    assert again.used_bytes == 0 and len(again.keys("disk")) == 3
    assert bytes(again.get(M, 2, 1)) == block(2, 1)
    st = again.level_stats()[2]
    assert (st.disk_hits, st.hits, st.misses) == (1, 0, 0)
    assert again.get(M, 2, 1) is not None and again.level_stats()[2].hits == 1   # now in memory
    # a manifest with other checksums for the same key: the file fails verification, is dropped
    assert again.get(manifest(salt=5), 3, 3) is None
    assert not (tmp_path / file_name(("b", "v1", 3, 3))).exists()
    assert again.level_stats()[3].corrupt == 1


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(b"\x00" + p.read_bytes()[1:]),      # flipped byte: checksum
    lambda p: p.write_bytes(p.read_bytes()[:-1]),                # torn write: size
    lambda p: p.write_bytes(p.read_bytes() + b"x"),              # trailing garbage: size
])
def test_corrupt_file_is_dropped_never_returned(tmp_path, damage):
    put(DeviceCache(budget_bytes=10_000, directory=tmp_path), 1, 1)
    path = tmp_path / file_name(("b", "v1", 1, 1))
    damage(path)
    cache = DeviceCache(budget_bytes=10_000, directory=tmp_path)
    assert cache.get(M, 1, 1) is None
    assert not path.exists() and cache.level_stats()[1].corrupt == 1
    assert cache.level_stats()[1].misses == 1 and cache.used_bytes == 0


def test_disk_budget_evicts_deepest_first_and_ignores_foreign_files(tmp_path):
    (tmp_path / "notes.txt").write_text("not a block")
    cache = DeviceCache(budget_bytes=10_000, directory=tmp_path, disk_budget_bytes=384 + 192 + 96)
    put(cache, 3, 0)
    put(cache, 1, 0)
    put(cache, 2, 0)
    put(cache, 2, 1)           # over budget: the level-3 file goes first, then the oldest level 2
    on_disk = {k[2:4] for k in cache.keys("disk")}
    assert on_disk == {(1, 0), (2, 1)}
    assert sorted(os.listdir(tmp_path)) == sorted(["notes.txt", file_name(("b", "v1", 1, 0)),
                                                   file_name(("b", "v1", 2, 1))])
    assert cache.stats()["disk_used_bytes"] <= 384 + 192 + 96
