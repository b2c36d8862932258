"""Unit tests for membank/router.py: greedy descent, nearest-document routing, blocked routing,
node ids, the safetensors file; batched routing (matmul + exact near-ties) equals row-by-row.

Run: .venv/bin/python -m pytest -q tests/unit/test_router.py
"""
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save

import membank.router as router_module
from membank.router import Router, RouterFormatError

K, DEPTH, DIM = 3, 3, 8


def random_router(k=K, depth=DEPTH, dim=DIM, seed=0) -> Router:
    rng = np.random.default_rng(seed)
    centroids = [rng.standard_normal((k ** (l - 1), k, dim)).astype(np.float32)
                 for l in range(1, depth + 1)]
    return Router(branching=k, depth=depth, dim=dim, centroids=centroids)


def random_emb(n=50, dim=DIM, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def indexed_router(n_docs=300, k=4, depth=2, dim=16, seed=0) -> tuple[Router, np.ndarray]:
    """A router over unit vectors with a document index of n_docs random unit documents."""
    router = unit_router(k, depth, dim, seed)
    docs = unit_emb(n_docs, dim, seed + 5)
    return router.with_index(docs, router.route(docs)), docs


def test_route_shape_and_range():
    paths = random_router().route(random_emb())
    assert paths.shape == (50, DEPTH) and paths.dtype == np.int64
    assert paths.min() >= 0 and paths.max() < K


def test_route_is_deterministic_and_survives_save_load(tmp_path):
    router, emb = random_router(), random_emb()
    first = router.route(emb)
    assert np.array_equal(first, router.route(emb))
    router.save(tmp_path / "router.safetensors")
    assert np.array_equal(first, Router.load(tmp_path / "router.safetensors").route(emb))


def test_batch_route_equals_row_by_row():
    router, emb = random_router(), random_emb(n=40)
    batch = router.route(emb)
    for i in range(len(emb)):
        assert np.array_equal(batch[i:i + 1], router.route(emb[i]))        # (dim,) input
        assert np.array_equal(batch[i:i + 1], router.route(emb[i:i + 1]))  # (1, dim) input
        assert router.path(emb[i]) == batch[i].tolist()


def test_route_accepts_numpy_torch_and_float64():
    torch = pytest.importorskip("torch")
    router, emb = random_router(), random_emb()
    assert np.array_equal(router.route(emb), router.route(torch.from_numpy(emb)))
    assert np.array_equal(router.route(emb), router.route(emb.astype(np.float64)))


def test_greedy_descent_picks_nearest_child_at_every_level():
    router, emb = random_router(), random_emb(n=100)
    paths = router.route(emb)
    for x, path in zip(emb.astype(np.float64), paths):
        node = 0
        for level in range(DEPTH):
            # (k,)
            dist = ((router.centroids[level][node].astype(np.float64) - x) ** 2).sum(axis=1)
            assert path[level] == int(np.argmin(dist))
            node = node * K + path[level]


def test_ties_go_to_the_lowest_index():
    c = np.zeros((1, 4, DIM), dtype=np.float32)
    c[0, 2] = 1.0  # children 0, 1, 3 coincide at the origin
    router = Router(branching=4, depth=1, dim=DIM, centroids=[c])
    assert router.route(np.zeros(DIM, dtype=np.float32)).tolist() == [[0]]
    assert router.route(np.ones(DIM, dtype=np.float32)).tolist() == [[2]]


def test_node_ids():
    router = random_router()
    paths = np.array([[0, 0, 0], [2, 1, 0], [1, 2, 2]])
    assert router.node_ids(paths).tolist() == [[0, 0, 0], [2, 7, 21], [1, 5, 17]]
    with pytest.raises(ValueError):
        router.node_ids(np.array([[0, 3, 0]]))


def test_route_rejects_wrong_dim():
    with pytest.raises(ValueError):
        random_router().route(np.zeros((2, DIM + 1), dtype=np.float32))


def test_save_load_round_trip_is_exact(tmp_path):
    router = random_router()
    router.embedder = "test-embedder"
    router.save(tmp_path / "r.safetensors")
    loaded = Router.load(tmp_path / "r.safetensors")
    assert ((loaded.branching, loaded.depth, loaded.dim, loaded.embedder)
            == (K, DEPTH, DIM, "test-embedder"))
    assert loaded.routing == "centroid" and loaded.index is None
    for a, b in zip(router.centroids, loaded.centroids):
        assert np.array_equal(a, b)
    assert Router.from_bytes(router.to_bytes()).routing == "centroid"


def test_written_file_is_safetensors_the_library_reads(tmp_path):
    # membank/ writes the format by hand (the server installs without safetensors): the library
    # must read it back, tensors and metadata, and the bytes must not depend on the run
    router, _ = indexed_router()
    router.save(tmp_path / "r.safetensors")
    assert (tmp_path / "r.safetensors").read_bytes() == router.to_bytes()
    with safe_open(tmp_path / "r.safetensors", "numpy") as f:
        assert f.metadata()["routing"] == "nearest-document"
        assert np.array_equal(f.get_tensor("index.paths"), router.index.paths)
        for l, c in enumerate(router.centroids, start=1):
            assert np.array_equal(f.get_tensor(f"centroids.{l}"), c)


def test_constructor_rejects_bad_shapes():
    with pytest.raises(ValueError):
        Router(branching=2, depth=2, dim=4, centroids=[np.zeros((1, 2, 4)), np.zeros((1, 2, 4))])


# -- nearest-document routing -----------------------------------------------------------------
def test_nearest_document_routing_takes_the_nearest_documents_path():
    router, docs = indexed_router()
    assert router.routing == "nearest-document"
    q = unit_emb(200, 16, seed=9)
    want = [int(np.argmin(((docs.astype(np.float16).astype(np.float64) - x) ** 2).sum(axis=1)))
            for x in q.astype(np.float64)]
    assert router.nearest_documents(q).tolist() == want
    assert np.array_equal(router.route(q), router.index.paths[want])
    # a training document routes to its own path (its stored vector is its nearest)
    assert np.array_equal(router.route(docs), router.route(docs, routing="centroid"))


def test_nearest_document_routing_is_batch_independent_and_survives_save_load(tmp_path):
    router, _ = indexed_router(n_docs=700)
    q = unit_emb(600, 16, seed=3)
    batch = router.route(q)
    assert np.array_equal(batch, np.concatenate([router.route(x) for x in q]))
    assert np.array_equal(batch[:9], router.route(q[:9]))
    router.save(tmp_path / "r.safetensors")
    loaded = Router.load(tmp_path / "r.safetensors")
    assert loaded.routing == "nearest-document" and len(loaded.index.vectors) == 700
    assert np.array_equal(loaded.route(q), batch)
    # the paper's rule stays available on an indexed router
    assert np.array_equal(loaded.route(q, routing="centroid"), unit_router(4, 2, 16).route(q))


def test_nearest_document_ties_go_to_the_first_document():
    router = unit_router(2, 1, 4)
    docs = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32)
    r = router.with_index(docs, np.array([[1], [0], [0]]))
    assert r.nearest_documents(docs[:1]).tolist() == [0]
    assert r.route(docs[:1]).tolist() == [[1]]


def test_blocked_routing_avoids_the_level1_node_under_both_rules():
    router, docs = indexed_router(n_docs=400)
    q = unit_emb(300, 16, seed=4)
    for rule in ("centroid", "nearest-document"):
        best = router.route(q, routing=rule)
        blocked = router.route(q, routing=rule, avoid_level1=best[:, 0])
        assert (blocked[:, 0] != best[:, 0]).all()
    # descent: the next-best level-1 child, then the usual descent below it
    best = router.route(q, routing="centroid")
    blocked = router.route(q, routing="centroid", avoid_level1=best[:, 0])
    d1 = ((router.centroids[0][0][None].astype(np.float64)
           - q[:, None].astype(np.float64)) ** 2).sum(-1)
    d1[np.arange(len(q)), best[:, 0]] = np.inf
    assert blocked[:, 0].tolist() == d1.argmin(1).tolist()
    # nearest document: the nearest one outside the subtree
    rows = router.nearest_documents(q, avoid_level1=best[:, 0])
    assert (router.index.paths[rows, 0] != best[:, 0]).all()


def test_routing_without_an_index_refuses_nearest_document():
    with pytest.raises(ValueError, match="no document index"):
        random_router().route(random_emb(), routing="nearest-document")
    with pytest.raises(ValueError, match="routing must be"):
        random_router().route(random_emb(), routing="knn")


# -- files --------------------------------------------------------------------------------------
def _bytes(tensors, metadata):
    return save(tensors, metadata=metadata)


@pytest.mark.parametrize("case", ["garbage", "truncated", "no_metadata", "wrong_shape",
                                  "missing_level", "extra_tensor", "bad_int", "wrong_dtype", "nan",
                                  "bad_routing", "index_missing", "index_bad_path",
                                  "index_wrong_dtype", "index_nan"])
def test_load_malformed_raises_value_error(tmp_path, case):
    good = random_router(k=2, depth=2, dim=4)
    meta = {"format": "membank.router/1", "k": "2", "depth": "2", "dim": "4", "embedder": "x"}
    t1, t2 = good.centroids
    idx_meta = {**meta, "routing": "nearest-document"}
    vec, paths = np.zeros((3, 4), np.float16), np.zeros((3, 2), np.int32)
    raw = {
        "garbage": lambda: b"this is not a safetensors file",
        "truncated": lambda: good.to_bytes()[:-7],
        "no_metadata": lambda: _bytes({"centroids.1": t1, "centroids.2": t2}, None),
        "wrong_shape": lambda: _bytes({"centroids.1": t1,
                                       "centroids.2": np.zeros((2, 2, 5), np.float32)}, meta),
        "missing_level": lambda: _bytes({"centroids.1": t1}, meta),
        "extra_tensor": lambda: _bytes({"centroids.1": t1, "centroids.2": t2,
                                        "centroids.3": t2.copy()}, meta),
        "bad_int": lambda: _bytes({"centroids.1": t1, "centroids.2": t2}, {**meta, "k": "two"}),
        "wrong_dtype": lambda: _bytes({"centroids.1": t1.astype(np.float64), "centroids.2": t2},
                                      meta),
        "nan": lambda: _bytes({"centroids.1": t1, "centroids.2": np.full_like(t2, np.nan)}, meta),
        "bad_routing": lambda: _bytes({"centroids.1": t1, "centroids.2": t2},
                                      {**meta, "routing": "knn"}),
        "index_missing": lambda: _bytes({"centroids.1": t1, "centroids.2": t2}, idx_meta),
        "index_bad_path": lambda: _bytes({"centroids.1": t1, "centroids.2": t2,
                                          "index.vectors": vec, "index.paths": paths + 2},
                                         idx_meta),
        "index_wrong_dtype": lambda: _bytes({"centroids.1": t1, "centroids.2": t2,
                                             "index.vectors": vec.astype(np.float32),
                                             "index.paths": paths}, idx_meta),
        "index_nan": lambda: _bytes({"centroids.1": t1, "centroids.2": t2,
                                     "index.vectors": vec + np.nan, "index.paths": paths},
                                    idx_meta),
    }[case]()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    for load in (lambda: Router.load(path), lambda: Router.from_bytes(raw)):
        with pytest.raises(RouterFormatError) as err:
            load()
        assert "\n" not in str(err.value)


def test_load_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        Router.load(tmp_path / "absent.safetensors")


# -- batched routing: fast path (matmul + margin) and exact near-ties -------------------------
def unit_router(k, depth, dim, seed=0, scale=0.5) -> Router:
    """Centroids of norm `scale`, the regime of k-means centroids over unit embeddings."""
    rng = np.random.default_rng(seed)
    cs = []
    for l in range(depth):
        c = rng.standard_normal((k ** l, k, dim)).astype(np.float32)
        cs.append(c / np.linalg.norm(c, axis=-1, keepdims=True) * scale)
    return Router(branching=k, depth=depth, dim=dim, centroids=cs)


def unit_emb(n, dim, seed=1) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_paths(router: Router, emb: np.ndarray) -> np.ndarray:
    """Row by row, float64 distances with numpy's own (pairwise) sum: the nearest child."""
    out = np.zeros((len(emb), router.depth), dtype=np.int64)
    for i, x in enumerate(emb.astype(np.float64)):
        node = 0
        for level in range(router.depth):
            d = ((router.centroids[level][node].astype(np.float64) - x) ** 2).sum(axis=1)
            out[i, level] = int(np.argmin(d))
            node = node * router.branching + out[i, level]
    return out


@pytest.mark.parametrize("k,depth", [(4, 3), (16, 2)])
def test_big_batch_equals_row_by_row(k, depth):
    router, emb = unit_router(k, depth, 384), unit_emb(600, 384)
    batch = router.route(emb)
    assert np.array_equal(batch, np.concatenate([router.route(x) for x in emb]))
    assert np.array_equal(batch, router.route(emb[::-1].copy())[::-1])   # order in the batch
    assert np.array_equal(batch[:7], router.route(emb[:7]))              # other batch sizes
    assert np.array_equal(Router.from_bytes(router.to_bytes()).route(emb), batch)


def test_most_random_rows_never_take_the_exact_path(monkeypatch):
    router, emb = unit_router(16, 2, 384), unit_emb(2000, 384)
    seen = []
    real = router_module.exact_sq_dist
    monkeypatch.setattr(router_module, "exact_sq_dist",
                        lambda a, b: seen.append(len(a)) or real(a, b))
    paths = router.route(emb)
    assert sum(seen) < 0.05 * len(emb) * router.depth        # candidates, not rows: an upper bound
    assert np.array_equal(paths, reference_paths(router, emb))


def test_exact_sq_dist_sums_left_to_right_on_both_paths():
    """Few pairs take cumsum, many the slab of one vector add per dimension: the same bits,
    and the same as a sequential float64 sum written out."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((1500, 384)).astype(np.float32)
    b = (rng.standard_normal((1500, 384)) * 0.3).astype(np.float32)
    sq = np.square(b.astype(np.float64) - a.astype(np.float64))
    want = np.cumsum(sq, axis=-1)[:, -1]
    assert np.array_equal(router_module.exact_sq_dist(a, b), want)        # slab path
    for i in range(0, 1500, 97):                                          # cumsum path
        assert np.array_equal(router_module.exact_sq_dist(a[i:i + 1], b[i:i + 1]), want[i:i + 1])
    acc = 0.0
    for term in sq[7]:
        acc += float(term)
    assert router_module.exact_sq_dist(a, b)[7] == acc


def near_tie_case(seed=0):
    """Centroids one float32 ulp apart: float32 distances cannot order them, float64 can."""
    rng = np.random.default_rng(seed)
    dim, k = 16, 4
    base = rng.standard_normal(dim).astype(np.float32)
    base /= np.linalg.norm(base)
    c = np.repeat(base[None], k, axis=0)
    for j in range(1, k):                     # child j nudged by one ulp in a few coordinates
        idx = rng.choice(dim, 3, replace=False)
        c[j, idx] = np.nextafter(c[j, idx],
                                 np.where(rng.random(3) < 0.5, np.inf, -np.inf).astype(np.float32))
    x = base[None] + rng.standard_normal((300, dim)).astype(np.float32) * 1e-3
    return Router(branching=k, depth=1, dim=dim, centroids=[c[None]]), x


def test_near_ties_are_decided_exactly_and_batch_independently():
    router, emb = near_tie_case()
    batch = router.route(emb)
    assert len(set(batch[:, 0].tolist())) > 1                # the ulp nudges do decide rows
    assert np.array_equal(batch, reference_paths(router, emb))
    assert np.array_equal(batch, np.concatenate([router.route(x) for x in emb]))


def test_exact_ties_and_bisectors_go_to_the_lowest_index():
    dim = 8
    c = np.zeros((1, 3, dim), dtype=np.float32)
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
    assert [router.route(row).tolist()[0] for row in x] == want


def test_route_refuses_nan_and_inf():
    router = random_router()
    for bad in (np.nan, np.inf):
        emb = random_emb(n=4)
        emb[2, 1] = bad
        with pytest.raises(ValueError, match="NaN or inf"):
            router.route(emb)


def test_the_router_module_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, membank.router; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
