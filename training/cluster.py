"""Hierarchical k-means: builds the frozen router (membank/router.py) from document embeddings.

PAPER.md section 2, at small scale. The tree is built from the root down: the examples routed
to a node are clustered into k children by k-means, then routed on to the nearest child, and
each child is split in turn, down to depth p. Per node:

  1. k-means++ initialisation (on at most `batch_size` examples);
  2. `iters` EM steps: full batch when the node holds <= `batch_size` examples, otherwise a
     fresh random mini-batch of `batch_size` (the paper's 6,400) per step; the M-step sets each
     centroid to the mean of its assigned examples (an empty cluster keeps its centroid);
  3. balancing inside every step, before the M-step: while a cluster holds more than
     cap_ratio / k of the step's examples (1.5 / 16 = 0.094 in the paper), the examples of the
     largest cluster and of the smallest cluster are pooled and split at random into two halves.

Balancing moves centroids, not the routing rule: examples are finally routed to the *nearest*
child (exactly `Router.route`), so leaves are far more even than with plain k-means but not
capped exactly. A node with fewer examples than k still gets k centroids (its distinct examples
repeated, or its parent's centroid when it is empty), so every path stays routable; repeated
centroids tie, and ties route to the lowest index, so the copies stay empty.

Vectors are L2-normalised first. Everything random comes from one numpy Generator seeded by
`seed`, consumed node by node in order, so a seed fixes the router.

Run `python -m training.cluster` to embed the element corpus, build a k=4, depth-2 router and
print timings and the leaf sizes.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from membank.router import Router, nearest_child

# show a progress bar when the tree has at least this many nodes to split
_PROGRESS_MIN_NODES = 64


def build_router(emb: np.ndarray, branching: int, depth: int, seed: int = 0, iters: int = 20,
                 batch_size: int = 6400, cap_ratio: float | None = 1.5,
                 embedder: str = "all-MiniLM-L6-v2", progress: bool | None = None) -> Router:
    """Hierarchical k-means over (N, dim) embeddings -> Router of branching k and depth p.

    cap_ratio=None turns balancing off. progress=None shows a bar only for large trees.
    """
    x = _normalise(emb)                                   # (N, dim) float32, unit rows
    n, dim = x.shape
    if n == 0:
        raise ValueError("build_router needs at least one embedding")
    if branching < 2 or depth < 1:
        raise ValueError(f"need branching >= 2 and depth >= 1, got {branching}, {depth}")
    rng = np.random.default_rng(seed)
    k = branching
    n_internal = sum(k ** level for level in range(depth))
    bar = tqdm(total=n_internal, desc="k-means nodes", unit="node",
               disable=not (progress if progress is not None
                            else n_internal >= _PROGRESS_MIN_NODES))

    norms = np.linalg.norm(x, axis=1)
    node = np.zeros(n, dtype=np.int64)                    # (N,) node of each example at this level
    parent_centroid = np.zeros((1, dim), dtype=np.float32)
    parent_centroid[0] = x.mean(axis=0)                   # the root's "centroid": fill for empty
                                                          # nodes
    centroids: list[np.ndarray] = []
    for level in range(1, depth + 1):
        n_parents = k ** (level - 1)
        level_centroids = np.empty((n_parents, k, dim), dtype=np.float32)
        # group example indices by parent node once (stable sort keeps the order deterministic)
        order = np.argsort(node, kind="stable")
        bounds = np.searchsorted(node[order], np.arange(n_parents + 1))
        for parent in range(n_parents):
            members = order[bounds[parent]:bounds[parent + 1]]
            level_centroids[parent] = kmeans(x[members], k, rng, iters=iters, batch_size=batch_size,
                                             cap_ratio=cap_ratio, fill=parent_centroid[parent])
            bar.update(1)
        centroids.append(level_centroids)
        # route every example one level down, with the router's own rule
        child = nearest_child(x, level_centroids, node, norms)
        node = node * k + child
        parent_centroid = level_centroids.reshape(n_parents * k, dim)
    bar.close()
    return Router(branching=k, depth=depth, dim=dim, centroids=centroids, embedder=embedder)


def assign(router: Router, emb: np.ndarray) -> np.ndarray:
    """(N, dim) embeddings -> (N, depth) int64 paths: the offline routing of the training data.

    Like `Router.route`, this does not normalise: pass unit vectors (what `Embedder` returns).
    """
    return router.route(emb)


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 20, batch_size: int = 6400,
           cap_ratio: float | None = 1.5, fill: np.ndarray | None = None) -> np.ndarray:
    """k centroids (k, dim) float32 for the (n, dim) examples of one node.

    n <= k: the distinct examples, repeated to k; n == 0: `fill`
    (the parent's centroid, or zeros) is repeated. Otherwise k-means++ then balanced EM.
    """
    n, dim = x.shape
    if n == 0:
        base = (np.zeros(dim, dtype=np.float32) if fill is None
                else np.asarray(fill, dtype=np.float32))
        return np.repeat(base[None], k, axis=0)
    if n <= k:
        # too few points to cluster: each distinct point is its own child, copies fill the rest
        first = _first_occurrences(x)
        return x[first][np.arange(k) % len(first)].copy()

    sample = x if n <= batch_size else x[rng.choice(n, batch_size, replace=False)]
    c = kmeans_plus_plus(sample, k, rng)                   # (k, dim)
    for _ in range(iters):
        batch = x if n <= batch_size else x[rng.choice(n, batch_size, replace=False)]
        labels = _nearest(batch, c)                        # (b,) E-step
        if cap_ratio is not None:
            labels = balance(labels, k, cap_ratio, rng)
        c_new = _means(batch, labels, c)                   # M-step
        if n <= batch_size and np.array_equal(c_new, c):
            break  # full batch and a fixed point: further steps change nothing
        c = c_new
    return c


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: (n, dim) -> (k, dim); each new centre drawn with probability ~ D^2.

    If fewer than k distinct points exist, the chosen ones are repeated in order.
    """
    n = x.shape[0]
    chosen = [int(rng.integers(n))]
    # (n,) squared distance to nearest centre
    d2 = _sq_dist(x, x[chosen]).ravel().astype(np.float64)
    while len(chosen) < k:
        total = d2.sum()
        if total <= 0:
            break  # every point coincides with a centre already
        nxt = int(rng.choice(n, p=d2 / total))
        chosen.append(nxt)
        d2 = np.minimum(d2, _sq_dist(x, x[nxt:nxt + 1]).ravel())
    return x[np.array(chosen)[np.arange(k) % len(chosen)]].copy()


def balance(labels: np.ndarray, k: int, cap_ratio: float, rng: np.random.Generator,
            max_rounds: int | None = None) -> np.ndarray:
    """Split oversized clusters: while the largest holds more than cap_ratio / k of the labels,
    pool it with the smallest cluster and split the pool at random into two halves.

    Returns new labels (n,); the input is not modified. Each round at least halves the largest
    cluster's excess over the smallest, so 2k rounds suffice in practice.
    """
    labels = labels.copy()
    cap = cap_ratio * len(labels) / k
    for _ in range(max_rounds or 2 * k):
        counts = np.bincount(labels, minlength=k)          # (k,)
        big = int(counts.argmax())
        if counts[big] <= cap:
            break
        small = int(counts.argmin())
        pool = np.flatnonzero((labels == big) | (labels == small))
        pool = pool[rng.permutation(len(pool))]
        half = (len(pool) + 1) // 2
        labels[pool[:half]] = big
        labels[pool[half:]] = small
    return labels


# -- helpers -------------------------------------------------------------------------------

def _normalise(emb) -> np.ndarray:
    x = np.asarray(emb.detach().cpu() if isinstance(emb, torch.Tensor) else emb, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, 1e-12), dtype=np.float32)


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(n, dim), (m, dim) -> (n, m) squared L2 distances via one matmul: |x|^2 - 2 x.c + |c|^2."""
    xt, ct = torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(c))
    d = (xt.square().sum(1, keepdim=True) - 2 * xt @ ct.T + ct.square().sum(1)[None])
    return d.clamp_min_(0).numpy()


def _nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return _sq_dist(x, c).argmin(axis=1)                  # (n,) first minimum on ties


def _means(x: np.ndarray, labels: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """Mean of each cluster's members (k, dim); an empty cluster keeps its previous centroid."""
    k = previous.shape[0]
    sums = np.zeros_like(previous, dtype=np.float64)
    np.add.at(sums, labels, x)
    counts = np.bincount(labels, minlength=k)
    out = previous.copy()
    filled = counts > 0
    out[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    return out


def _first_occurrences(x: np.ndarray) -> np.ndarray:
    """Indices of the distinct rows of x, in order of first appearance."""
    _, first = np.unique(x, axis=0, return_index=True)
    return np.sort(first)


if __name__ == "__main__":
    import time

    from membank.nn.embed import Embedder
    from training.data import build_documents, probe_prompts

    t0 = time.perf_counter()
    docs = build_documents()
    t1 = time.perf_counter()
    print(f"documents: {len(docs)} ({sum(len(d.text) for d in docs):,} chars) in {t1 - t0:.2f} s")
    embedder = Embedder()
    embedder.encode(["warm-up"])
    t2 = time.perf_counter()
    emb = embedder.encode([d.text for d in docs], progress=True)
    t3 = time.perf_counter()
    print(f"embedding: {emb.shape} in {t3 - t2:.1f} s (model load excluded)")
    router = build_router(emb, branching=4, depth=2, seed=0)
    t4 = time.perf_counter()
    print(f"router k=4 depth=2: {t4 - t3:.2f} s")
    paths = assign(router, emb)
    leaves = router.node_ids(paths)[:, -1]
    sizes = np.bincount(leaves, minlength=router.n_nodes(router.depth))
    print(f"leaf sizes: {sizes.tolist()} (min {sizes.min()}, max {sizes.max()}, "
          f"mean {sizes.mean():.1f})")
    # does the probe prompt land in the same leaf as its element's facts document?
    probes = [prompt for prompt, _ in probe_prompts()]
    probe_leaves = router.node_ids(assign(router, embedder.encode(probes)))[:, -1]
    facts_leaves = leaves[[i for i, d in enumerate(docs) if d.kind == "facts"]]
    print(f"probe prompt routed to its facts document's leaf: "
          f"{(probe_leaves == facts_leaves).mean():.0%}")
