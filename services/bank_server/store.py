"""The bank server's storage: an LMDB environment holding blocks, manifests and `current`.

Keys come from `membank.keys` only (see there for the layout). Block and manifest keys are
immutable once written, so parsed manifests are cached forever by (bank, version); the
`current` pointer is the one mutable key and is read afresh on every request, so a publish by
`ingest` is visible to the next request without a restart.

    store = LMDBStore("data/bank.lmdb", map_size=64 << 30)
    version = store.current_version("demo")
    manifest = store.manifest("demo", version)
    block = store.get(block_key("demo", version, 1, 0))

No protobuf here: the servicer converts at the edge.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import lmdb

from membank.keys import current_key, manifest_key
from membank.manifest import Manifest


class BlockStore(Protocol):
    """Anything that maps a block key to its bytes (LMDB, or Redis in front of LMDB)."""

    def get(self, key: bytes) -> bytes | None: ...


def open_env(path: str | Path, map_size: int, *, readonly: bool) -> lmdb.Environment:
    """Open an LMDB environment. One per process and path: LMDB forbids opening twice."""
    if not readonly:
        Path(path).mkdir(parents=True, exist_ok=True)
    return lmdb.open(
        str(path),
        map_size=map_size,
        readonly=readonly,
        # readers never take the write lock; the lock file only tracks reader slots, so a
        # writer (ingest) and any number of servers can share the same directory
        lock=True,
        readahead=False,   # blocks are read whole at random; OS readahead only wastes cache
        max_readers=512,
        max_dbs=0,
        subdir=True,
    )


class LMDBStore:
    """Read access to a bank LMDB (readonly=False only for tools that also write)."""

    def __init__(self, path: str | Path, map_size: int = 64 << 30, *, readonly: bool = True):
        self.path = Path(path)
        if readonly and not (self.path / "data.mdb").exists():
            raise FileNotFoundError(f"no LMDB database at {self.path} (run ingest first)")
        self.env = open_env(self.path, map_size, readonly=readonly)
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self._lock = threading.Lock()

    def get(self, key: bytes) -> bytes | None:
        # buffers=True hands back a view into the memory map; it is only valid inside the
        # transaction, so copy it out once before the transaction ends
        with self.env.begin(buffers=True) as txn:
            buf = txn.get(key)
            return None if buf is None else bytes(buf)

    def current_version(self, bank: str) -> str | None:
        """The published version of a bank, or None for an unknown bank."""
        raw = self.get(current_key(bank))
        return None if raw is None else raw.decode()

    def manifest(self, bank: str, version: str) -> Manifest | None:
        """The manifest of (bank, version), or None when that version was never completed."""
        cached = self._manifests.get((bank, version))
        if cached is not None:
            return cached
        raw = self.get(manifest_key(bank, version))
        if raw is None:
            return None  # not cached: the version may still be written later
        manifest = Manifest.from_json(raw)
        with self._lock:
            self._manifests[(bank, version)] = manifest
        return manifest

    def close(self) -> None:
        self.env.close()

    def __enter__(self) -> "LMDBStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
