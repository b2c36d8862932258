"""Export a trained model: anchor + tokenizer + router + generic memory + manifest + bank blocks.

The layout is defined in membank/artifacts.py. manifest.json is written last: an export
without it is incomplete and every reader refuses it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from membank import artifacts
from membank.config import Config
from membank.manifest import Manifest
from membank.nn.memory import MemoryBank
from membank.nn.model import Transformer
from membank.nn.static_embed import is_static
from membank.nn.tensors import save_tensors_atomic, write_bank
from membank.router import Router


def anchor_state(model: Transformer) -> dict:
    """The anchor's weights; tied lm_head is dropped (it is the embedding)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def export(export_dir: str | Path, config: Config, model: Transformer,
           bank: MemoryBank | list[torch.Tensor], tokenizer_path: str | Path, router: Router, *,
           bank_id: str, version: str, generic: torch.Tensor | None = None,
           shards: list[str] | None = None, replication: int = 1,
           run_dir: str | Path | None = None) -> Manifest:
    """Write the export; `bank` is a MemoryBank or its level tensors (k^l, L, n, r_l, W), and
    `generic` the fetch-sized generic memory (1, L, n, R, W) when one was trained. A router
    built with the static embedder takes its table along, from run_dir (the training run)."""
    out = Path(export_dir)
    (out / artifacts.MANIFEST).unlink(missing_ok=True)  # mark incomplete while rewriting
    out.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_bytes(out / artifacts.CONFIG,
                                 json.dumps(config.to_dict(), indent=1).encode())
    save_tensors_atomic(anchor_state(model), out / artifacts.ANCHOR)
    shutil.copyfile(tokenizer_path, out / artifacts.TOKENIZER)
    router.save(out / artifacts.ROUTER)
    if is_static(router.embedder):          # the device must embed prompts with the same table
        if run_dir is None:
            raise ValueError(f"the router was built with {router.embedder}: export needs the "
                             f"run directory that holds {artifacts.STATIC_EMBEDDER}")
        shutil.copyfile(Path(run_dir) / artifacts.STATIC_EMBEDDER, out / artifacts.STATIC_EMBEDDER)
    else:
        (out / artifacts.STATIC_EMBEDDER).unlink(missing_ok=True)
    if generic is not None:
        save_tensors_atomic({"generic": generic.detach().float()}, out / artifacts.GENERIC)
    else:
        (out / artifacts.GENERIC).unlink(missing_ok=True)
    mc = config.memory
    levels = [p.data for p in bank.levels] if isinstance(bank, MemoryBank) else list(bank)
    checksums = write_bank(out, levels, mc.dtype)
    manifest = Manifest(
        bank=bank_id, version=version, **mc.manifest_fields(config.model), checksums=checksums,
        shards=shards or ["shard-0"], replication=replication, anchor=artifacts.anchor_id(out),
    )
    artifacts.atomic_write_bytes(out / artifacts.MANIFEST, manifest.to_json().encode())
    return manifest
