"""The on-disk embedding cache (training/embeddings.py). The embedder is a stand-in: the cache
logic is what is tested here; MiniLM itself is covered by tests/unit/test_data.py (slow)."""
import numpy as np
import pytest

from training.embeddings import embed_corpus, texts_fingerprint


class CountingEmbedder:
    name, dim = "counting", 4

    def __init__(self):
        self.calls = 0

    def encode(self, texts, batch_size=64):
        self.calls += 1
        v = np.array([[len(t), t.count("a"), 1.0, i] for i, t in enumerate(texts)], np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_cache_is_reused_for_the_same_texts_and_rebuilt_for_others(tmp_path):
    texts = [f"text {i} " + "a" * i for i in range(10)]
    e = CountingEmbedder()
    first = np.array(embed_corpus(texts, tmp_path / "emb.npy", embedder=e, batch_size=3,
                                  progress=False))
    assert first.shape == (10, 4) and e.calls == 4
    again = embed_corpus(texts, tmp_path / "emb.npy", embedder=e, progress=False)
    assert e.calls == 4 and isinstance(again, np.memmap) and np.array_equal(again, first)
    embed_corpus(texts[:-1] + ["other"], tmp_path / "emb.npy", embedder=e, progress=False)
    assert e.calls == 5


def test_generator_input_is_streamed_not_materialised(tmp_path):
    texts = [f"doc {i}" for i in range(7)]
    fp, n = texts_fingerprint(iter(texts))
    e = CountingEmbedder()
    out = embed_corpus((t for t in texts), tmp_path / "emb.npy", embedder=e, batch_size=2,
                       count=n, fingerprint=fp, progress=False)
    assert out.shape == (7, 4) and e.calls == 4


def test_a_short_stream_leaves_no_cache_that_looks_complete(tmp_path):
    texts = ["a", "b", "c"]
    fp, _ = texts_fingerprint(texts)
    with pytest.raises(ValueError, match="announced"):
        embed_corpus(iter(texts), tmp_path / "emb.npy", embedder=CountingEmbedder(), count=5,
                     fingerprint=fp, progress=False)
    assert not (tmp_path / "emb.npy").exists() and not (tmp_path / "emb.json").exists()
