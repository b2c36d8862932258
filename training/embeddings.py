"""Corpus embeddings, computed once and cached on disk as a numpy memmap.

    emb = embed_corpus(texts, "runs/demo/embeddings.npy")     # (N, 384) float32, memory-mapped

The texts are consumed in batches from any iterable (a list, or a generator reading a JSONL
file), and each batch's vectors go straight into an `.npy` memmap: a 100k-document corpus is
never held twice in memory, and the vectors live on disk, paged in as k-means touches them.
A sidecar `.json` records the embedder, the count and a hash of the texts; a later run with the
same texts reuses the file instead of re-embedding (minutes at 100k documents on 2 cores).
The file is written under a temporary name and renamed, so an interrupted run leaves no cache
that looks complete.
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

from membank.embed import Embedder


def texts_fingerprint(texts: Iterable[str]) -> tuple[str, int]:
    """sha256 over the texts (length-prefixed, so boundaries count) and their count."""
    h, n = hashlib.sha256(), 0
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
        n += 1
    return h.hexdigest()[:32], n


def embed_corpus(texts: Iterable[str], path: str | Path, *, embedder: Embedder | None = None,
                 batch_size: int = 256, count: int | None = None, fingerprint: str | None = None,
                 progress: bool = True) -> np.ndarray:
    """(N, dim) float32 unit vectors for `texts`, memory-mapped from `path` (.npy).

    For a one-shot iterator (a generator over a file), pass `count` and `fingerprint`
    (from `texts_fingerprint` over a first pass) so the texts need not be materialised.
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
            out[row:row + len(batch)] = embedder.encode(batch, batch_size=64)
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
        return path.exists() and json.loads(sidecar.read_text()) == _meta(embedder, count, fingerprint)
    except (OSError, ValueError):
        return False


def _meta(embedder, count: int, fingerprint: str) -> dict:
    return {"embedder": embedder.name, "dim": embedder.dim, "count": count, "texts_sha256": fingerprint}
