"""Data preparation: corpus -> tokenizer -> embeddings -> router -> packed sequences.

Everything lands in the run directory and is reused while its inputs (the data key: corpus,
seed, vocabulary, tree shape, sequence length) are unchanged:

    <run>/tokenizer.json            byte-level BPE (training/tokenizer.py)
    <run>/embeddings.npy (+ .json)  MiniLM vectors, memory-mapped (training/embeddings.py)
    <run>/router.safetensors        the hierarchical k-means router (training/cluster.py); with
                                    routing "nearest-document" it also indexes every document
    <run>/data/packed.safetensors   packed sequences with their paths (training/packing.py)
    <run>/data/meta.json            data key, data fingerprint, statistics; written last

The data fingerprint hashes the packed tensors and the router: checkpoints record it, and a
resume, an `init_from` or a merge refuses data that differs. In a data-parallel run rank 0
prepares and the other ranks wait at a barrier, then load the same files.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from membank import artifacts
from membank.config import Config
from membank.router import Router
from training.config import TrainConfig, file_sha256
from training.distributed import Dist
from training.packing import Packed, pack

DATA_FILES = (artifacts.TOKENIZER, artifacts.ROUTER, "data/packed.safetensors", "data/meta.json")
# and artifacts.STATIC_EMBEDDER when the run embeds with the static table


@dataclass
class Data:
    packed: Packed
    router: Router
    tokenizer_path: Path
    meta: dict

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]


def data_key(tc: TrainConfig, config: Config) -> dict:
    return {"corpus": file_sha256(tc.corpus) if tc.corpus else "elements", "seed": tc.seed,
            "vocab_size": config.model.vocab_size, "branching": config.memory.branching,
            "depth": config.memory.depth, "seq_len": tc.seq_len, "routing": tc.routing,
            # MiniLM runs keep the key (and the prepared data) they had before the option
            **({"embedder": tc.embedder} if tc.embedder != "minilm" else {}), "code": 1}


def prepare_data(out: Path, tc: TrainConfig, config: Config, *, dist: Dist = Dist(),
                 source: Path | None = None, log=print, store=None) -> Data:
    """Build (or reuse) the run's data; `source` is another run directory whose data may be
    copied when its key matches (subtree jobs share their base run's data); `store`, an
    EmbeddingStore (training/embeddings.py) shared with other runs."""
    key = data_key(tc, config)
    if dist.is_main and _key(out) != key:
        if source is not None and _key(source) == key:
            for name in DATA_FILES + ((artifacts.STATIC_EMBEDDER,)
                                      if tc.embedder == "static" else ()):
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, out / name)
            log(f"data: copied from {source}")
        else:
            build_data(out, tc, config, key, log, store)
    dist.barrier()
    meta = json.loads((out / "data" / "meta.json").read_text())
    return Data(Packed.load(out / "data" / "packed.safetensors"),
                Router.load(out / artifacts.ROUTER), out / artifacts.TOKENIZER, meta)


def _key(run: Path) -> dict | None:
    try:
        return json.loads((run / "data" / "meta.json").read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def build_data(out: Path, tc: TrainConfig, config: Config, key: dict, log=print,
               store=None) -> None:
    """Corpus -> tokenizer, embeddings, router, packed sequences, streaming the texts.

    A JSONL corpus is never held in memory: each stage reads the file again (a pass over 100k
    documents takes a few seconds, against minutes of embedding). Pass 1 validates and
    fingerprints the whole file (a bad line fails before anything is written); then the
    tokenizer trains from a stream, documents are tokenised in batches into one int32 array,
    embedded in batches into the on-disk memmap cache, clustered and packed.
    """
    from membank.nn.static_embed import run_embedder
    from training.cluster import build_router
    from training.data import build_documents, iter_jsonl_corpus
    from training.embeddings import embed_corpus, is_cached, texts_fingerprint
    from training.tokenizer import EOS, train_tokenizer

    if tc.corpus:
        def texts() -> Iterator[str]:
            return iter_jsonl_corpus(tc.corpus)
    else:
        element_texts = [d.text for d in build_documents(seed=tc.seed)]   # 811 short documents

        def texts() -> Iterator[str]:
            return iter(element_texts)
    texts_sha, n_docs = texts_fingerprint(tqdm(texts(), desc="read corpus", unit="doc",
                                               disable=None))
    out.mkdir(parents=True, exist_ok=True)
    (out / "data" / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(texts(), config.model.vocab_size, out / artifacts.TOKENIZER)
    eos = tokenizer.token_to_id(EOS)
    doc_tokens = DocTokens.encode(tokenizer, texts(), n_docs)
    log(f"corpus: {n_docs} documents, {doc_tokens.n_tokens:,} tokens, "
        f"vocab {tokenizer.get_vocab_size()} "
        f"(tokenizer + tokenising {time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    embedder, emb_path = run_embedder(tc.embedder, out), out / "embeddings.npy"
    cached = is_cached(emb_path, embedder, n_docs, texts_sha)
    emb = embed_corpus(texts(), emb_path, embedder=embedder, count=n_docs, fingerprint=texts_sha,
                       store=store)  # memmap
    dt = time.perf_counter() - t0
    log(f"embeddings: {n_docs} documents " + (f"reused from {emb_path}" if cached else
        f"in {dt:.1f}s ({n_docs / max(dt, 1e-9):.1f} documents/s), cached in {emb_path}"))
    t0 = time.perf_counter()
    mc = config.memory
    router = build_router(emb, mc.branching, mc.depth, seed=tc.seed, embedder=embedder.name)
    paths = np.concatenate([router.route(np.array(emb[i:i + _ROUTE_ROWS]))
                            for i in range(0, n_docs, _ROUTE_ROWS)])
    if tc.routing == "nearest-document":   # queries will take their nearest document's path
        router = router.with_index(emb, paths)
    router.save(out / artifacts.ROUTER)
    node_ids = router.node_ids(paths)
    leaf_sizes = np.bincount(node_ids[:, -1], minlength=mc.n_nodes(mc.depth))
    log(f"router: k={router.branching} depth={router.depth}, {router.routing} routing, "
        f"in {time.perf_counter() - t0:.1f}s, "
        f"documents per leaf {_summary(leaf_sizes)}")

    t0 = time.perf_counter()
    packed = pack(doc_tokens, node_ids, tc.seq_len, eos)
    (out / "data").mkdir(exist_ok=True)
    packed.save(out / "data" / "packed.safetensors")
    log(f"packed: {len(packed)} sequences of {tc.seq_len} tokens "
        f"in {time.perf_counter() - t0:.1f}s")
    meta = {"key": key, "fingerprint": fingerprint(packed, router), "documents": n_docs,
            "tokens": doc_tokens.n_tokens, "sequences": len(packed),
            "leaf_documents": leaf_sizes.tolist()}
    artifacts.atomic_write_bytes(out / "data" / "meta.json", json.dumps(meta, indent=1).encode())


# rows routed per call when labelling the corpus (a copy of this many embeddings at a time)
_ROUTE_ROWS = 1 << 16


class DocTokens:
    """Every document's token ids in one int32 array plus offsets (not one Python list per
    document: 20M tokens as Python ints would take ~700 MB). Indexing gives one document's ids
    as a list, which is what `pack` consumes."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray):
        self.ids, self.offsets = ids, offsets          # (T,) int32; (N + 1,) int64

    @classmethod
    def encode(cls, tokenizer, texts: Iterable[str], count: int,
               batch_size: int = 1024) -> "DocTokens":
        chunks, lengths = [], []
        it = iter(texts)
        with tqdm(total=count, desc="tokenise", unit="doc", disable=None) as bar:
            while batch := list(islice(it, batch_size)):
                enc = [np.asarray(e.ids, dtype=np.int32) for e in tokenizer.encode_batch(batch)]
                chunks.append(np.concatenate(enc) if enc else np.zeros(0, np.int32))
                lengths += [len(e) for e in enc]
                bar.update(len(batch))
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.concatenate(chunks) if chunks else np.zeros(0, np.int32), offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> list[int]:
        return self.ids[self.offsets[i]:self.offsets[i + 1]].tolist()


def _summary(sizes: np.ndarray) -> str:
    """Leaf sizes: all of them for a small tree, else min / median / max."""
    if len(sizes) <= 64:
        return str(sizes.tolist())
    return (f"min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()} "
            f"over {len(sizes)} leaves")


def fingerprint(packed: Packed, router: Router) -> str:
    h = hashlib.sha256()
    arrays = ([t.contiguous().numpy() for t in (packed.tokens, packed.doc_ids, packed.node_ids)]
              + router.centroids)
    if router.index is not None:
        arrays += [router.index.vectors, router.index.paths]
    for a in arrays:
        h.update(str(tuple(a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]
