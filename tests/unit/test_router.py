"""Unit tests for membank/router.py: greedy descent, node ids, safetensors round trip; batched
routing (matmul + exact near-ties) equals row-by-row routing and the server's numpy router.

Run: .venv/bin/python -m pytest -q tests/unit/test_router.py
"""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import membank.router as router_module
from membank.router import Router
from services.bank_server.router_store import NumpyRouter

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


# -- batched routing: fast path (matmul + margin) and exact near-ties -------------------------
def unit_router(k, depth, dim, seed=0, scale=0.5) -> Router:
    """Centroids of norm `scale`, the regime of k-means centroids over unit embeddings."""
    g = torch.Generator().manual_seed(seed)
    cs = [torch.nn.functional.normalize(torch.randn(k ** l, k, dim, generator=g), dim=-1) * scale
          for l in range(depth)]
    return Router(branching=k, depth=depth, dim=dim, centroids=cs)


def unit_emb(n, dim, seed=1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_twin(router: Router) -> NumpyRouter:
    return NumpyRouter(router.branching, router.depth, router.dim, tuple(c.numpy() for c in router.centroids))


def reference_paths(router: Router, emb: np.ndarray) -> np.ndarray:
    """Row by row, float64 distances with numpy's own (pairwise) sum: the nearest child."""
    out = np.zeros((len(emb), router.depth), dtype=np.int64)
    for i, x in enumerate(emb.astype(np.float64)):
        node = 0
        for level in range(router.depth):
            d = ((router.centroids[level][node].double().numpy() - x) ** 2).sum(axis=1)
            out[i, level] = int(np.argmin(d))
            node = node * router.branching + out[i, level]
    return out


@pytest.mark.parametrize("k,depth", [(4, 3), (16, 2)])
def test_big_batch_equals_row_by_row_and_the_numpy_router(k, depth):
    router, emb = unit_router(k, depth, 384), unit_emb(600, 384)
    batch = router.route(emb)
    rows = torch.cat([router.route(x) for x in emb])
    assert torch.equal(batch, rows)
    assert torch.equal(batch, router.route(emb[::-1].copy()).flip(0))   # order in the batch
    assert torch.equal(batch[:7], router.route(emb[:7]))                # other batch sizes
    npr = numpy_twin(router)
    assert np.array_equal(npr.route_batch(emb), batch.numpy())
    assert [npr.route(x) for x in emb[:50]] == batch[:50].tolist()


def test_most_random_rows_never_take_the_exact_path(monkeypatch):
    router, emb = unit_router(16, 2, 384), unit_emb(2000, 384)
    seen = []
    real = router_module.exact_sq_dist
    monkeypatch.setattr(router_module, "exact_sq_dist", lambda a, b: seen.append(len(a)) or real(a, b))
    paths = router.route(emb)
    assert sum(seen) < 0.05 * len(emb) * router.depth        # candidates, not rows: an upper bound
    assert np.array_equal(paths.numpy(), reference_paths(router, emb))


def near_tie_case(seed=0):
    """Centroids one float32 ulp apart: float32 distances cannot order them, float64 can."""
    rng = np.random.default_rng(seed)
    dim, k = 16, 4
    base = rng.standard_normal(dim).astype(np.float32)
    base /= np.linalg.norm(base)
    c = np.repeat(base[None], k, axis=0)
    for j in range(1, k):                     # child j nudged by one ulp in a few coordinates
        idx = rng.choice(dim, 3, replace=False)
        c[j, idx] = np.nextafter(c[j, idx], np.where(rng.random(3) < 0.5, np.inf, -np.inf).astype(np.float32))
    x = base[None] + rng.standard_normal((300, dim)).astype(np.float32) * 1e-3
    return Router(branching=k, depth=1, dim=dim, centroids=[torch.from_numpy(c[None])]), x


def test_near_ties_are_decided_exactly_and_batch_independently():
    router, emb = near_tie_case()
    batch = router.route(emb)
    assert len(set(batch[:, 0].tolist())) > 1                # the ulp nudges do decide rows
    assert np.array_equal(batch.numpy(), reference_paths(router, emb))
    assert torch.equal(batch, torch.cat([router.route(x) for x in emb]))
    assert np.array_equal(numpy_twin(router).route_batch(emb), batch.numpy())


def test_exact_ties_and_bisectors_go_to_the_lowest_index():
    dim = 8
    c = torch.zeros(1, 3, dim)
    c[0, 0, 0] = c[0, 1, 1] = 1.0             # children 0 and 1 orthogonal unit vectors
    c[0, 2] = c[0, 1]                          # child 2 duplicates child 1
    router = Router(branching=3, depth=1, dim=dim, centroids=[c])
    a = np.float32(0.3)
    x = np.zeros((3, dim), dtype=np.float32)
    x[0, :2] = a                               # on the bisector: tie 0/1/2 -> 0
    x[1, :2] = [a, np.nextafter(a, np.float32(1))]       # one ulp towards child 1 (and its copy 2)
    x[2, :2] = [np.nextafter(a, np.float32(1)), a]       # one ulp towards child 0
    want = [[0], [1], [0]]
    assert router.route(x).tolist() == want
    assert numpy_twin(router).route_batch(x).tolist() == want
    assert [router.route(row).tolist()[0] for row in x] == want


def test_reduced_precision_matmul_still_routes_exactly():
    router, emb = unit_router(4, 2, 64), unit_emb(200, 64)
    want = router.route(emb)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert torch.equal(router.route(emb), want)
    finally:
        torch.set_float32_matmul_precision(before)


def test_route_refuses_nan_and_inf():
    router = random_router()
    for bad in (np.nan, np.inf):
        emb = random_emb(n=4)
        emb[2, 1] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            router.route(emb)
