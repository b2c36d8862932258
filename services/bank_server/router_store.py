"""The router in the bank LMDB, for the Route RPC (server-side routing for clients that cannot).

Ingest stores the export's `router.safetensors` bytes, unchanged, beside the version's blocks:

    r/{bank}/{version}   -> router.safetensors bytes (membank/router.py format)

in the same write transaction as the version's manifest, so a complete version has its router
(exports without a router file simply have none, and Route answers NOT_FOUND for them):

    with env.begin(write=True) as txn:
        txn.put(manifest_key(bank, ver), manifest_json)
        write_router(txn, export_dir, bank, ver)          # the one line in ingest

`store_router(lmdb_path, export_dir, bank, version)` does the same for an already ingested
version. The server side (`NumpyRouter`) parses the bytes with numpy only, so the bank server
never imports torch; it checks the same things as `membank.router.Router.load` and routes
exactly like `Router.route` (greedy descent, nearest child by squared L2, first on ties).
"""
from __future__ import annotations

import json
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROUTER_FILE = "router.safetensors"      # membank.artifacts.ROUTER
ROUTER_FORMAT = "membank.router/1"      # membank.router.FORMAT
_MAX_HEADER = 1 << 20                   # a router header is a few hundred bytes


def router_key(bank: str, version: str) -> bytes:
    return f"r/{bank}/{version}".encode()


class RouterFormatError(ValueError):
    """Stored or exported router bytes are not a valid membank router."""


@dataclass(frozen=True)
class NumpyRouter:
    branching: int
    depth: int
    dim: int
    centroids: tuple[np.ndarray, ...]   # level l at index l-1: (k^(l-1), k, dim) float32

    @classmethod
    def from_bytes(cls, raw: bytes) -> "NumpyRouter":
        """Parse and validate safetensors bytes; RouterFormatError (one line) if malformed."""
        try:
            meta, tensors = _parse_safetensors(raw)
        except RouterFormatError:
            raise
        except Exception as e:   # truncated or foreign bytes
            raise RouterFormatError(f"not a safetensors file: {type(e).__name__}: {e}") from None
        if meta.get("format") != ROUTER_FORMAT:
            raise RouterFormatError(f"format is {meta.get('format')!r}, expected {ROUTER_FORMAT!r}")
        try:
            k, depth, dim = int(meta["k"]), int(meta["depth"]), int(meta["dim"])
        except (KeyError, ValueError):
            raise RouterFormatError("metadata k, depth, dim missing or not integers") from None
        if k < 2 or depth < 1 or dim < 1:
            raise RouterFormatError(f"need k >= 2, depth >= 1, dim >= 1; got {k}, {depth}, {dim}")
        if set(tensors) != {f"centroids.{l}" for l in range(1, depth + 1)}:
            raise RouterFormatError(f"tensors {sorted(tensors)[:8]} do not match depth {depth}")
        levels = []
        for level in range(1, depth + 1):
            c = tensors[f"centroids.{level}"]
            want = (k ** (level - 1), k, dim)
            if c.dtype != np.float32 or c.shape != want:
                raise RouterFormatError(f"level {level} centroids are {c.dtype} {c.shape}, "
                                        f"expected float32 {want}")
            if not np.isfinite(c).all():
                raise RouterFormatError(f"level {level} centroids contain NaN or inf")
            levels.append(c)
        return cls(k, depth, dim, tuple(levels))

    def route(self, embedding) -> list[int]:
        """One (dim,) embedding -> its path of child indices (c_1 .. c_depth)."""
        x = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if x.shape != (self.dim,):
            raise ValueError(f"embedding has {x.size} values, the router expects {self.dim}")
        path, node = [], 0
        for level in range(self.depth):
            dist = np.square(self.centroids[level][node] - x).sum(axis=-1)   # (k,)
            child = int(np.argmin(dist))                                     # first on ties
            path.append(child)
            node = node * self.branching + child
        return path


def _parse_safetensors(raw: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, tensors) of safetensors bytes; only float32 tensors are materialised."""
    if len(raw) < 8:
        raise RouterFormatError("shorter than a safetensors header")
    (n,) = struct.unpack_from("<Q", raw, 0)
    if n > _MAX_HEADER or 8 + n > len(raw):
        raise RouterFormatError(f"header of {n} bytes does not fit the file")
    header = json.loads(bytes(raw[8:8 + n]))
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(raw)[8 + n:]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        if info["dtype"] != "F32":
            tensors[name] = np.empty(0, dtype=np.float64)   # wrong dtype: refused by the caller
            continue
        if not 0 <= start <= end <= len(body) or end - start != 4 * int(np.prod(shape)):
            raise RouterFormatError(f"tensor {name} has bad data offsets")
        tensors[name] = np.frombuffer(body[start:end], dtype="<f4").reshape(shape).copy()
    return meta, tensors


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
        NumpyRouter.from_bytes(raw)
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
        self._cache: dict[tuple[str, str], NumpyRouter] = {}
        self._lock = threading.Lock()

    def get(self, bank: str, version: str) -> NumpyRouter | None:
        """Blocking (reads the store): call from an executor thread."""
        with self._lock:
            hit = self._cache.get((bank, version))
        if hit is not None:
            return hit
        raw = self.store.get(router_key(bank, version))
        if raw is None:
            return None
        router = NumpyRouter.from_bytes(raw)
        with self._lock:
            if len(self._cache) >= self.max_entries:
                self._cache.pop(next(iter(self._cache)))
            self._cache[(bank, version)] = router
        return router
