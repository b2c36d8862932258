"""Unit tests for training/cluster.py: hierarchical k-means on synthetic data.

Run: .venv/bin/python -m pytest -q tests/unit/test_cluster.py
"""
import numpy as np
import pytest

from membank.router import Router
from training.cluster import assign, balance, build_router

DIM = 16


def blobs(centres, sizes, std, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around the given centres: (N, DIM) float32 points and (N,) blob labels."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + std * rng.standard_normal((n, DIM)) for c, n in zip(centres, sizes)])
    return x.astype(np.float32), np.repeat(np.arange(len(sizes)), sizes)


def unit(v):
    return v / np.linalg.norm(v)


E = np.eye(DIM)
# two well-separated pairs of close blobs: the root should split pairs, level 2 the blobs in a pair
PAIRED = [unit(E[0] + 0.3 * E[2]), unit(E[0] - 0.3 * E[2]),
          unit(E[1] + 0.3 * E[3]), unit(E[1] - 0.3 * E[3])]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_leaves_separate_blobs(seed):
    x, blob = blobs(PAIRED, [40, 40, 40, 40], std=0.01, seed=seed)
    router = build_router(x, branching=2, depth=2, seed=seed)
    leaves = router.node_ids(assign(router, x))[:, -1]
    # each blob lands in a single leaf, and different blobs in different leaves
    leaf_of_blob = [set(leaves[blob == b]) for b in range(4)]
    assert all(len(s) == 1 for s in leaf_of_blob)
    assert len(set.union(*leaf_of_blob)) == 4


def test_balance_enforces_the_cap():
    rng = np.random.default_rng(0)
    k, n = 16, 3200
    skewed = np.where(rng.random(n) < 0.7, 0, rng.integers(0, k, n))   # 70%+ in cluster 0
    for labels in (skewed, np.zeros(n, dtype=np.int64)):
        out = balance(labels, k, cap_ratio=1.5, rng=rng)
        assert np.bincount(out, minlength=k).max() <= 1.5 * n / k      # 300 = 0.094 * n
        assert len(out) == n and out.min() >= 0 and out.max() < k


def test_balance_leaves_balanced_labels_alone():
    labels = np.arange(400) % 4
    assert np.array_equal(balance(labels, 4, 1.5, np.random.default_rng(0)), labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balancing_splits_a_dominant_blob(seed):
    # 85% of the examples in one tight blob: plain k-means gives it one child (or two), the
    # balanced version spreads it over several children and keeps every child under the cap
    x, _ = blobs(E[:4], [850, 50, 50, 50], std=0.05, seed=seed)
    k = 4
    balanced = build_router(x, branching=k, depth=1, seed=seed)
    sizes = np.bincount(assign(balanced, x)[:, 0], minlength=k)
    assert sizes.max() <= 1.5 * len(x) / k


def test_same_seed_same_router_other_seed_differs():
    x, _ = blobs([E[i] for i in range(6)], [30] * 6, std=0.2, seed=0)
    a = build_router(x, branching=3, depth=2, seed=7)
    b = build_router(x, branching=3, depth=2, seed=7)
    c = build_router(x, branching=3, depth=2, seed=8)
    assert all(np.array_equal(p, q) for p, q in zip(a.centroids, b.centroids))
    assert not all(np.array_equal(p, q) for p, q in zip(a.centroids, c.centroids))


@pytest.mark.parametrize("n", [1, 3, 5])
def test_nodes_with_fewer_than_k_examples_give_a_complete_router(n, tmp_path):
    x, _ = blobs([E[0]], [n], std=0.5)
    router = build_router(x, branching=4, depth=3, seed=0)
    assert [tuple(c.shape) for c in router.centroids] == [(1, 4, DIM), (4, 4, DIM), (16, 4, DIM)]
    assert all(np.isfinite(c).all() for c in router.centroids)
    paths = assign(router, x)
    assert paths.shape == (n, 3)
    if n <= 4:
        # each distinct example gets its own level-1 child
        assert len(set(paths[:, 0].tolist())) == n
    # any query routes, and the router round-trips through its file format
    router.save(tmp_path / "r.safetensors")
    queries = np.random.default_rng(1).standard_normal((20, DIM)).astype(np.float32)
    assert Router.load(tmp_path / "r.safetensors").route(queries).shape == (20, 3)


def test_duplicate_examples_and_empty_input():
    x = np.tile(E[0].astype(np.float32), (10, 1))     # 10 copies of one point, k = 4
    router = build_router(x, branching=4, depth=2, seed=0)
    assert (assign(router, x) == 0).all()              # identical centroids tie: lowest index
    with pytest.raises(ValueError):
        build_router(np.zeros((0, DIM), dtype=np.float32), branching=4, depth=2)


def test_mini_batch_path_runs():
    # more examples than the mini-batch: k-means samples fresh batches per EM step
    x, blob = blobs(E[:4], [300] * 4, std=0.05)
    router = build_router(x, branching=4, depth=1, seed=0, batch_size=256)
    leaves = assign(router, x)[:, 0]
    assert all(len(set(leaves[blob == b])) == 1 for b in range(4))
    assert len(set(leaves.tolist())) == 4
