"""Placement: which shards keep a block. One pure function, shared by server and client.

Rendezvous (highest-random-weight) hashing with a stable hash (xxh3_64, never Python's
`hash()`, which is salted per process). A block is placed by its ancestor at
`placement_level`, so all the deep blocks of one prompt's path sit on the same shards and a
device fetches what it misses in one RPC per shard. Blocks above the placement level are few
and hot: every shard keeps them.
"""
from __future__ import annotations

import xxhash


def ancestor(node: int, level: int, to_level: int, branching: int) -> int:
    """Index of a node's ancestor at `to_level` (<= level)."""
    return node // branching ** (level - to_level)


def owners(bank: str, level: int, node: int, *, shards: list[str], replication: int,
           placement_level: int, branching: int) -> list[str]:
    """Shards that keep block (level, node), best first (the first is the primary)."""
    if not shards:
        raise ValueError("no shards")
    if level < placement_level:
        return list(shards)
    anc = ancestor(node, level, placement_level, branching)
    # xxhash >= 4 hashes bytes only (a str raises TypeError); UTF-8 is what older versions hashed
    scored = sorted(shards, reverse=True, key=lambda s: xxhash.xxh3_64_intdigest(
        f"{bank}/{placement_level}/{anc}@{s}".encode()))
    return scored[: max(1, min(replication, len(shards)))]
