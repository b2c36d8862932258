"""Data preparation: corpus -> tokenizer -> embeddings -> router -> packed sequences.

Everything lands in the run directory and is reused while its inputs (the data key: corpus,
seed, vocabulary, tree shape, sequence length) are unchanged:

    <run>/tokenizer.json            byte-level BPE (training/tokenizer.py)
    <run>/embeddings.npy (+ .json)  MiniLM vectors, memory-mapped (training/embeddings.py)
    <run>/router.safetensors        the hierarchical k-means router (training/cluster.py)
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from membank import artifacts
from membank.config import Config
from membank.router import Router
from training.config import TrainConfig, file_sha256
from training.distributed import Dist
from training.packing import Packed, pack

DATA_FILES = (artifacts.TOKENIZER, artifacts.ROUTER, "data/packed.safetensors", "data/meta.json")


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
            "depth": config.memory.depth, "seq_len": tc.seq_len, "code": 1}


def prepare_data(out: Path, tc: TrainConfig, config: Config, *, dist: Dist = Dist(),
                 source: Path | None = None, log=print) -> Data:
    """Build (or reuse) the run's data; `source` is another run directory whose data may be
    copied when its key matches (subtree jobs share their base run's data)."""
    key = data_key(tc, config)
    if dist.is_main and _key(out) != key:
        if source is not None and _key(source) == key:
            for name in DATA_FILES:
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source / name, out / name)
            log(f"data: copied from {source}")
        else:
            build_data(out, tc, config, key, log)
    dist.barrier()
    meta = json.loads((out / "data" / "meta.json").read_text())
    return Data(Packed.load(out / "data" / "packed.safetensors"), Router.load(out / artifacts.ROUTER),
                out / artifacts.TOKENIZER, meta)


def _key(run: Path) -> dict | None:
    try:
        return json.loads((run / "data" / "meta.json").read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def build_data(out: Path, tc: TrainConfig, config: Config, key: dict, log=print) -> None:
    from training.cluster import build_router
    from training.data import build_documents, read_jsonl_corpus
    from training.embeddings import embed_corpus
    from training.tokenizer import EOS, train_tokenizer

    texts = read_jsonl_corpus(tc.corpus) if tc.corpus else [d.text for d in build_documents(seed=tc.seed)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "data" / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten
    tokenizer = train_tokenizer(texts, config.model.vocab_size, out / artifacts.TOKENIZER)
    eos = tokenizer.token_to_id(EOS)
    doc_tokens = [e.ids for e in tokenizer.encode_batch(texts)]
    n_tokens = sum(map(len, doc_tokens))
    log(f"corpus: {len(texts)} documents, {n_tokens:,} tokens, vocab {tokenizer.get_vocab_size()}")

    emb = np.array(embed_corpus(texts, out / "embeddings.npy"))  # (N, 384): a writable copy
    mc = config.memory
    router = build_router(emb, mc.branching, mc.depth, seed=tc.seed)
    router.save(out / artifacts.ROUTER)
    node_ids = router.node_ids(router.route(emb)).numpy()
    leaf_sizes = np.bincount(node_ids[:, -1], minlength=mc.n_nodes(mc.depth))
    log(f"router: k={router.branching} depth={router.depth}, documents per leaf {leaf_sizes.tolist()}")

    packed = pack(doc_tokens, node_ids, tc.seq_len, eos)
    (out / "data").mkdir(exist_ok=True)
    packed.save(out / "data" / "packed.safetensors")
    log(f"packed: {len(packed)} sequences of {tc.seq_len} tokens")
    meta = {"key": key, "fingerprint": fingerprint(packed, router), "documents": len(texts),
            "tokens": n_tokens, "sequences": len(packed), "leaf_documents": leaf_sizes.tolist()}
    artifacts.atomic_write_bytes(out / "data" / "meta.json", json.dumps(meta, indent=1).encode())


def fingerprint(packed: Packed, router: Router) -> str:
    h = hashlib.sha256()
    for t in (packed.tokens, packed.doc_ids, packed.node_ids, *router.centroids):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
