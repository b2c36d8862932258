"""Corpus embeddings, computed once and cached on disk as a numpy memmap.

    emb = embed_corpus(texts, "runs/demo/embeddings.npy")     # (N, 384) float32, memory-mapped

The texts are consumed in batches from any iterable (a list, or a generator reading a JSONL
file), and each batch's vectors go straight into an `.npy` memmap: a 100k-document corpus is
never held twice in memory, and the vectors live on disk, paged in as k-means touches them.
A sidecar `.json` records the embedder, the count and a hash of the texts; a later run with the
same texts reuses the file instead of re-embedding (BENCHMARKS.md: embedding dominates a
100k-document corpus's preparation).
The file is written under a temporary name and renamed, so an interrupted run leaves no cache
that looks complete.

Runs that share texts (the seeds of an evaluation draw overlapping corpora) can also share an
`EmbeddingStore`: vectors by the text's sha256, so a text is embedded once across all of them.
That changes no result: `Embedder.encode` gives a text the same bits whatever it is batched with.
"""
from __future__ import annotations

import hashlib
import json
import os
from itertools import islice
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from membank.nn.embed import Embedder


def texts_fingerprint(texts: Iterable[str]) -> tuple[str, int]:
    """sha256 over the texts (length-prefixed, so boundaries count) and their count."""
    h, n = hashlib.sha256(), 0
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        n += 1
    return h.hexdigest()[:32], n


class EmbeddingStore:
    """Vectors by text, append-only on disk: DIR/EMBEDDER/part-NNNNN.{vec,key}.npy.

    A part's vectors (n, dim) float32 are written first and its keys (n, 16) uint8 (sha256
    prefixes of the texts) last, each under a temporary name and renamed: a part without its
    keys file is ignored, so an interrupted run loses at most what it had not finished."""

    def __init__(self, root: str | Path, embedder: Embedder):
        self.dir = Path(root) / embedder.name
        self.name, self.dim = embedder.name, embedder.dim
        self._rows: dict[bytes, tuple[int, int]] = {}     # key -> (part, row)
        self._parts: list[np.ndarray] = []
        for keys_path in sorted(self.dir.glob("part-*.key.npy")):
            vectors = np.load(keys_path.with_name(keys_path.name.replace(".key.", ".vec.")),
                              mmap_mode="r")
            self._add_part(np.load(keys_path), vectors)

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.sha256(text.encode("utf-8")).digest()[:16]

    def _add_part(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        part = len(self._parts)
        self._parts.append(vectors)
        for row, k in enumerate(keys):
            self._rows.setdefault(k.tobytes(), (part, row))

    def __len__(self) -> int:
        return len(self._rows)

    def lookup(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        """(len(texts), dim) vectors (zeros where missing) and the indices of the missing texts."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        missing = []
        for i, t in enumerate(texts):
            hit = self._rows.get(self.key(t))
            if hit is None:
                missing.append(i)
            else:
                out[i] = self._parts[hit[0]][hit[1]]
        return out, missing

    def add(self, texts: list[str], vectors: np.ndarray) -> None:
        """Store the vectors of texts (one new part)."""
        if not texts:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        keys = np.frombuffer(b"".join(self.key(t) for t in texts), dtype=np.uint8).reshape(-1, 16)
        base = self.dir / f"part-{len(self._parts):05d}"
        vec_path, key_path = Path(f"{base}.vec.npy"), Path(f"{base}.key.npy")
        for target, array in ((vec_path, np.ascontiguousarray(vectors, dtype=np.float32)),
                              (key_path, keys)):
            tmp = target.with_name(target.name + ".tmp.npy")
            np.save(tmp, array)
            os.replace(tmp, target)
        self._add_part(keys, np.load(vec_path, mmap_mode="r"))

    def encode(self, texts: list[str], embedder: Embedder) -> np.ndarray:
        """Vectors for texts: stored ones read, the others embedded (and stored)."""
        out, missing = self.lookup(texts)
        if missing:
            new = embedder.encode([texts[i] for i in missing], batch_size=64)
            out[missing] = new
            # a part holds each text once
            unique = {texts[i]: row for row, i in enumerate(missing)}
            self.add(list(unique), new[list(unique.values())])
        return out


def embed_corpus(texts: Iterable[str], path: str | Path, *, embedder: Embedder | None = None,
                 batch_size: int = 256, count: int | None = None, fingerprint: str | None = None,
                 progress: bool = True, store: EmbeddingStore | None = None) -> np.ndarray:
    """(N, dim) float32 unit vectors for `texts`, memory-mapped from `path` (.npy).

    For a one-shot iterator (a generator over a file), pass `count` and `fingerprint`
    (from `texts_fingerprint` over a first pass) so the texts need not be materialised.
    With a `store`, texts it holds are not embedded again.
    """
    path = Path(path)
    embedder = embedder or Embedder()
    if count is None or fingerprint is None:
        texts = list(texts)
        fingerprint, count = texts_fingerprint(texts)
    meta = _meta(embedder, count, fingerprint)
    sidecar = path.with_suffix(".json")
    if is_cached(path, embedder, count, fingerprint):
        return np.load(path, mmap_mode="r")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, embedder.dim))
    it, row = iter(texts), 0
    with tqdm(total=count, desc="embed", unit="doc", disable=not progress) as bar:
        while batch := list(islice(it, batch_size)):
            if row + len(batch) > count:
                raise ValueError(f"got more than the {count} texts announced")
            out[row:row + len(batch)] = (store.encode(batch, embedder)
                                         if store is not None and store.name == embedder.name
                                         else embedder.encode(batch, batch_size=64))
            row += len(batch)
            bar.update(len(batch))
    if row != count:
        raise ValueError(f"got {row} texts, {count} announced")
    out.flush()
    del out
    os.replace(tmp, path)
    tmp_meta = sidecar.with_name(sidecar.name + ".tmp")
    tmp_meta.write_text(json.dumps(meta))
    os.replace(tmp_meta, sidecar)
    return np.load(path, mmap_mode="r")


def is_cached(path: str | Path, embedder, count: int, fingerprint: str) -> bool:
    """Whether `path` holds the finished embeddings of these texts by this embedder."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    try:
        return (path.exists()
                and json.loads(sidecar.read_text()) == _meta(embedder, count, fingerprint))
    except (OSError, ValueError):
        return False


def _meta(embedder, count: int, fingerprint: str) -> dict:
    return {"embedder": embedder.name, "dim": embedder.dim, "count": count,
            "texts_sha256": fingerprint}
