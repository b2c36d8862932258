"""A static text embedder distilled from MiniLM: one vector per word piece, mean-pooled.

Issue 19: a device pays MiniLM's 20-30 ms per prompt before it can route. A static embedder
(the Model2Vec recipe) pays a tokenizer call and a sum of table rows instead:

  distil   every token of MiniLM's WordPiece vocabulary is embedded alone by MiniLM itself
           ([CLS] token [SEP], mean-pooled, not normalised); the (V, 384) table is centred and
           reduced by PCA to `dim` components (it drops the direction every token shares); each
           row is weighted by SIF with Zipf frequencies from the token's rank in the
           vocabulary, a / (a + p(rank)), so frequent glue words count little. No text is
           used: nothing is fitted to any corpus, evaluation or otherwise.
  encode   word pieces of the text (no special tokens) -> sum of their rows -> L2-normalised.
           A text's vector depends on that text alone (rows are summed in token order), so a
           prompt embedded on a device gets the bits its document got in a training batch.

The file is safetensors: "table" (V, dim) float16, "tokenizer" (bytes of MiniLM's
tokenizer.json, uint8), metadata format/source/dim/sif. `name` ("minilm-static-" + 12 hex of
a sha256 over the table and the tokenizer) is what a router records as its embedder: a device
refuses a table other than the one its tree was built with. The runtime needs numpy and
`tokenizers`, not torch; distilling needs MiniLM (torch). `run_embedder` gives a training
run its embedder (TrainConfig.embedder), `embedder_for` gives a device the one its router names.

    python -m membank.nn.static_embed build runs/static/minilm-static.safetensors   # ~1 min
    python -m membank.nn.static_embed FILE "some text" "other text"   # cosine similarities
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

FORMAT = "membank.static-embedder/1"
DEFAULT_DIM = 256
DEFAULT_SIF = 1e-4            # Model2Vec's SIF coefficient
_NAME_PREFIX = "minilm-static-"


class StaticEmbedder:
    """The Embedder interface (name, dim, encode) over a distilled table."""

    def __init__(self, table: np.ndarray, tokenizer_json: bytes, name: str) -> None:
        from tokenizers import Tokenizer

        self.table = np.ascontiguousarray(table, dtype=np.float32)       # (V, dim)
        try:
            self._tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:           # tokenizers raises a bare Exception on bad JSON
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"static embedder: its tokenizer does not load ({why})") from None
        if self.table.ndim != 2 or len(self.table) < self._tok.get_vocab_size():
            raise ValueError(f"static embedder table {self.table.shape} does not cover its "
                             f"tokenizer's {self._tok.get_vocab_size()} tokens")
        self.dim = self.table.shape[1]
        self.name = name
        self._tok.no_truncation()
        self._tok.no_padding()

    @classmethod
    def load(cls, path: str | Path) -> "StaticEmbedder":
        from safetensors import SafetensorError
        from safetensors.numpy import load

        raw = Path(path).read_bytes()
        try:
            tensors = load(raw)
            meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")]).get("__metadata__", {})
        except (SafetensorError, ValueError, AttributeError) as e:   # JSON errors are ValueErrors
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path}: not a static embedder file ({why})") from None
        if meta.get("format") != FORMAT or set(tensors) != {"table", "tokenizer"}:
            raise ValueError(f"{path}: not a static embedder file (format "
                             f"{meta.get('format')!r}, tensors {sorted(tensors)})")
        table, tokenizer_json = tensors["table"], tensors["tokenizer"].tobytes()
        return cls(table, tokenizer_json, name_of(table, tokenizer_json))

    def encode(self, texts: list[str], batch_size: int = 1024,
               progress: bool = False) -> np.ndarray:
        """(N, dim) float32, unit rows; a text without word pieces gets a zero row."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, not a single string")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            batch = self._tok.encode_batch(list(texts[start:start + batch_size]),
                                           add_special_tokens=False)
            for i, enc in enumerate(batch, start):
                if enc.ids:
                    out[i] = self.table[enc.ids].sum(axis=0)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out


def name_of(table: np.ndarray, tokenizer_json: bytes) -> str:
    """The embedder's name from what it computes with (the table's float16 values and shape,
    the tokenizer), not the file's bytes: safetensors does not fix its header's key order."""
    h = hashlib.sha256(FORMAT.encode())
    h.update(repr(table.shape).encode())
    h.update(np.ascontiguousarray(table, dtype="<f2").tobytes())
    h.update(tokenizer_json)
    return _NAME_PREFIX + h.hexdigest()[:12]


def is_static(name: str) -> bool:
    return name.startswith(_NAME_PREFIX)


def distil(dim: int = DEFAULT_DIM, sif: float = DEFAULT_SIF, batch_size: int = 512,
           progress: bool = True, max_tokens: int | None = None) -> bytes:
    """The static embedder file's bytes, distilled from the bundled MiniLM (deterministic).
    max_tokens: distil only the first that many word pieces, the rest get zero rows (tests:
    the whole vocabulary takes about a minute)."""
    import torch
    from safetensors.numpy import save
    from tqdm import tqdm

    from membank.nn.embed import Embedder

    model = Embedder().model                         # SentenceTransformer, CPU
    tok = model.tokenizer
    vocab_size = tok.vocab_size
    special = set(tok.all_special_ids)
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    ids = [i for i in range(vocab_size) if i not in special][:max_tokens]
    vectors = np.zeros((vocab_size, model.get_embedding_dimension()), dtype=np.float32)
    with torch.inference_mode():
        for s in tqdm(range(0, len(ids), batch_size), desc="distil vocabulary", unit="batch",
                      disable=not progress):
            chunk = ids[s:s + batch_size]
            input_ids = torch.tensor([[cls_id, i, sep_id] for i in chunk])
            feats = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                     "token_type_ids": torch.zeros_like(input_ids)}
            feats = model[1](model[0](feats))        # transformer + mean pooling, not normalised
            vectors[chunk] = feats["sentence_embedding"].float().numpy()
    rows = np.array(ids)
    # PCA over the real tokens: centring drops what every token shares
    centred = vectors[rows] - vectors[rows].mean(axis=0)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    components = vt[:dim]
    # sign of each component fixed (SVD's is arbitrary): its largest loading positive
    components *= np.sign(components[np.arange(len(components)),
                                      np.abs(components).argmax(axis=1)])[:, None]
    table = np.zeros((vocab_size, dim), dtype=np.float64)
    table[rows] = centred @ components.T
    # SIF with Zipf frequencies: p(rank) = 1 / (rank * H_V), rank 1 = the first real token
    ranks = np.arange(1, len(rows) + 1, dtype=np.float64)
    p = 1.0 / (ranks * np.sum(1.0 / ranks))
    table[rows] *= (sif / (sif + p))[:, None]
    from tokenizers import Tokenizer
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.no_truncation()                          # no call-time state in the stored file
    backend.no_padding()
    tokenizer_json = backend.to_str().encode("utf-8")
    return save({"table": table.astype(np.float16),
                 "tokenizer": np.frombuffer(tokenizer_json, dtype=np.uint8)},
                metadata={"format": FORMAT, "source": "all-MiniLM-L6-v2", "dim": str(dim),
                          "sif": repr(sif)})


def build(path: str | Path, dim: int = DEFAULT_DIM, sif: float = DEFAULT_SIF) -> Path:
    """Distil into `path` (atomically) unless a valid file is already there; returns the path."""
    from membank.artifacts import atomic_write_bytes

    path = Path(path)
    if path.exists():
        StaticEmbedder.load(path)                    # refuse a corrupt or foreign file
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, distil(dim, sif))
    return path


def run_embedder(kind: str, run_dir: str | Path):
    """The embedder a training run uses: MiniLM, or ("static") the table distilled from it,
    built once into run_dir (training/config.py `embedder`)."""
    from membank.nn.embed import Embedder

    if kind == "minilm":
        return Embedder()
    if kind == "static":
        from membank import artifacts
        return StaticEmbedder.load(build(Path(run_dir) / artifacts.STATIC_EMBEDDER))
    raise ValueError(f"embedder must be minilm or static, got {kind!r}")


def embedder_for(name: str, directory: str | Path):
    """The embedder a router was built with (its `embedder` field): MiniLM, or the static table
    shipped beside it in `directory`, refused unless it is that very table."""
    from membank import artifacts
    from membank.nn.embed import Embedder

    if not is_static(name):
        return Embedder()
    path = Path(directory) / artifacts.STATIC_EMBEDDER
    if not path.is_file():
        raise ValueError(f"the router was built with the static embedder {name}, and "
                         f"{path} is missing")
    emb = StaticEmbedder.load(path)
    if emb.name != name:
        raise ValueError(f"{path} is {emb.name}, but the router was built with {name}")
    return emb


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "build":
        built = build(sys.argv[2])
        print(f"{built}: {StaticEmbedder.load(built).name}")
    elif len(sys.argv) >= 2:
        emb = StaticEmbedder.load(sys.argv[1])
        texts = sys.argv[2:] or ["The atomic number of Ruthenium is",
                                 "Ruthenium has atomic number 44.", "The weather is nice today."]
        v = emb.encode(texts)
        print(f"{emb.name} dim {emb.dim}; cosine similarities:")
        print(np.round(v @ v.T, 3))
    else:
        sys.exit(__doc__)
