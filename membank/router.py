"""The frozen retriever shipped to devices: a hierarchical k-means tree over text embeddings.

PAPER.md section 2. A tree of branching k and depth p; every node below the root has a centroid.
Level l (1-based) holds the k child centroids of each of the k^(l-1) nodes at level l-1:

    centroids[l - 1]: (k^(l-1), k, dim) float32     level 0 is the root, a single node

Routing is greedy: start at the root and, at every level, move to the nearest (L2) of the current
node's k children; ties go to the lowest child index. "Nearest" is exact: float64 squared L2
summed in a fixed order (`exact_sq_dist`), so a row's path never depends on the batch it is
routed in, and the bank server's numpy router (services/bank_server/router_store.py) gives the
same path bit for bit. Batches stay fast: a matmul per parent node scores every row, and only
near-ties within a proven rounding bound get exact distances (`nearest_child`).
A path (i_1, ..., i_p) of child indices fixes one node per level; its global index at level l
is node_l = node_{l-1} * k + i_l (node_0 = 0), which is the row of that level's bank tensor
(membank/artifacts.py).

The file is safetensors only (no pickle): tensors "centroids.1" .. "centroids.p" plus string
metadata (format, k, depth, dim, embedder). It is built offline by training/cluster.py.

    router = Router.load("export/router.safetensors")
    paths = router.route(Embedder().encode([prompt]))   # (1, depth) int64
    nodes = router.node_ids(paths)                      # (1, depth) int64

Run `python -m membank.router export/router.safetensors` to print a router's shape.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "membank.router/1"

# The exact path gathers up to a (rows, k, dim) slab of centroids for the near-tie rows; they
# are processed in chunks so that slab stays around 128 MB (float64) however many need it.
_CHUNK_ELEMENTS = 1 << 24
# Levels with at most this many centroids in all are scored by one dense matmul; wider levels
# by one matmul per parent node (64 columns cost about one read of x: measured on 2 cores).
_DENSE_COLUMNS = 64


@dataclass(eq=False)  # centroids are tensors: compare routers with torch.equal, not ==
class Router:
    branching: int                  # k
    depth: int                      # p
    dim: int                        # embedding width (384 for MiniLM)
    centroids: list[torch.Tensor]   # level l at index l-1: (k^(l-1), k, dim) float32
    embedder: str = "all-MiniLM-L6-v2"

    def __post_init__(self) -> None:
        self.centroids = [torch.as_tensor(c, dtype=torch.float32).contiguous() for c in self.centroids]
        _check(self.branching, self.depth, self.dim, self.centroids)

    def n_nodes(self, level: int) -> int:
        """Nodes at `level` (0 = root): k^level."""
        return self.branching ** level

    # -- routing ---------------------------------------------------------------------------

    def route(self, emb) -> torch.Tensor:
        """Greedy descent: (N, dim) or (dim,) embeddings -> (N, depth) int64 child indices.

        A single (dim,) vector is treated as one row, so the result is always 2-D.
        """
        x = _as_tensor(emb).to(torch.float32)
        if x.dim() == 1:
            x = x[None]
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"route expects (N, {self.dim}) or ({self.dim},) embeddings, "
                             f"got {tuple(x.shape)}")
        norms = x.norm(dim=1)
        # a NaN or inf shows in the norm (cheaper than a pass over x); a huge finite row whose
        # norm overflows passes the full check and is routed (its rows take the exact path)
        if not torch.isfinite(norms).all() and not torch.isfinite(x).all():
            raise ValueError("route: embeddings contain NaN or inf")
        node = torch.zeros(x.shape[0], dtype=torch.long)  # (N,) global node index, root = 0
        children = []
        for level in range(self.depth):
            child = nearest_child(x, self.centroids[level], node, norms)   # (N,)
            children.append(child)
            node = node * self.branching + child
        return torch.stack(children, dim=1)

    def node_ids(self, paths) -> torch.Tensor:
        """(N, depth) child indices -> (N, depth) global node index per level."""
        p = _as_tensor(paths).to(torch.long)
        if p.dim() == 1:
            p = p[None]
        if p.dim() != 2 or p.shape[1] != self.depth:
            raise ValueError(f"node_ids expects (N, {self.depth}) paths, got {tuple(p.shape)}")
        if p.numel() and (p.min() < 0 or p.max() >= self.branching):
            raise ValueError(f"path entries must lie in 0..{self.branching - 1}")
        nodes = torch.empty_like(p)
        node = torch.zeros(p.shape[0], dtype=torch.long)
        for level in range(self.depth):
            node = node * self.branching + p[:, level]
            nodes[:, level] = node
        return nodes

    # -- files -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write safetensors atomically (temporary name, then rename)."""
        path = Path(path)
        tensors = {f"centroids.{l + 1}": c.contiguous() for l, c in enumerate(self.centroids)}
        metadata = {"format": FORMAT, "k": str(self.branching), "depth": str(self.depth),
                    "dim": str(self.dim), "embedder": self.embedder}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "Router":
        """Read and validate a router file; ValueError (one line) if it is malformed."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no router file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                if meta.get("format") != FORMAT:
                    raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
                try:
                    k, depth, dim = int(meta["k"]), int(meta["depth"]), int(meta["dim"])
                except (KeyError, ValueError):
                    raise ValueError("metadata k, depth, dim missing or not integers") from None
                # compare counts first so an absurd depth in the metadata costs nothing
                if len(names) != depth or names != {f"centroids.{l}" for l in range(1, depth + 1)}:
                    raise ValueError(f"tensors {sorted(names)} do not match depth {depth}")
                centroids = [f.get_tensor(f"centroids.{l}") for l in range(1, depth + 1)]
            for c in centroids:
                if c.dtype != torch.float32:
                    raise ValueError(f"centroids have dtype {c.dtype}, expected float32")
            return cls(k, depth, dim, centroids, embedder=meta.get("embedder", ""))
        except ValueError as e:
            raise ValueError(f"malformed router file {path}: {_first_line(e)}") from None
        except Exception as e:  # safetensors' own errors for a truncated or foreign file
            raise ValueError(f"malformed router file {path}: {type(e).__name__}: {_first_line(e)}") from None


def nearest_child(x: torch.Tensor, level_centroids: torch.Tensor, node: torch.Tensor,
                  x_norms: torch.Tensor | None = None) -> torch.Tensor:
    """One step of the descent: for each row, the nearest of its node's k children.

    x: (n, dim) float32, finite; level_centroids: (nodes, k, dim); node: (n,) int64 parent of
    each row; x_norms: (n,) L2 norms of x, if the caller has them (the descent reuses them).
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
        return torch.empty(0, dtype=torch.long)
    sq_norms = level_centroids.square().sum(-1)                      # (nodes, k)
    scores = _scores(x, level_centroids, sq_norms, node)             # (n, k) float32
    best, out = scores.min(dim=1)                                    # out: first minimum
    norms = x.norm(dim=1) if x_norms is None else x_norms
    bound = best + _margin(norms, float(sq_norms.max().sqrt()), dim)
    near = scores <= bound[:, None]                                  # (n, k) may win exactly
    near |= ~torch.isfinite(bound)[:, None]                          # overflow: all candidates
    unsure = (near.sum(dim=1) > 1).nonzero()[:, 0]
    chunk = max(1, _CHUNK_ELEMENTS // (k * dim))
    for start in range(0, len(unsure), chunk):
        rows = unsure[start:start + chunk]
        pair_row, cand = near[rows].nonzero().unbind(1)              # row-major: by row, then child
        dist = exact_sq_dist(x[rows[pair_row]], level_centroids[node[rows[pair_row]], cand])
        row_min = torch.full((len(rows),), float("inf"), dtype=torch.float64)
        row_min.scatter_reduce_(0, pair_row, dist, "amin")
        winner = dist == row_min[pair_row]
        first = torch.full((len(rows),), k, dtype=torch.long)
        first.scatter_reduce_(0, pair_row[winner], cand[winner], "amin")   # lowest index on ties
        out[rows] = first
    return out


def exact_sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(m, dim), (m, dim) float32 -> (m,) float64 squared L2 per row: the routing rule's truth.

    float64 elementwise differences and squares, summed over dim strictly left to right (cumsum
    is a sequential scan): every operation is one IEEE-rounded op in a fixed order, so the bits
    are the same whatever the batch, and the same in services/bank_server/router_store.py
    (numpy), which routes with this rule too.
    """
    diff = b.to(torch.float64) - a.to(torch.float64)
    return (diff * diff).cumsum(dim=-1)[..., -1]


def _scores(x: torch.Tensor, level_centroids: torch.Tensor, sq_norms: torch.Tensor,
            node: torch.Tensor) -> torch.Tensor:
    """(n, k) float32 scores ||c||^2 - 2 x.c of each row's k candidate children (distance minus
    ||x||^2): rows grouped by parent node, one matmul per parent, no gather of centroids."""
    n, (nodes, k, dim) = x.shape[0], level_centroids.shape
    if nodes == 1 or nodes * k <= _DENSE_COLUMNS:
        # one matmul against every centroid of the level, then each row's k columns: one pass
        # over x, where grouping rows by parent would copy x (memory-bound either way)
        full = torch.addmm(sq_norms.reshape(-1), x, level_centroids.reshape(nodes * k, dim).T, alpha=-2)
        return full if nodes == 1 else full.view(n, nodes, k)[torch.arange(n), node]
    order = torch.argsort(node, stable=True)
    parents, counts = torch.unique_consecutive(node[order], return_counts=True)
    # up to k^(p-1) small matmuls: numpy's, because a tiny multi-threaded torch op costs a
    # scheduler quantum on a busy machine (0.8 ms instead of 30 us measured on 2 shared cores)
    xs, cs, sq = x[order].numpy(), level_centroids.numpy(), sq_norms.numpy()
    grouped = np.empty((n, k), dtype=np.float32)
    start = 0
    for parent, count in zip(parents.tolist(), counts.tolist()):
        end = start + count
        grouped[start:end] = sq[parent] - 2 * (xs[start:end] @ cs[parent].T)
        start = end
    scores = torch.empty(n, k, dtype=torch.float32)
    scores[order] = torch.from_numpy(grouped)
    return scores


def _margin(x_norms: torch.Tensor, max_c_norm: float, dim: int) -> torch.Tensor:
    """Per row, how far above the best score a child may score and still be the exact winner.

    With u = 2^-24 (float32 unit roundoff), a float32 score s_j = ||c_j||^2 - 2 x.c_j computed
    in any summation order (BLAS blocking, FMA) is within E = (dim + 2) u (||x|| + max ||c||)^2
    of the true d_j - ||x||^2, and the float64 exact distances are within a far smaller bound.
    So if s_j - s_best > 2E (+ the float64 error), child j's true and exact distances are
    strictly above the best child's: j cannot win. We use 4E: a factor 2 of slack for the
    float32 norms and the roundings in this formula. A reduced-precision float32 matmul
    (torch.set_float32_matmul_precision below "highest") voids the bound: then every row is
    decided exactly.
    """
    if torch.get_float32_matmul_precision() != "highest":
        return torch.full_like(x_norms, float("inf"))
    return 4.0 * (dim + 2) * 2.0 ** -24 * (x_norms + max_c_norm) ** 2


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def _as_tensor(a) -> torch.Tensor:
    return a.detach().cpu() if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))


def _check(k: int, depth: int, dim: int, centroids: list[torch.Tensor]) -> None:
    """Raise ValueError (one line) unless the centroids form a complete k-ary tree of `depth`."""
    if k < 2 or depth < 1 or dim < 1:
        raise ValueError(f"need k >= 2, depth >= 1, dim >= 1; got k={k}, depth={depth}, dim={dim}")
    if len(centroids) != depth:
        raise ValueError(f"{len(centroids)} centroid levels for depth {depth}")
    for level, c in enumerate(centroids, start=1):
        want = (k ** (level - 1), k, dim)
        if tuple(c.shape) != want:
            raise ValueError(f"level {level} centroids have shape {tuple(c.shape)}, expected {want}")
        if not torch.isfinite(c).all():
            raise ValueError(f"level {level} centroids contain NaN or inf")


if __name__ == "__main__":
    import sys

    r = Router.load(sys.argv[1])
    print(f"k={r.branching} depth={r.depth} dim={r.dim} embedder={r.embedder} "
          f"leaves={r.n_nodes(r.depth)}")
