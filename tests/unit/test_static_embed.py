"""The static embedder distilled from MiniLM (membank/nn/static_embed.py) and how a router's
embedder is found again on the device (membank/nn/embed.py `embedder_for`)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from membank import artifacts
from membank.nn.embed import Embedder
from membank.nn.static_embed import StaticEmbedder, distil, embedder_for, is_static, name_of

# the first word pieces only: the whole vocabulary takes about a minute
TOKENS = 3000


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("static") / artifacts.STATIC_EMBEDDER
    path.write_bytes(distil(dim=32, progress=False, max_tokens=TOKENS))
    return path


def test_distilling_is_deterministic(table_file, tmp_path):
    again = tmp_path / "again.safetensors"
    again.write_bytes(distil(dim=32, progress=False, max_tokens=TOKENS))
    a, b = StaticEmbedder.load(table_file), StaticEmbedder.load(again)
    assert a.name == b.name and np.array_equal(a.table, b.table)


def test_encode_gives_unit_rows_that_do_not_depend_on_the_batch(table_file):
    emb = StaticEmbedder.load(table_file)
    assert emb.dim == 32 and is_static(emb.name)
    assert emb.name == name_of(emb.table.astype(np.float16), emb._tok.to_str().encode())
    texts = ["the city of the river", "a new school in the north", "the", ""]
    batch = emb.encode(texts)
    assert batch.shape == (4, 32) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch[:3], axis=1), 1.0, rtol=1e-5)
    assert not batch[3].any()                            # no word pieces: a zero row
    for i, t in enumerate(texts):
        assert np.array_equal(emb.encode([t])[0], batch[i])
    # word order does not matter to a bag of pieces; the words do
    a, b, c = emb.encode(["the city of the river", "the river of the city", "a school"])
    assert np.allclose(a, b, atol=1e-6) and not np.allclose(a, c, atol=1e-2)
    with pytest.raises(TypeError):
        emb.encode("one string")


def test_load_refuses_what_is_not_a_static_embedder(tmp_path, table_file):
    from membank.router import Router

    router_file = tmp_path / "router.safetensors"
    Router(2, 1, 4, [np.ones((1, 2, 4), np.float32)]).save(router_file)
    (tmp_path / "junk").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    (tmp_path / "short").write_bytes(b"\xff\x00")
    (tmp_path / "list").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00[1,2]   ")
    for bad in (router_file, tmp_path / "junk", tmp_path / "short", tmp_path / "list"):
        with pytest.raises(ValueError, match="not a static embedder"):
            StaticEmbedder.load(bad)


def test_a_table_with_a_broken_tokenizer_is_refused(tmp_path, table_file):
    from safetensors.numpy import save

    emb = StaticEmbedder.load(table_file)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(save({"table": emb.table.astype(np.float16),
                          "tokenizer": np.frombuffer(b'{"not": "a tokenizer"}', dtype=np.uint8)},
                         metadata={"format": "membank.static-embedder/1"}))
    with pytest.raises(ValueError, match="tokenizer does not load"):
        StaticEmbedder.load(bad)


def test_embedder_for_finds_the_very_table_the_router_was_built_with(tmp_path, table_file):
    assert isinstance(embedder_for("all-MiniLM-L6-v2", tmp_path), Embedder)
    name = StaticEmbedder.load(table_file).name
    with pytest.raises(ValueError, match="missing"):
        embedder_for(name, tmp_path)
    (tmp_path / artifacts.STATIC_EMBEDDER).write_bytes(table_file.read_bytes())
    assert embedder_for(name, tmp_path).name == name
    # another table (another dim): refused, never used to route
    (tmp_path / artifacts.STATIC_EMBEDDER).write_bytes(distil(dim=16, progress=False,
                                                              max_tokens=500))
    with pytest.raises(ValueError, match="but the router was built with"):
        embedder_for(name, tmp_path)


def test_an_export_carries_its_static_table_to_the_device(tmp_path, table_file):
    from membank.config import get_preset
    from membank.nn.model import Transformer
    from membank.router import Router
    from services.model_client.memory_model import MemoryModel
    from testkit.models import TINY_TEXTS
    from training.export import export
    from training.tokenizer import train_tokenizer

    run = tmp_path / "run"
    run.mkdir()
    (run / artifacts.STATIC_EMBEDDER).write_bytes(table_file.read_bytes())
    emb = StaticEmbedder.load(run / artifacts.STATIC_EMBEDDER)
    cfg = get_preset("tiny")
    train_tokenizer(TINY_TEXTS * 4, cfg.model.vocab_size, run / artifacts.TOKENIZER)
    mc, k = cfg.memory, cfg.memory.branching
    torch.manual_seed(0)
    router = Router(k, mc.depth, emb.dim, [torch.randn(k ** l, k, emb.dim)
                                           for l in range(mc.depth)], embedder=emb.name)
    levels = [torch.randn(k ** l, *mc.block_shape(cfg.model, l)) * 0.02
              for l in range(1, mc.depth + 1)]
    model = Transformer(cfg).eval()
    with pytest.raises(ValueError, match="run directory"):
        export(tmp_path / "no-run", cfg, model, levels, run / artifacts.TOKENIZER, router,
               bank_id="test", version="v1")
    out = tmp_path / "export"
    export(out, cfg, model, levels, run / artifacts.TOKENIZER, router, bank_id="test",
           version="v1", run_dir=run)
    device = MemoryModel.from_pretrained(out)
    assert device.embedder.name == emb.name
    path = device.router.route(device.embedder.encode(["the city of the river"]))[0]
    assert path.shape == (mc.depth,)
    (out / artifacts.STATIC_EMBEDDER).write_bytes(distil(dim=emb.dim, progress=False,
                                                         max_tokens=400))
    with pytest.raises(ValueError, match="but the router was built with"):
        MemoryModel.from_pretrained(out)
