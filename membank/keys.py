"""Storage keys. Block keys are immutable and versioned; `current` is the only mutable key.

    c/{bank}                          -> version string of the published version
    m/{bank}/{version}                -> manifest JSON of that version (its presence = complete)
    i/{bank}/{version}                -> JSON {"completed_at", "shard", "blocks", "bytes"}, written
                                         with the manifest (GC orders versions by it)
    b/{bank}/{version}/{level}/{node} -> block bytes (checksum: in the manifest)
    b/{bank}/{version}/{level}/{node}/{encoding}
                                      -> the same block in another encoding, e.g. `int8`
                                         (membank/quant.py; checksum: manifest.encodings)
    h/{bank}/{algo}-{digest}          -> block bytes stored by content (`block_store`
                                         "content", every ingest since issue 18): the key is
                                         the block's cryptographic digest in its encoding
                                         (manifest.digests), under its bank, so a version that
                                         leaves a block unchanged shares its one copy, and no
                                         other bank's block can stand in for it
    w/{bank}/{version}                -> JSON {"renewed_at", "host", "pid"}: an ingest (or a
                                         rebalance) is writing this version; gc deletes no
                                         content-addressed block of the bank while a lease is
                                         younger than its `lease_s` (the writer may be sharing
                                         any of them, unlisted until its manifest lands)
    x/shard                           -> the shard id this LMDB was ingested for (absent: all)
    t/{bank}/{version}                -> JSON {"manifest_checksum", "collected_at"}: a version gc
                                         deleted; its name is never ingested or published again
                                         (caches keyed by the name could not tell the contents
                                         apart)

Bank and version names match `NAME` (`valid_name`) before they reach a key.
A new version is written beside the old one and becomes visible by one write of `c/{bank}`.
The same block keys name blocks in the Redis hot tier, so a cached block can never be stale, and
a native block and its int8 encoding never share a cache entry (the encoding is in the key).
A version re-placed onto another shard set (services/bank_server/rebalance.py) keeps the block
keys of the version it was re-placed from (`Manifest.block_version`), so re-placing moves bytes
only where placement changed.
"""
from __future__ import annotations

import re

SHARD_KEY = b"x/shard"
# a bank or version name: what keys, caches, logs and the publish child's argv may carry. It
# starts with a letter or digit, so it can never be read as an option ("-h") or a hidden or
# parent path ("..."); checked with fullmatch: `re.match(...$)` lets a trailing newline through
NAME_MAX = 128
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,%d}" % (NAME_MAX - 1))


# what names a block by content (Manifest.content_id): its cryptographic digest, or for a
# manifest without digests (unsigned, written before issue 16) its xxh3 checksum
CONTENT_ID = re.compile(r"(?:blake3|sha256)-[0-9a-f]{64}|xxh3_64-[0-9a-f]{16}")


def valid_name(name: str) -> bool:
    """Whether `name` may name a bank or a version (NAME, matched whole)."""
    return isinstance(name, str) and NAME.fullmatch(name) is not None


def current_key(bank: str) -> bytes:
    return f"c/{bank}".encode()


def manifest_key(bank: str, version: str) -> bytes:
    return f"m/{bank}/{version}".encode()


def manifest_prefix(bank: str) -> bytes:
    """Prefix of every manifest key of a bank (a cursor over it lists the complete versions)."""
    return f"m/{bank}/".encode()


def version_info_key(bank: str, version: str) -> bytes:
    return f"i/{bank}/{version}".encode()


def tombstone_key(bank: str, version: str) -> bytes:
    return f"t/{bank}/{version}".encode()


def block_key(bank: str, version: str, level: int, node: int, encoding: str = "") -> bytes:
    """The key of a block; `encoding` "" is the native block, else e.g. "int8"."""
    base = f"b/{bank}/{version}/{level}/{node}"
    return (f"{base}/{encoding}" if encoding else base).encode()


def content_key(bank: str, content: str) -> bytes:
    """The key of a block stored by content: `content` is `Manifest.content_id` ("blake3-<hex>")."""
    return f"h/{bank}/{content}".encode()


def content_prefix(bank: str) -> bytes:
    """Prefix of every content-addressed block key of a bank."""
    return f"h/{bank}/".encode()


def lease_key(bank: str, version: str) -> bytes:
    return f"w/{bank}/{version}".encode()


def lease_prefix(bank: str) -> bytes:
    return f"w/{bank}/".encode()


def parse_block_key(key: bytes) -> tuple[str, str, int, int]:
    """(bank, version, level, node) of a block key, of any encoding; ValueError for anything
    else (GC treats every encoding of a block like the block itself)."""
    return parse_block_key_encoding(key)[:4]


def parse_block_key_encoding(key: bytes) -> tuple[str, str, int, int, str]:
    """(bank, version, level, node, encoding) of a block key ("" for a native block)."""
    parts = bytes(key).decode().split("/")
    if len(parts) not in (5, 6) or parts[0] != "b" or (len(parts) == 6 and not parts[5]):
        raise ValueError(f"not a block key: {bytes(key)[:80]!r}")
    return parts[1], parts[2], int(parts[3]), int(parts[4]), parts[5] if len(parts) == 6 else ""
