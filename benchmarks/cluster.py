"""Benchmark: hierarchical k-means engines and routing throughput.

    .venv/bin/python -m benchmarks.cluster [--n 100000] [--k 16] [--depth 2]

1. Build a k-ary, depth-p router over N synthetic 384-d unit vectors (a mixture of 1,000
   Gaussian topics, like sentence embeddings of a topical corpus) with membank's engine
   (training/cluster.py: k-means++, mini-batch EM of 6,400 samples, balancing; numpy + torch
   matmuls) and with faiss-cpu's k-means per node (full-batch Lloyd, 20 iterations, no
   balancing), same tree shape. Reports build time, the mean squared distance of each example to
   its leaf centroid (lower is tighter) and the leaf-size spread (max / mean: balance).
2. Routing throughput: greedy descent of N embeddings (Router.route), and MiniLM embedding of
   real texts (the element corpus), in texts per second.
Ends with one JSON line of the figures.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from membank.router import Router
from training.cluster import build_router


def synthetic(n: int, dim: int = 384, topics: int = 1000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, dim)).astype(np.float32)
    weights = 1.0 / np.arange(1, topics + 1)  # Zipf-like topic popularity
    labels = rng.choice(topics, size=n, p=weights / weights.sum())
    x = centres[labels] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_router(x: np.ndarray, k: int, depth: int, seed: int = 0) -> Router:
    import faiss

    n, dim = x.shape
    node = np.zeros(n, dtype=np.int64)
    centroids = []
    for level in range(1, depth + 1):
        level_c = np.zeros((k ** (level - 1), k, dim), dtype=np.float32)
        for parent in range(k ** (level - 1)):
            members = x[node == parent]
            if len(members) < k:  # too few to cluster: repeat what there is
                src = members if len(members) else x.mean(0, keepdims=True)
                level_c[parent] = src[np.arange(k) % len(src)]
                continue
            km = faiss.Kmeans(dim, k, niter=20, seed=seed + parent, verbose=False,
                              max_points_per_centroid=10_000)
            km.train(np.ascontiguousarray(members))
            level_c[parent] = km.centroids
        centroids.append(level_c)
        partial = Router(branching=k, depth=level, dim=dim, centroids=centroids)
        node = partial.node_ids(partial.route(x))[:, -1]
    return Router(branching=k, depth=depth, dim=dim, centroids=centroids)


def quality(router: Router, x: np.ndarray) -> dict:
    paths = router.route(x)
    leaf = router.node_ids(paths)[:, -1]
    k = router.branching
    flat = router.centroids[-1].reshape(-1, x.shape[1])   # (k^p, dim)
    mse = float(np.mean(np.sum((x - flat[leaf]) ** 2, axis=1)))
    sizes = np.bincount(leaf, minlength=k ** router.depth)
    return {"leaf_mse": mse, "leaf_max_over_mean": float(sizes.max() / sizes.mean()),
            "empty_leaves": int((sizes == 0).sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--depth", type=int, default=2)
    args = ap.parse_args()
    x = synthetic(args.n)
    figures: dict = {"n": args.n, "k": args.k, "depth": args.depth,
                     "threads": torch.get_num_threads()}

    t0 = time.perf_counter()
    ours = build_router(x, args.k, args.depth, seed=0, progress=False)
    figures["membank_build_s"] = time.perf_counter() - t0
    figures["membank"] = quality(ours, x)
    try:
        t0 = time.perf_counter()
        theirs = faiss_router(x, args.k, args.depth)
        figures["faiss_build_s"] = time.perf_counter() - t0
        figures["faiss"] = quality(theirs, x)
    except ImportError:
        figures["faiss_build_s"] = None

    t0 = time.perf_counter()
    ours.route(x)
    figures["route_per_s"] = args.n / (time.perf_counter() - t0)

    from membank.nn.embed import Embedder
    from training.data import build_documents

    texts = [d.text for d in build_documents()][:512]
    emb = Embedder()
    emb.encode(texts[:8])  # load the model outside the timing
    t0 = time.perf_counter()
    emb.encode(texts)
    figures["embed_texts_per_s"] = len(texts) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for t in texts[:64]:  # a device routes one prompt at a time
        ours.route(emb.encode([t]))
    figures["embed_route_one_prompt_ms"] = (time.perf_counter() - t0) / 64 * 1e3

    print(f"hierarchical k-means over {args.n:,} x 384, k={args.k}, depth={args.depth}")
    print(f"{'engine':<10}{'build s':>10}{'leaf MSE':>12}{'max/mean leaf':>15}{'empty':>7}")
    for name in ("membank", "faiss"):
        if figures.get(f"{name}_build_s") is not None:
            q = figures[name]
            print(f"{name:<10}{figures[f'{name}_build_s']:>10.2f}{q['leaf_mse']:>12.4f}"
                  f"{q['leaf_max_over_mean']:>15.2f}{q['empty_leaves']:>7}")
    if figures.get("faiss_build_s"):
        print(f"build time membank / faiss: "
              f"{figures['membank_build_s'] / figures['faiss_build_s']:.2f}x")
    print(f"route (greedy descent, batched): {figures['route_per_s']:,.0f} embeddings/s")
    print(f"MiniLM embed (batched): {figures['embed_texts_per_s']:,.0f} texts/s; "
          f"one prompt embed + route: {figures['embed_route_one_prompt_ms']:.1f} ms")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
