"""The frozen retriever shipped to devices: a hierarchical k-means tree over text embeddings.

PAPER.md section 2. A tree of branching k and depth p; every node below the root has a centroid.
Level l (1-based) holds the k child centroids of each of the k^(l-1) nodes at level l-1:

    centroids[l - 1]: (k^(l-1), k, dim) float32     level 0 is the root, a single node

A path (i_1, ..., i_p) of child indices fixes one node per level; its global index at level l
is node_l = node_{l-1} * k + i_l (node_0 = 0), the row of that level's bank tensor
(membank/artifacts.py). Training data is always routed by the tree. A query is routed by one
of two rules (`Router.routing`):

  centroid          greedy descent, the paper's rule: at every level the nearest (L2) of the
                    current node's k children; ties go to the lowest child index.
  nearest-document  the path of the nearest training document: the router then carries an
                    index of every training document's embedding (float16) and tree path,
                    2 * dim bytes per document on the device (why this rule exists:
                    ARCHITECTURE.md, "Routing").

"Nearest" is exact in both rules: float64 squared L2 summed in a fixed order (`exact_sq_dist`),
so a row's path never depends on the batch it is routed in. Batches stay fast: a matmul scores
every row, and only near-ties within a proven rounding bound get exact distances
(`nearest_child`). This module is numpy only: training, the device and the bank server (Route
RPC) all route with it.

The file is safetensors: tensors "centroids.1" .. "centroids.p", with an index also
"index.vectors" (N, dim) float16 and "index.paths" (N, p) int32, plus string metadata (format,
k, depth, dim, embedder, routing). It is built offline by training/cluster.py.

    router = Router.load("export/router.safetensors")
    paths = router.route(Embedder().encode([prompt]))   # (1, depth) int64
    nodes = router.node_ids(paths)                      # (1, depth) int64

Run `python -m membank.router export/router.safetensors` to print a router's shape.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

FORMAT = "membank.router/1"
Routing = Literal["centroid", "nearest-document"]
ROUTINGS: tuple[Routing, ...] = ("centroid", "nearest-document")

# The exact path gathers up to a (rows, k, dim) slab of centroids for the near-tie rows; they
# are processed in chunks so that slab stays around 128 MB (float64) however many need it.
_CHUNK_ELEMENTS = 1 << 24
# exact distances of this many pairs are summed together, one vector add per dimension
_EXACT_SLAB = 512
# Levels with at most this many centroids in all are scored by one dense matmul; wider levels
# by one matmul per parent node (64 columns cost about one read of x: measured on 2 cores).
_DENSE_COLUMNS = 64
# up to this many children, the first minimum is found by k vector passes over (n,) rows, 2x
# faster than argmin across rows; a document index (k = its size) takes argmin
_FIRST_MIN_PASSES = 64
# queries scored against the document index at once: bounds the (rows, N) score matrix
_INDEX_ROWS = 256
_MAX_HEADER = 1 << 20                   # a router header is a few hundred bytes
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I32": np.dtype("<i4"),
           "I64": np.dtype("<i8")}


class RouterFormatError(ValueError):
    """Router bytes (a file, or a router stored in the bank) that are not a valid router."""


@dataclass(eq=False)
class DocIndex:
    """The training documents a nearest-document router routes to."""

    vectors: np.ndarray   # (N, dim) float32 values of the stored float16 embeddings
    paths: np.ndarray     # (N, depth) int64: each document's path in the tree

    def __post_init__(self) -> None:
        self.vectors = np.ascontiguousarray(_numpy(self.vectors), dtype=np.float32)
        self.paths = np.ascontiguousarray(_numpy(self.paths), dtype=np.int64)
        # (1, N) float32 ||v||^2, once: every query's scores need them (a pass over the index)
        self.sq_norms = np.square(self.vectors).sum(-1)[None]


@dataclass(eq=False)  # arrays inside: compare routers field by field, not with ==
class Router:
    branching: int                  # k
    depth: int                      # p
    dim: int                        # embedding width (384 for MiniLM)
    centroids: list[np.ndarray]     # level l at index l-1: (k^(l-1), k, dim) float32
    embedder: str = "all-MiniLM-L6-v2"
    index: DocIndex | None = None   # present: queries take the nearest document's path

    def __post_init__(self) -> None:
        self.centroids = [np.ascontiguousarray(_numpy(c), dtype=np.float32) for c in self.centroids]
        _check(self.branching, self.depth, self.dim, self.centroids)
        if self.index is not None:
            _check_index(self.index, self.branching, self.depth, self.dim)

    @property
    def routing(self) -> Routing:
        return "centroid" if self.index is None else "nearest-document"

    def n_nodes(self, level: int) -> int:
        """Nodes at `level` (0 = root): k^level."""
        return self.branching ** level

    def with_index(self, vectors, paths) -> "Router":
        """This tree with a nearest-document index: vectors (N, dim) are rounded to float16, as
        the file stores them; paths (N, depth) are the documents' routes through the tree."""
        v = np.asarray(_numpy(vectors), dtype=np.float16).astype(np.float32)
        return Router(self.branching, self.depth, self.dim, self.centroids, self.embedder,
                      DocIndex(v, paths))

    # -- routing ---------------------------------------------------------------------------

    def route(self, emb, routing: Routing | None = None, avoid_level1=None) -> np.ndarray:
        """(N, dim) or (dim,) embeddings -> (N, depth) int64 child indices.

        routing: the rule (default: this router's own); "nearest-document" needs the index.
        avoid_level1: (N,) level-1 child each row may not enter (the "blocked" evaluation):
        descent takes the next-best level-1 child; the nearest-document rule the nearest
        document outside that subtree."""
        x, norms = self._rows(emb)
        routing = routing or self.routing
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        avoid = (None if avoid_level1 is None
                 else np.asarray(_numpy(avoid_level1), dtype=np.int64).reshape(-1))
        if avoid is not None and avoid.shape != (len(x),):
            raise ValueError(f"avoid_level1 needs one entry per row ({len(x)}), got {avoid.shape}")
        if routing == "centroid":
            return self._descend(x, norms, avoid)
        if self.index is None:
            raise ValueError("this router has no document index: "
                             "nearest-document routing is unavailable")
        return self.index.paths[self._nearest(x, norms, avoid)]

    def path(self, embedding) -> list[int]:
        """One (dim,) embedding -> its path as a list (the Route RPC's answer)."""
        return self.route(embedding)[0].tolist()

    def nearest_documents(self, emb, avoid_level1=None) -> np.ndarray:
        """(N,) row of the index nearest to each embedding (exact L2, first on ties), optionally
        outside the level-1 subtree avoid_level1[i]."""
        if self.index is None:
            raise ValueError("this router has no document index")
        x, norms = self._rows(emb)
        return self._nearest(x, norms, avoid_level1)

    def _nearest(self, x: np.ndarray, norms: np.ndarray, avoid_level1) -> np.ndarray:
        vectors, first = self.index.vectors, self.index.paths[:, 0]
        out = np.empty(len(x), dtype=np.int64)
        for s in range(0, len(x), _INDEX_ROWS):
            rows = slice(s, s + _INDEX_ROWS)
            banned = (None if avoid_level1 is None
                      else first[None, :] == np.asarray(avoid_level1)[rows, None])
            out[rows] = nearest_child(x[rows], vectors[None],
                                      np.zeros(len(x[rows]), dtype=np.int64), norms[rows], banned,
                                      sq_norms=self.index.sq_norms)
        return out

    def _descend(self, x: np.ndarray, norms: np.ndarray, avoid: np.ndarray | None) -> np.ndarray:
        node = np.zeros(len(x), dtype=np.int64)   # (N,) global node index, root = 0
        out = np.empty((len(x), self.depth), dtype=np.int64)
        products = self._dense_products(x)
        for level in range(self.depth):
            banned = None
            if level == 0 and avoid is not None:
                banned = np.arange(self.branching)[None, :] == avoid[:, None]
            out[:, level] = nearest_child(x, self.centroids[level], node, norms, banned,
                                          products.get(level))
            node = node * self.branching + out[:, level]
        return out

    def _dense_products(self, x: np.ndarray) -> dict[int, np.ndarray]:
        """level -> (nodes * k, N) x.c against every centroid of the level, transposed, for the
        root level and the levels narrow enough to score densely, all from one matmul: the read
        of x, not the arithmetic, is the cost, so the shallow levels share one pass over it."""
        levels = [l for l, c in enumerate(self.centroids)
                  if l == 0 or c.shape[0] * self.branching <= _DENSE_COLUMNS]
        if len(x) == 0:
            return {}
        prod = x @ np.concatenate([self.centroids[l].reshape(-1, self.dim) for l in levels]).T
        # (columns, N): every later pass reads one contiguous (N,) row per candidate
        prod = np.ascontiguousarray(prod.T)
        out, row = {}, 0
        for l in levels:
            width = self.centroids[l].shape[0] * self.branching
            out[l], row = prod[row:row + width], row + width
        return out

    def _rows(self, emb) -> tuple[np.ndarray, np.ndarray]:
        """(N, dim) float32 rows, checked, and their (N,) L2 norms."""
        x = np.asarray(_numpy(emb), dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"route expects (N, {self.dim}) or ({self.dim},) embeddings, "
                             f"got {x.shape}")
        x = np.ascontiguousarray(x)
        sq = np.vecdot(x, x)                     # one pass; np.linalg.norm makes a copy of x
        # a NaN or inf shows in its row's norm; only then is x itself checked (a huge finite
        # row whose norm overflows is routed: its inf margin sends it down the exact path)
        if not np.isfinite(sq).all() and not np.isfinite(x).all():
            raise ValueError("route: embeddings contain NaN or inf")
        return x, np.sqrt(sq)

    def node_ids(self, paths) -> np.ndarray:
        """(N, depth) child indices -> (N, depth) global node index per level."""
        p = np.asarray(_numpy(paths), dtype=np.int64)
        if p.ndim == 1:
            p = p[None]
        if p.ndim != 2 or p.shape[1] != self.depth:
            raise ValueError(f"node_ids expects (N, {self.depth}) paths, got {p.shape}")
        if p.size and (p.min() < 0 or p.max() >= self.branching):
            raise ValueError(f"path entries must lie in 0..{self.branching - 1}")
        nodes = np.empty_like(p)
        node = np.zeros(p.shape[0], dtype=np.int64)
        for level in range(self.depth):
            node = node * self.branching + p[:, level]
            nodes[:, level] = node
        return nodes

    # -- files -----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        tensors = {f"centroids.{l + 1}": c for l, c in enumerate(self.centroids)}
        if self.index is not None:
            tensors["index.vectors"] = self.index.vectors.astype(np.float16)
            tensors["index.paths"] = self.index.paths.astype(np.int32)
        metadata = {"format": FORMAT, "k": str(self.branching), "depth": str(self.depth),
                    "dim": str(self.dim), "embedder": self.embedder, "routing": self.routing}
        return _write_safetensors(tensors, metadata)

    def save(self, path: str | Path) -> None:
        """Write safetensors atomically (temporary name, then rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "Router":
        """Read and validate a router file; ValueError (one line) if it is malformed."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no router file at {path}")
        try:
            return cls.from_bytes(path.read_bytes())
        except RouterFormatError as e:
            raise RouterFormatError(f"malformed router file {path}: {e}") from None

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Router":
        """Parse and validate safetensors bytes; RouterFormatError (one line) if malformed."""
        try:
            meta, tensors = _parse_safetensors(raw)
        except RouterFormatError:
            raise
        except Exception as e:   # truncated or foreign bytes
            raise RouterFormatError(f"not a safetensors file: "
                                    f"{type(e).__name__}: {_first_line(e)}") from None
        if meta.get("format") != FORMAT:
            raise RouterFormatError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        try:
            k, depth, dim = int(meta["k"]), int(meta["depth"]), int(meta["dim"])
        except (KeyError, ValueError):
            raise RouterFormatError("metadata k, depth, dim missing or not integers") from None
        routing = meta.get("routing", "centroid")
        if routing not in ROUTINGS:
            raise RouterFormatError(f"routing is {routing!r}, "
                                    f"expected one of {', '.join(ROUTINGS)}")
        index_names = {"index.vectors", "index.paths"} if routing == "nearest-document" else set()
        # compare counts first so an absurd depth in the metadata costs nothing
        names = ({f"centroids.{l}" for l in range(1, depth + 1)}
                 if 0 < depth <= len(tensors) else None)
        if names is None or set(tensors) != names | index_names:
            raise RouterFormatError(f"tensors {sorted(tensors)[:8]} do not match depth {depth} "
                                    f"and routing {routing}")
        for name in names:
            if tensors[name].dtype != np.float32:
                raise RouterFormatError(f"centroids have dtype {tensors[name].dtype}, "
                                        f"expected float32")
        index = None
        if index_names:
            v, p = tensors["index.vectors"], tensors["index.paths"]
            if v.dtype != np.float16 or p.dtype.kind != "i":
                raise RouterFormatError(f"index tensors are {v.dtype} / {p.dtype}, "
                                        f"expected float16 / int")
            index = DocIndex(v, p)
        try:
            return cls(k, depth, dim, [tensors[f"centroids.{l}"] for l in range(1, depth + 1)],
                       embedder=meta.get("embedder", ""), index=index)
        except ValueError as e:
            raise RouterFormatError(_first_line(e)) from None


def nearest_child(x: np.ndarray, level_centroids: np.ndarray, node: np.ndarray,
                  x_norms: np.ndarray, banned: np.ndarray | None = None,
                  products: np.ndarray | None = None,
                  sq_norms: np.ndarray | None = None) -> np.ndarray:
    """One step of the descent: for each row, the nearest of its node's k children.

    x: (n, dim) float32, finite; level_centroids: (nodes, k, dim); node: (n,) int64 parent of
    each row; x_norms: (n,) L2 norms of x; banned: (n, k) bool, children a row may not take;
    products: (nodes * k, n) x.c against every centroid of the level, if the caller has them;
    sq_norms: (nodes, k) float32 squared norms of the centroids, if the caller has them.
    Returns (n,) int64 in 0..k-1: the argmin of `exact_sq_dist` (ties: the lowest index).

    Exact distances for every row need a (n, k, dim) gather, slow for big batches; so every row
    is first scored by one matmul per parent node, ||c||^2 - 2 x.c (float32, whose last bits
    depend on the batch BLAS sees). A child scoring more than `_margin` above the row's best
    provably is not the exact winner; a row with one child within the margin is decided, and
    only the children within the margin of the other rows (near-ties, about 1% of random rows)
    get exact distances. So a row's child never depends on the batch it is routed in.
    """
    n, (k, dim) = x.shape[0], level_centroids.shape[1:]
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if sq_norms is None:
        sq_norms = np.square(level_centroids).sum(-1)                # (nodes, k)
    # (k, n): the per-row reductions run over k contiguous (n,) rows with vector ops; numpy
    # reduces a short last axis one row at a time (measured: 10-40x slower)
    scores = _scores(x, level_centroids, sq_norms, node, products)   # (k, n) float32
    if banned is not None:
        banned = (banned & ~banned.all(axis=1, keepdims=True)).T    # nothing left: ban nothing
        scores[banned] = np.inf
    best = scores.min(axis=0)                                        # (n,)
    if k <= _FIRST_MIN_PASSES:
        out = np.full(n, k - 1, dtype=np.int64)
        for j in range(k - 2, -1, -1):                               # first minimum wins
            out[scores[j] == best] = j
    else:                         # a document index: k is its size, scores an (n, k) array's view
        out = scores.argmin(axis=0)
    with np.errstate(over="ignore", invalid="ignore"):
        bound = best + _margin(x_norms, float(np.sqrt(sq_norms.max())), dim)
        near = scores <= bound                                       # (k, n) may win exactly
    near |= ~np.isfinite(bound)                                      # overflow: all candidates
    if banned is not None:
        near &= ~banned
    unsure = np.flatnonzero(near.sum(axis=0, dtype=np.int32) > 1)
    chunk = max(1, _CHUNK_ELEMENTS // (k * dim))
    for start in range(0, len(unsure), chunk):
        rows = unsure[start:start + chunk]
        pair_row, cand = np.nonzero(near[:, rows].T)                 # row-major: by row, then child
        dist = exact_sq_dist(x[rows[pair_row]], level_centroids[node[rows[pair_row]], cand])
        row_min = np.full(len(rows), np.inf)
        np.minimum.at(row_min, pair_row, dist)
        winner = dist == row_min[pair_row]
        first = np.full(len(rows), k, dtype=np.int64)
        np.minimum.at(first, pair_row[winner], cand[winner])        # lowest index on ties
        out[rows] = first
    return out


def exact_sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m, dim), (m, dim) float32 -> (m,) float64 squared L2 per row: the routing rule's truth.

    float64 elementwise differences and squares, summed over dim strictly left to right: every
    operation is one IEEE-rounded op in a fixed order, so the bits are the same whatever the
    batch. Two equal ways to run that sum: cumsum along each row (a sequential scan; np.sum is
    pairwise), or, for many rows, one vector add per dimension over a (dim, rows) slab, which
    is 1.5-3x faster from a few hundred rows on."""
    m = len(a)
    if m < _EXACT_SLAB // 4:
        diff = b.astype(np.float64) - a.astype(np.float64)
        return np.cumsum(diff * diff, axis=-1)[..., -1]
    out = np.empty(m)
    for s in range(0, m, _EXACT_SLAB):
        d = np.subtract(b[s:s + _EXACT_SLAB].T, a[s:s + _EXACT_SLAB].T, dtype=np.float64)
        np.multiply(d, d, out=d)                                    # (dim, rows)
        acc = out[s:s + _EXACT_SLAB]
        acc[:] = d[0]
        for term in d[1:]:
            acc += term
    return out


def _scores(x: np.ndarray, level_centroids: np.ndarray, sq_norms: np.ndarray,
            node: np.ndarray, products: np.ndarray | None = None) -> np.ndarray:
    """(k, n) float32 scores ||c||^2 - 2 x.c of each row's k candidate children (distance minus
    ||x||^2), transposed (a view of an (n, k) array for one wide parent); products:
    (nodes * k, n) x.c against every centroid of the level, if known."""
    n, (nodes, k, dim) = x.shape[0], level_centroids.shape
    if products is not None or nodes == 1 or nodes * k <= _DENSE_COLUMNS:
        # one matmul against every centroid of the level, then each row's k entries: one pass
        # over x, where grouping rows by parent would copy x (memory-bound either way)
        if products is None and nodes == 1:       # a document index: k is its size, n <= 256
            # (n, k) then a transposed view: the argmin over k stays a contiguous scan
            return (sq_norms[0] - 2 * (x @ level_centroids[0].T)).T
        if products is None:
            products = np.ascontiguousarray((x @ level_centroids.reshape(nodes * k, dim).T).T)
        if nodes == 1:
            return sq_norms[0][:, None] - 2 * products
        # row i's candidates are products[node_i * k + j, i]: one flat gather (3x faster than
        # np.take_along_axis)
        at = (node * (k * n) + np.arange(n))[None, :] + (np.arange(k) * n)[:, None]   # (k, n)
        picked = products.reshape(-1)[at]
        return np.take(sq_norms.T, node, axis=1) - 2 * picked
    # one small matmul per parent over its rows, gathered parent by parent: each gather stays
    # in cache for its matmul (1.5x faster than sorting all of x first)
    order = np.argsort(node, kind="stable")
    parents, starts = np.unique(node[order], return_index=True)
    ends = np.append(starts[1:], n)
    scores = np.empty((k, n), dtype=np.float32)
    for parent, a, b in zip(parents.tolist(), starts.tolist(), ends.tolist()):
        rows = order[a:b]
        scores[:, rows] = (sq_norms[parent] - 2 * (x[rows] @ level_centroids[parent].T)).T
    return scores


def _margin(x_norms: np.ndarray, max_c_norm: float, dim: int) -> np.ndarray:
    """Per row, how far above the best score a child may score and still be the exact winner.

    With u = 2^-24 (float32 unit roundoff), a float32 score s_j = ||c_j||^2 - 2 x.c_j computed
    in any summation order (BLAS blocking, FMA) is within E = (dim + 2) u (||x|| + max ||c||)^2
    of the true d_j - ||x||^2, and the float64 exact distances are within a far smaller bound.
    So if s_j - s_best > 2E (+ the float64 error), child j's true and exact distances are
    strictly above the best child's: j cannot win. We use 4E: a factor 2 of slack for the
    float32 norms and the roundings in this formula.
    """
    return 4.0 * (dim + 2) * 2.0 ** -24 * (x_norms.astype(np.float32) + np.float32(max_c_norm)) ** 2


def _write_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """safetensors bytes, written here so that membank/ needs no safetensors package (the bank
    server installs without it): an 8-byte little-endian header length, a JSON header padded
    with spaces to a multiple of 8, then each tensor's little-endian bytes, widest dtype first
    (as the safetensors library orders them, so every tensor starts aligned)."""
    names = {np.dtype(d): n for n, d in _DTYPES.items()}
    order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    header: dict = {"__metadata__": metadata}
    chunks, offset = [], 0
    for name in order:
        a = tensors[name]
        data = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": names[a.dtype.newbyteorder("<")], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _parse_safetensors(raw: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, tensors) of safetensors bytes: F32, F16, I32 and I64 tensors, copied out (a
    foreign dtype reads as an empty float64 array, which every check refuses)."""
    if len(raw) < 8:
        raise RouterFormatError("shorter than a safetensors header")
    (n,) = struct.unpack_from("<Q", raw, 0)
    if n > _MAX_HEADER or 8 + n > len(raw):
        raise RouterFormatError(f"header of {n} bytes does not fit the file")
    header = json.loads(bytes(raw[8:8 + n]))
    if not isinstance(header, dict):
        raise RouterFormatError("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(raw)[8 + n:]
    tensors = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        shape = tuple(int(s) for s in info["shape"])
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            tensors[name] = np.empty(0, dtype=np.float64)
            continue
        if (not 0 <= start <= end <= len(body)
                or end - start != dtype.itemsize * int(np.prod(shape))):
            raise RouterFormatError(f"tensor {name} has bad data offsets")
        tensors[name] = (np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
                         .astype(dtype.newbyteorder("=")))
    return meta, tensors


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def _numpy(a):
    """A numpy view of an array-like (a CPU torch tensor too, without importing torch)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def _check(k: int, depth: int, dim: int, centroids: list[np.ndarray]) -> None:
    """Raise ValueError (one line) unless the centroids form a complete k-ary tree of `depth`."""
    if k < 2 or depth < 1 or dim < 1:
        raise ValueError(f"need k >= 2, depth >= 1, dim >= 1; got k={k}, depth={depth}, dim={dim}")
    if len(centroids) != depth:
        raise ValueError(f"{len(centroids)} centroid levels for depth {depth}")
    for level, c in enumerate(centroids, start=1):
        want = (k ** (level - 1), k, dim)
        if tuple(c.shape) != want:
            raise ValueError(f"level {level} centroids have shape {tuple(c.shape)}, "
                             f"expected {want}")
        if not np.isfinite(c).all():
            raise ValueError(f"level {level} centroids contain NaN or inf")


def _check_index(index: DocIndex, k: int, depth: int, dim: int) -> None:
    v, p = index.vectors, index.paths
    if v.ndim != 2 or v.shape[1] != dim or len(v) == 0 or p.shape != (len(v), depth):
        raise ValueError(f"index of {v.shape} vectors and {p.shape} paths does not fit "
                         f"dim {dim}, depth {depth}")
    if not np.isfinite(v).all():
        raise ValueError("index vectors contain NaN or inf")
    if p.min() < 0 or p.max() >= k:
        raise ValueError(f"index paths must lie in 0..{k - 1}")


if __name__ == "__main__":
    import sys

    r = Router.load(sys.argv[1])
    docs = f", index of {len(r.index.vectors):,} documents" if r.index is not None else ""
    print(f"k={r.branching} depth={r.depth} dim={r.dim} embedder={r.embedder} routing={r.routing} "
          f"leaves={r.n_nodes(r.depth)}{docs}")
