"""The router in the bank LMDB, for the Route RPC (server-side routing for clients that cannot).

Ingest stores the export's `router.safetensors` bytes, unchanged, beside the version's blocks:

    r/{bank}/{version}   -> router.safetensors bytes (membank/router.py format)

in the same write transaction as the version's manifest, so a complete version has its router
(exports without a router file simply have none, and Route answers NOT_FOUND for them):

    with env.begin(write=True) as txn:
        txn.put(manifest_key(bank, ver), manifest_json)
        write_router(txn, export_dir, bank, ver)          # the one line in ingest

`store_router(lmdb_path, export_dir, bank, version)` does the same for an already ingested
version. The server parses and routes with membank/router.py, the device's own router (numpy
only: the bank server never imports torch), so Route gives the device's path bit for bit.
"""
from __future__ import annotations

import threading
from pathlib import Path

from membank.artifacts import ROUTER as ROUTER_FILE
from membank.router import Router, RouterFormatError

__all__ = ["ROUTER_FILE", "Router", "RouterCache", "RouterFormatError", "router_key",
           "store_router", "write_router"]


def router_key(bank: str, version: str) -> bytes:
    return f"r/{bank}/{version}".encode()


# -- ingest side ------------------------------------------------------------------------------
def write_router(txn, export_dir: str | Path, bank: str, version: str) -> bool:
    """Put the export's router (if it has one) under `r/{bank}/{version}` in an open write txn.

    Returns whether a router was written. A malformed router file raises RouterFormatError, so
    ingest fails before the version becomes visible.
    """
    path = Path(export_dir) / ROUTER_FILE
    if not path.is_file():
        return False
    raw = path.read_bytes()
    try:
        Router.from_bytes(raw)
    except RouterFormatError as e:
        raise RouterFormatError(f"{path}: {e}") from None
    txn.put(router_key(bank, version), raw)
    return True


def store_router(lmdb_path: str | Path, export_dir: str | Path, bank: str, version: str, *,
                 map_size: int = 64 << 30) -> bool:
    """`write_router` for an LMDB on disk (an already ingested version); see module doc."""
    from services.bank_server.store import acquire_env, release_env
    env = acquire_env(lmdb_path, map_size, readonly=False)
    try:
        with env.begin(write=True) as txn:
            return write_router(txn, export_dir, bank, version)
    finally:
        release_env(env)


# -- server side ------------------------------------------------------------------------------
class RouterCache:
    """Parsed routers by (bank, version). Keys are immutable, so entries never go stale; only
    present routers are cached (a missing one may be stored later)."""

    def __init__(self, store, max_entries: int = 16):
        self.store = store      # anything with get(key) -> bytes | None
        self.max_entries = max_entries
        self._cache: dict[tuple[str, str], Router] = {}
        self._lock = threading.Lock()

    def get(self, bank: str, version: str) -> Router | None:
        """Blocking (reads the store): call from an executor thread."""
        with self._lock:
            hit = self._cache.get((bank, version))
        if hit is not None:
            return hit
        raw = self.store.get(router_key(bank, version))
        if raw is None:
            return None
        router = Router.from_bytes(raw)
        with self._lock:
            if len(self._cache) >= self.max_entries:
                self._cache.pop(next(iter(self._cache)))
            self._cache[(bank, version)] = router
        return router
