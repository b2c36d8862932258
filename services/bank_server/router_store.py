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
exactly like `Router.route` (greedy descent, nearest child by exact float64 squared L2 summed in
a fixed order, first on ties; a matmul pre-selects the candidates, as there): the same path
bit for bit, tested in tests/unit/test_router.py.
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
_CHUNK_ELEMENTS = 1 << 24               # bounds the exact path's (rows, k, dim) float64 slab
_DENSE_COLUMNS = 64                     # levels this narrow: one matmul (membank/router.py)


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
        return self.route_batch(x[None])[0].tolist()

    def route_batch(self, emb) -> np.ndarray:
        """(n, dim) finite embeddings -> (n, depth) int64 paths, as `membank.router.Router.route`."""
        x = np.ascontiguousarray(emb, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"route_batch expects (n, {self.dim}) embeddings, got {x.shape}")
        norms = np.linalg.norm(x, axis=1)
        node = np.zeros(len(x), dtype=np.int64)
        out = np.empty((len(x), self.depth), dtype=np.int64)
        for level in range(self.depth):
            out[:, level] = nearest_child(x, self.centroids[level], node, norms)
            node = node * self.branching + out[:, level]
        return out


# -- routing: membank/router.py's rule in numpy (see nearest_child there for the why) ---------
def nearest_child(x: np.ndarray, level_centroids: np.ndarray, node: np.ndarray,
                  x_norms: np.ndarray) -> np.ndarray:
    """(n,) nearest child of each row's node: argmin of `exact_sq_dist`, first on ties.

    A matmul per parent node scores rows; children beyond `_margin` of the best cannot win; only
    rows with several children inside it get exact distances."""
    n, (k, dim) = x.shape[0], level_centroids.shape[1:]
    if n == 0:
        return np.empty(0, dtype=np.int64)
    sq_norms = np.square(level_centroids).sum(-1)                    # (nodes, k)
    scores = _scores(x, level_centroids, sq_norms, node)             # (n, k) float32
    out = scores.argmin(axis=1)                                      # first minimum
    best = scores[np.arange(n), out]
    with np.errstate(over="ignore", invalid="ignore"):
        bound = best + _margin(x_norms, float(np.sqrt(sq_norms.max())), dim)
        near = scores <= bound[:, None]                              # (n, k) may win exactly
    near |= ~np.isfinite(bound)[:, None]                             # overflow: all candidates
    unsure = np.flatnonzero(near.sum(axis=1) > 1)
    chunk = max(1, _CHUNK_ELEMENTS // (k * dim))
    for start in range(0, len(unsure), chunk):
        rows = unsure[start:start + chunk]
        pair_row, cand = np.nonzero(near[rows])                      # row-major: by row, then child
        dist = exact_sq_dist(x[rows[pair_row]], level_centroids[node[rows[pair_row]], cand])
        row_min = np.full(len(rows), np.inf)
        np.minimum.at(row_min, pair_row, dist)
        winner = dist == row_min[pair_row]
        first = np.full(len(rows), k, dtype=np.int64)
        np.minimum.at(first, pair_row[winner], cand[winner])        # lowest index on ties
        out[rows] = first
    return out.astype(np.int64)


def exact_sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m, dim), (m, dim) float32 -> (m,) float64: float64 squares summed strictly left to right
    (cumsum is sequential; np.sum is pairwise and would differ from torch in the last bits)."""
    diff = b.astype(np.float64) - a.astype(np.float64)
    return np.cumsum(diff * diff, axis=-1)[..., -1]


def _scores(x, level_centroids, sq_norms, node) -> np.ndarray:
    """(n, k) float32 ||c||^2 - 2 x.c per row's candidate children, one matmul per parent."""
    n, (nodes, k, dim) = x.shape[0], level_centroids.shape
    if nodes == 1 or nodes * k <= _DENSE_COLUMNS:     # one matmul against the whole level
        full = sq_norms.reshape(-1) - 2 * (x @ level_centroids.reshape(nodes * k, dim).T)
        return full if nodes == 1 else full.reshape(n, nodes, k)[np.arange(n), node]
    order = np.argsort(node, kind="stable")
    parents, starts = np.unique(node[order], return_index=True)
    ends = np.append(starts[1:], n)
    xs = x[order]
    grouped = np.empty((n, k), dtype=np.float32)
    for parent, a, b in zip(parents.tolist(), starts.tolist(), ends.tolist()):
        grouped[a:b] = sq_norms[parent] - 2 * (xs[a:b] @ level_centroids[parent].T)
    scores = np.empty_like(grouped)
    scores[order] = grouped
    return scores


def _margin(x_norms: np.ndarray, max_c_norm: float, dim: int) -> np.ndarray:
    """How far above the best score a child may score and still win exactly (proof in
    membank/router.py `_margin`)."""
    return 4.0 * (dim + 2) * 2.0 ** -24 * (x_norms.astype(np.float32) + np.float32(max_c_norm)) ** 2


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
