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


def shard_blocks(manifest, shard: str | None):
    """(level, node) of every block of `manifest` that `shard` keeps (None: every block).

    `manifest` is a membank.manifest.Manifest (duck-typed here: manifest.py imports this module).
    """
    for level, node in manifest.blocks():
        if shard is None or shard in manifest.owners(level, node):
            yield level, node


def moves(before, after) -> list[tuple[int, int, list[str], list[str]]]:
    """Blocks whose owner set changes from manifest `before` to `after` (same blocks, other
    shards / replication): (level, node, owners before, shards that must receive it).

    With rendezvous hashing, adding a shard only ever adds that shard to an owner set, so the
    receivers are new shards only, and about replication / n_shards of the groups move.
    """
    out = []
    for level, node in before.blocks():
        old, new = before.owners(level, node), after.owners(level, node)
        gained = [s for s in new if s not in old]
        if gained:
            out.append((level, node, old, gained))
    return out
