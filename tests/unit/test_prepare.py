"""Data preparation streams a JSONL corpus (training/prepare.py): the same packed data as
tokenising and packing the whole list, without ever materialising the texts. The embedder is a
stand-in (MiniLM itself is covered by tests/unit/test_data.py, slow)."""
import json

import numpy as np
import pytest
import torch

import training.data
from training.config import load_train_config
from training.data import iter_jsonl_corpus
from training.packing import pack
from training.prepare import DocTokens, prepare_data
from training.tokenizer import EOS, load_tokenizer

QUIET = dict(log=lambda *a: None)


class StubEmbedder:
    """Deterministic unit vectors from letter counts: similar texts land near each other."""
    name, dim = "stub", 8

    def encode(self, texts, batch_size=64, progress=False):
        v = np.array([[t.count(c) for c in "aeiostnr"] for t in texts], np.float32) + 1e-3
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_corpus(path, n=60, bad_line=None):
    with path.open("w") as f:
        for i in range(n):
            if i == bad_line:
                f.write("{not json\n")
            f.write(json.dumps({"text": f"document {i}: " + "tin iron neon " * (i % 7)
                                        + "a" * (i % 5)}) + "\n")
            if i % 13 == 0:
                f.write("\n")          # blank lines are skipped
    return path


@pytest.fixture
def stub_embedder(monkeypatch):
    monkeypatch.setattr("membank.nn.embed.Embedder", StubEmbedder)


def test_a_jsonl_corpus_is_streamed_and_packed_like_the_whole_list(tmp_path, monkeypatch,
                                                                   stub_embedder):
    corpus = write_corpus(tmp_path / "c.jsonl")

    def refuse(path):
        raise AssertionError("build_data must stream the corpus, not read it into a list")
    monkeypatch.setattr(training.data, "read_jsonl_corpus", refuse)
    tc = load_train_config("tiny", [f"corpus={corpus}"])
    data = prepare_data(tmp_path / "run", tc, tc.model_config(), **QUIET)

    texts = list(iter_jsonl_corpus(corpus))
    tok = load_tokenizer(data.tokenizer_path)
    ids = [e.ids for e in tok.encode_batch(texts)]
    nodes = data.router.node_ids(data.router.route(StubEmbedder().encode(texts)))
    want = pack(ids, nodes, tc.seq_len, tok.token_to_id(EOS))
    for name in ("tokens", "doc_ids", "node_ids"):
        assert torch.equal(getattr(data.packed, name), getattr(want, name))
    assert data.meta["documents"] == len(texts) == 60
    assert data.meta["tokens"] == sum(map(len, ids))
    emb = np.load(tmp_path / "run" / "embeddings.npy", mmap_mode="r")
    assert np.array_equal(emb, StubEmbedder().encode(texts))


def test_a_bad_line_fails_before_anything_is_written(tmp_path, stub_embedder):
    corpus = write_corpus(tmp_path / "c.jsonl", bad_line=40)
    tc = load_train_config("tiny", [f"corpus={corpus}"])
    with pytest.raises(ValueError, match=r"line 45 is not JSON"):
        prepare_data(tmp_path / "run", tc, tc.model_config(), **QUIET)
    assert not (tmp_path / "run" / "tokenizer.json").exists()


def test_doc_tokens_hold_one_array_and_index_like_lists():
    tok_lists = [[5, 6, 7], [], [8], [9, 10]]

    class Enc:
        def __init__(self, ids):
            self.ids = ids

    class FakeTokenizer:
        def encode_batch(self, batch):
            return [Enc(tok_lists[int(t)]) for t in batch]

    dt = DocTokens.encode(FakeTokenizer(), iter(["0", "1", "2", "3"]), 4, batch_size=3)
    assert dt.ids.dtype == np.int32 and dt.n_tokens == 6 and len(dt) == 4
    assert [dt[i] for i in range(4)] == tok_lists


def test_a_static_embedder_run_routes_with_its_own_table(tmp_path):
    """embedder=static: the run's table embeds the documents, the router records its name, and
    a run that copies this run's data copies the table too."""
    from membank import artifacts
    from membank.nn.static_embed import StaticEmbedder, distil

    corpus = write_corpus(tmp_path / "c.jsonl")
    run = tmp_path / "run"
    run.mkdir()
    # a small table placed first (build() keeps a valid file): the whole vocabulary takes a minute
    (run / artifacts.STATIC_EMBEDDER).write_bytes(distil(dim=16, progress=False, max_tokens=3000))
    table = StaticEmbedder.load(run / artifacts.STATIC_EMBEDDER)
    tc = load_train_config("tiny", [f"corpus={corpus}", "embedder=static"])
    data = prepare_data(run, tc, tc.model_config(), **QUIET)
    assert data.router.embedder == table.name and data.router.dim == 16
    emb = np.load(run / "embeddings.npy", mmap_mode="r")
    assert np.array_equal(emb, table.encode(list(iter_jsonl_corpus(corpus))))
    copy = prepare_data(tmp_path / "copy", tc, tc.model_config(), source=run, **QUIET)
    assert copy.router.embedder == table.name
    assert (tmp_path / "copy" / artifacts.STATIC_EMBEDDER).read_bytes() == \
        (run / artifacts.STATIC_EMBEDDER).read_bytes()
