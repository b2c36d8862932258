"""Export a trained model: anchor + tokenizer + router + manifest + bank blocks.

The layout is defined in membank/artifacts.py. manifest.json is written last: an export
without it is incomplete and every reader refuses it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from membank import artifacts
from membank.config import Config
from membank.manifest import Manifest
from membank.memory import MemoryBank
from membank.model import Transformer
from membank.router import Router


def anchor_state(model: Transformer) -> dict:
    """The anchor's weights; tied lm_head is dropped (it is the embedding)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_checkpoint(path: str | Path, model: Transformer, bank: MemoryBank | None, meta: dict) -> None:
    """Model (+ bank) weights as one safetensors file, written to a temp name then renamed."""
    tensors = {f"anchor.{k}": v for k, v in anchor_state(model).items()}
    if bank is not None:
        tensors.update({f"bank.level{i + 1}": p.detach() for i, p in enumerate(bank.levels)})
    artifacts.save_tensors_atomic(tensors, Path(path), metadata={"meta": json.dumps(meta)})


def export(export_dir: str | Path, config: Config, model: Transformer, bank: MemoryBank,
           tokenizer_path: str | Path, router: Router, *, bank_id: str, version: str,
           shards: list[str] | None = None, replication: int = 1) -> Manifest:
    out = Path(export_dir)
    (out / artifacts.MANIFEST).unlink(missing_ok=True)  # mark incomplete while rewriting
    out.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_bytes(out / artifacts.CONFIG, json.dumps(config.to_dict(), indent=1).encode())
    artifacts.save_tensors_atomic(anchor_state(model), out / artifacts.ANCHOR)
    shutil.copyfile(tokenizer_path, out / artifacts.TOKENIZER)
    router.save(out / artifacts.ROUTER)
    mc = config.memory
    checksums = artifacts.write_bank(out, [p.data for p in bank.levels], mc.dtype)
    manifest = Manifest(
        bank=bank_id, version=version, dtype=mc.dtype, d_model=config.model.d_model,
        mem_layers=mc.mem_layers(config.model.n_layer), branching=mc.branching,
        ranks=list(mc.ranks), checksums=checksums, shards=shards or ["shard-0"],
        replication=replication,
    )
    artifacts.atomic_write_bytes(out / artifacts.MANIFEST, manifest.to_json().encode())
    return manifest
