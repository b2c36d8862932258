"""Unit tests for membank/router.py: greedy descent, node ids, safetensors round trip.

Run: .venv/bin/python -m pytest -q tests/unit/test_router.py
"""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from membank.router import Router

K, DEPTH, DIM = 3, 3, 8


def random_router(k=K, depth=DEPTH, dim=DIM, seed=0) -> Router:
    g = torch.Generator().manual_seed(seed)
    centroids = [torch.randn(k ** (l - 1), k, dim, generator=g) for l in range(1, depth + 1)]
    return Router(branching=k, depth=depth, dim=dim, centroids=centroids)


def random_emb(n=50, dim=DIM, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_route_shape_and_range():
    paths = random_router().route(random_emb())
    assert paths.shape == (50, DEPTH) and paths.dtype == torch.long
    assert paths.min() >= 0 and paths.max() < K


def test_route_is_deterministic_and_survives_save_load(tmp_path):
    router, emb = random_router(), random_emb()
    first = router.route(emb)
    assert torch.equal(first, router.route(emb))
    router.save(tmp_path / "router.safetensors")
    assert torch.equal(first, Router.load(tmp_path / "router.safetensors").route(emb))


def test_batch_route_equals_row_by_row():
    router, emb = random_router(), random_emb(n=40)
    batch = router.route(emb)
    for i in range(len(emb)):
        assert torch.equal(batch[i:i + 1], router.route(emb[i]))        # (dim,) input
        assert torch.equal(batch[i:i + 1], router.route(emb[i:i + 1]))  # (1, dim) input


def test_route_accepts_numpy_and_torch():
    router, emb = random_router(), random_emb()
    assert torch.equal(router.route(emb), router.route(torch.from_numpy(emb)))
    assert torch.equal(router.route(emb), router.route(emb.astype(np.float64)))


def test_greedy_descent_picks_nearest_child_at_every_level():
    router, emb = random_router(), random_emb(n=100)
    paths = router.route(emb).numpy()
    for x, path in zip(emb.astype(np.float64), paths):
        node = 0
        for level in range(DEPTH):
            children = router.centroids[level][node].double().numpy()   # (k, dim)
            dist = ((children - x) ** 2).sum(axis=1)                     # (k,)
            assert path[level] == int(np.argmin(dist))
            node = node * K + path[level]


def test_ties_go_to_the_lowest_index():
    c = torch.zeros(1, 4, DIM)
    c[0, 2] = 1.0  # children 0, 1, 3 coincide at the origin
    router = Router(branching=4, depth=1, dim=DIM, centroids=[c])
    assert router.route(np.zeros(DIM, dtype=np.float32)).tolist() == [[0]]
    assert router.route(np.ones(DIM, dtype=np.float32)).tolist() == [[2]]


def test_node_ids():
    router = random_router()
    paths = torch.tensor([[0, 0, 0], [2, 1, 0], [1, 2, 2]])
    assert router.node_ids(paths).tolist() == [[0, 0, 0], [2, 7, 21], [1, 5, 17]]
    with pytest.raises(ValueError):
        router.node_ids(torch.tensor([[0, 3, 0]]))


def test_route_rejects_wrong_dim():
    with pytest.raises(ValueError):
        random_router().route(np.zeros((2, DIM + 1), dtype=np.float32))


def test_save_load_round_trip_is_exact(tmp_path):
    router = random_router()
    router.embedder = "test-embedder"
    router.save(tmp_path / "r.safetensors")
    loaded = Router.load(tmp_path / "r.safetensors")
    assert (loaded.branching, loaded.depth, loaded.dim, loaded.embedder) == (K, DEPTH, DIM, "test-embedder")
    for a, b in zip(router.centroids, loaded.centroids):
        assert torch.equal(a, b)


def test_constructor_rejects_bad_shapes():
    with pytest.raises(ValueError):
        Router(branching=2, depth=2, dim=4, centroids=[torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)])


def _write(path, tensors, metadata):
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case", ["garbage", "truncated", "no_metadata", "wrong_shape", "missing_level",
                                  "extra_tensor", "bad_int", "wrong_dtype", "nan"])
def test_load_malformed_raises_value_error(tmp_path, case):
    good = random_router(k=2, depth=2, dim=4)
    good.save(tmp_path / "good.safetensors")
    meta = {"format": "membank.router/1", "k": "2", "depth": "2", "dim": "4", "embedder": "x"}
    t1, t2 = good.centroids
    path = tmp_path / "bad.safetensors"
    if case == "garbage":
        path.write_bytes(b"this is not a safetensors file")
    elif case == "truncated":
        path.write_bytes((tmp_path / "good.safetensors").read_bytes()[:-7])
    elif case == "no_metadata":
        _write(path, {"centroids.1": t1, "centroids.2": t2}, None)
    elif case == "wrong_shape":
        _write(path, {"centroids.1": t1, "centroids.2": torch.zeros(2, 2, 5)}, meta)
    elif case == "missing_level":
        _write(path, {"centroids.1": t1}, meta)
    elif case == "extra_tensor":
        _write(path, {"centroids.1": t1, "centroids.2": t2, "centroids.3": t2.clone()}, meta)
    elif case == "bad_int":
        _write(path, {"centroids.1": t1, "centroids.2": t2}, {**meta, "k": "two"})
    elif case == "wrong_dtype":
        _write(path, {"centroids.1": t1.double(), "centroids.2": t2}, meta)
    elif case == "nan":
        _write(path, {"centroids.1": t1, "centroids.2": torch.full_like(t2, float("nan"))}, meta)
    with pytest.raises(ValueError) as err:
        Router.load(path)
    assert "\n" not in str(err.value)


def test_load_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        Router.load(tmp_path / "absent.safetensors")
