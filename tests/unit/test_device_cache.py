"""DeviceCache: deepest level evicted first, LRU within a level, byte budget, disk tier that
survives a restart with every block re-verified, corrupt files dropped, blocks keyed by content
(a new version that leaves a block unchanged hits it).

Run: .venv/bin/pytest -q tests/unit/test_device_cache.py
"""
import os

import pytest

from membank.blocks import checksum
from membank.manifest import Manifest
from services.model_client.device_cache import DeviceCache, block_key, file_name

# k=2, ranks (4, 2, 1), d 8, float32, 1 layer: block bytes per level 384, 192, 96
RANKS = [4, 2, 1]
SIZE = {1: 384, 2: 192, 3: 96}


def block(level, node, salt=0):
    return bytes([(level * 31 + node * 7 + salt) % 256]) * SIZE[level]


def manifest(version="v1", shares=None, salt=0, changed=()):
    """Blocks salted by `salt`, and those in `changed` [(level, node)] salted once more."""
    sums = [[checksum(block(lv, n, salt + ((lv, n) in changed))) for n in range(2 ** lv)]
            for lv in (1, 2, 3)]
    return Manifest(bank="b", version=version, dtype="float32", d_model=8, mem_layers=[0],
                    branching=2, ranks=RANKS, checksums=sums, shares_blocks_of=shares)


M = manifest()


def put(cache, level, node, m=M):
    return cache.put(m, level, node, bytearray(block(level, node)), verified=True)


def key(level, node, m=M):
    return block_key(m, level, node)


def test_budget_and_deepest_level_evicted_first():
    # room for 2 level-1 + 2 level-2 + 2 level-3 blocks = 1344 bytes
    cache = DeviceCache(budget_bytes=1344)
    for lv, n in [(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)]:
        assert put(cache, lv, n)
    assert cache.used_bytes == 1344
    # a new level-2 block: the two level-3 blocks go first (deepest), not a level-1 or level-2 one
    put(cache, 2, 2)
    assert cache.used_bytes <= cache.budget_bytes
    assert set(cache.keys()) == {key(1, 0), key(1, 1), key(2, 0), key(2, 1), key(2, 2)}
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
    assert cache.keys() == [key(3, 2), key(3, 0), key(3, 3)]   # 1 was the least recently used
    put(cache, 3, 4)
    assert cache.keys() == [key(3, 0), key(3, 3), key(3, 4)]


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


def test_keyed_by_content_and_checked_against_the_asking_manifest():
    cache = DeviceCache(budget_bytes=10_000)
    for lv, n in [(1, 1), (2, 2), (3, 5)]:
        put(cache, lv, n)
    replaced = manifest(version="v1-s4", shares="v1")           # re-placed: same blocks
    assert bytes(cache.get(replaced, 1, 1)) == block(1, 1)
    # a new version that changed one block of the path: the others are hits under it
    v2 = manifest(version="v2", changed={(3, 5)})
    assert bytes(cache.get(v2, 1, 1)) == block(1, 1) and bytes(cache.get(v2, 2, 2)) == block(2, 2)
    assert cache.get(v2, 3, 5) is None
    other = manifest(version="v3", salt=1)                      # new weights everywhere
    assert all(cache.get(other, lv, n) is None for lv, n in [(1, 1), (2, 2), (3, 5)])
    # the same version name listing another checksum: never returned
    liar = manifest(version="v1", salt=9)
    assert cache.get(liar, 1, 1) is None
    # another bank listing the same hash: its own key, never this bank's block
    other_bank = M.model_copy(update={"bank": "c"})
    assert cache.get(other_bank, 1, 1) is None


def test_disk_tier_survives_a_restart_and_is_reverified(tmp_path):
    cache = DeviceCache(budget_bytes=10_000, directory=tmp_path)
    for lv, n in [(1, 0), (2, 1), (3, 3)]:
        put(cache, lv, n)
    assert sorted(os.listdir(tmp_path)) == sorted(file_name(key(lv, n))
                                                  for lv, n in [(1, 0), (2, 1), (3, 3)])
    again = DeviceCache(budget_bytes=10_000, directory=tmp_path)   # a new process
    assert again.used_bytes == 0 and len(again.keys("disk")) == 3
    assert bytes(again.get(M, 2, 1)) == block(2, 1)
    st = again.level_stats()[2]
    assert (st.disk_hits, st.hits, st.misses) == (1, 0, 0)
    assert again.get(M, 2, 1) is not None and again.level_stats()[2].hits == 1   # now in memory
    # a file whose bytes are not what its name says (another block's): fails verification,
    # is dropped, never returned
    (tmp_path / file_name(key(3, 3))).write_bytes(block(3, 2))
    assert again.get(M, 3, 3) is None
    assert not (tmp_path / file_name(key(3, 3))).exists()
    assert again.level_stats()[3].corrupt == 1


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(b"\x00" + p.read_bytes()[1:]),      # flipped byte: checksum
    lambda p: p.write_bytes(p.read_bytes()[:-1]),                # torn write: size
    lambda p: p.write_bytes(p.read_bytes() + b"x"),              # trailing garbage: size
])
def test_corrupt_file_is_dropped_never_returned(tmp_path, damage):
    put(DeviceCache(budget_bytes=10_000, directory=tmp_path), 1, 1)
    path = tmp_path / file_name(key(1, 1))
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
    assert set(cache.keys("disk")) == {key(1, 0), key(2, 1)}
    assert sorted(os.listdir(tmp_path)) == sorted(["notes.txt", file_name(key(1, 0)),
                                                   file_name(key(2, 1))])
    assert cache.stats()["disk_used_bytes"] <= 384 + 192 + 96


def test_files_of_the_layout_keyed_by_version_are_deleted_others_kept(tmp_path):
    (tmp_path / "b@v1@1@0.blk").write_bytes(block(1, 0))          # before content addressing
    (tmp_path / "b@v1@2@3@int8.blk").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a block")
    (tmp_path / "b@1@nothex.block").write_text("not ours either")
    cache = DeviceCache(budget_bytes=10_000, directory=tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["b@1@nothex.block", "notes.txt"]
    assert cache.keys("disk") == []
