"""The simulated device of the load test: which blocks one prompt needs, and which it must fetch.

Pure Python (no locust, no gRPC), so it is unit-tested on its own (tests/deploy/).

- `ZipfLeaves`: leaves of the bank's tree (k^p of them) with a skewed popularity: the leaf of
  popularity rank i is chosen with probability proportional to 1 / i^s. Which leaf gets which
  rank is a seeded shuffle, so popular leaves are spread over the tree as real topics are.
- `DeviceCache`: the device's block cache, LRU over (level, node) with a capacity in blocks.
  A prompt's path needs one block per level (levels with r_l = 0 have none); the device fetches
  only the blocks it does not hold, in ONE FetchBlocks call, then caches them.
- `parse_targets`: shard id -> address from a `--host` list.
"""
from __future__ import annotations

import bisect
import random
from collections import OrderedDict
from itertools import accumulate


class ZipfLeaves:
    def __init__(self, branching: int, depth: int, s: float = 1.1, seed: int = 0):
        if branching < 2 or depth < 1:
            raise ValueError(f"need branching >= 2 and depth >= 1, got {branching}, {depth}")
        self.branching, self.depth, self.s = branching, depth, s
        self.n_leaves = branching ** depth
        order = list(range(self.n_leaves))
        random.Random(seed).shuffle(order)
        self.leaf_by_rank = order                       # rank 0 is the most popular leaf
        self._cum = list(accumulate(1.0 / (rank + 1) ** s for rank in range(self.n_leaves)))

    def probability(self, leaf: int) -> float:
        rank = self.leaf_by_rank.index(leaf)
        return (1.0 / (rank + 1) ** self.s) / self._cum[-1]

    def sample_leaf(self, rng: random.Random) -> int:
        rank = bisect.bisect_left(self._cum, rng.random() * self._cum[-1])
        return self.leaf_by_rank[min(rank, self.n_leaves - 1)]

    def path(self, leaf: int) -> list[int]:
        """The child choices (c_1..c_p) from the root to `leaf` (leaf = sum c_l k^(p-l))."""
        digits = []
        for _ in range(self.depth):
            leaf, c = divmod(leaf, self.branching)
            digits.append(c)
        return digits[::-1]

    def sample_path(self, rng: random.Random) -> list[int]:
        return self.path(self.sample_leaf(rng))


class DeviceCache:
    """LRU cache of block ids; `capacity` blocks (>= the path length, or nothing would fit)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be >= 1 block")
        self.capacity = capacity
        self._blocks: OrderedDict[tuple[int, int], int] = OrderedDict()   # id -> nbytes
        self.hits = self.misses = 0

    def missing(self, blocks: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """The blocks of a path not held; the held ones count as hits and become most recent."""
        out = []
        for b in blocks:
            if b in self._blocks:
                self._blocks.move_to_end(b)
                self.hits += 1
            else:
                out.append(b)
                self.misses += 1
        return out

    def put(self, block: tuple[int, int], nbytes: int) -> None:
        self._blocks[block] = nbytes
        self._blocks.move_to_end(block)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        """A new bank version: every held block is of the old one."""
        self._blocks.clear()

    def __contains__(self, block) -> bool:
        return block in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def nbytes(self) -> int:
        return sum(self._blocks.values())

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def parse_targets(spec: str, shard_ids: list[str] | None = None) -> dict[str, str]:
    """Shard id -> address from a locust `--host`: "shard-0=h:p,shard-1=h:p" (names given), or
    "h:p,h:p" (plain addresses, taken in the order of the manifest's `shard_ids`; one plain
    address with no shard ids is a single-shard bank)."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    if not entries:
        raise ValueError("no bank address given (--host host:port[,host:port...])")
    named = [e for e in entries if "=" in e]
    if named:
        if len(named) != len(entries):
            raise ValueError(f"mix of named and plain addresses in {spec!r}: name all or none")
        return dict(e.split("=", 1) for e in entries)
    if shard_ids is None:
        if len(entries) != 1:
            raise ValueError("several plain addresses need the manifest's shard ids")
        return {"shard-0": entries[0]}
    if len(entries) != len(shard_ids):
        raise ValueError(f"{len(entries)} addresses for the manifest's {len(shard_ids)} shards "
                         f"{shard_ids}; give one per shard, or name them (shard-0=host:port)")
    return dict(zip(shard_ids, entries))
