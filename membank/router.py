"""The frozen retriever shipped to devices: a hierarchical k-means tree over text embeddings.

PAPER.md section 2. A tree of branching k and depth p; every node below the root has a centroid.
Level l (1-based) holds the k child centroids of each of the k^(l-1) nodes at level l-1:

    centroids[l - 1]: (k^(l-1), k, dim) float32     level 0 is the root, a single node

Routing is greedy: start at the root and, at every level, move to the nearest (L2) of the current
node's k children; ties go to the lowest child index. A path (i_1, ..., i_p) of child indices
fixes one node per level; its global index at level l is node_l = node_{l-1} * k + i_l (node_0 = 0),
which is the row of that level's bank tensor (membank/artifacts.py).

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

# Routing gathers a (rows, k, dim) slab of centroids; rows are processed in chunks so that slab
# stays around 64 MB however many embeddings are routed at once.
_CHUNK_ELEMENTS = 1 << 24


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
        node = torch.zeros(x.shape[0], dtype=torch.long)  # (N,) global node index, root = 0
        children = []
        for level in range(self.depth):
            child = nearest_child(x, self.centroids[level], node)   # (N,)
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


def nearest_child(x: torch.Tensor, level_centroids: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
    """One step of the descent: for each row, the nearest of its node's k children.

    x: (n, dim) float32; level_centroids: (nodes, k, dim); node: (n,) int64 parent of each row.
    Returns (n,) int64 in 0..k-1; ties go to the lowest index. Vectorised over rows, in chunks.
    """
    n, (k, dim) = x.shape[0], level_centroids.shape[1:]
    out = torch.empty(n, dtype=torch.long)
    chunk = max(1, _CHUNK_ELEMENTS // (k * dim))
    for start in range(0, n, chunk):
        rows = x[start:start + chunk]                                # (c, dim)
        candidates = level_centroids[node[start:start + chunk]]      # (c, k, dim)
        # exact squared L2 row by row (no x.c expansion), so a row's result never depends on
        # which batch it was routed in
        dist = (candidates - rows[:, None, :]).square().sum(-1)      # (c, k)
        out[start:start + chunk] = dist.argmin(dim=1)                # first minimum on ties
    return out


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
