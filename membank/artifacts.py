"""The export directory: what training hands to the bank (blocks) and to devices (the rest).

    export/
      config.json                 {"model": ModelConfig, "memory": MemoryConfig}
      anchor.safetensors          anchor weights only (no bank), float32
      tokenizer.json              byte-level BPE (`tokenizers`)
      router.safetensors          hierarchical k-means centroids (membank/router.py)
      manifest.json               membank.manifest/1 (membank/manifest.py)
      bank/level{l}.safetensors   tensor "blocks" of shape (k^l, L, 3, r_l, d) in the manifest
                                  dtype; node n's block is blocks[n], already in block format
      generic.safetensors         tensor "generic" (1, L, n_mats, R, W) float32: the fetch-sized
                                  generic memory trained alongside the bank (PAPER.md section 6),
                                  so evaluation can compare anchor + generic with anchor + fetched;
                                  optional (exports from before it have none)

Everything is safetensors or JSON: nothing here is unpickled. Files are written to a temporary
name and renamed, so a crash never leaves a half-written export that looks complete
(`manifest.json` is written last and marks the export complete).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from membank.blocks import checksum, tensor_to_bytes, torch_dtype
from membank.config import Config
from membank.manifest import Manifest

CONFIG = "config.json"
ANCHOR = "anchor.safetensors"
TOKENIZER = "tokenizer.json"
ROUTER = "router.safetensors"
MANIFEST = "manifest.json"
GENERIC = "generic.safetensors"


def level_file(export_dir: str | Path, level: int) -> Path:
    return Path(export_dir) / "bank" / f"level{level}.safetensors"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path,
                        metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_config(export_dir: str | Path) -> Config:
    return Config.from_dict(json.loads((Path(export_dir) / CONFIG).read_text()))


def load_manifest(export_dir: str | Path) -> Manifest:
    path = Path(export_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{export_dir} is not a complete export (no {MANIFEST})")
    return Manifest.from_json(path.read_text())


def load_generic(export_dir: str | Path) -> torch.Tensor | None:
    """The generic memory (1, L, n_mats, R, W), or None when the export has none."""
    path = Path(export_dir) / GENERIC
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("generic")


def write_bank(export_dir: str | Path, levels: list[torch.Tensor | None],
               dtype: str) -> list[list[str]]:
    """Write per-level bank tensors (k^l, L, 3, r_l, d); return per-block checksums."""
    (Path(export_dir) / "bank").mkdir(parents=True, exist_ok=True)
    sums: list[list[str]] = []
    for level, t in enumerate(levels, start=1):
        if t is None or t.shape[3] == 0:  # (k^l, L, n_mats, r_l, W): rank 0 = no blocks
            sums.append([])
            continue
        t = t.detach().to(torch_dtype(dtype)).contiguous()
        sums.append([checksum(tensor_to_bytes(t[n], dtype)) for n in range(t.shape[0])])
        save_tensors_atomic({"blocks": t}, level_file(export_dir, level))
    return sums


def iter_blocks(export_dir: str | Path, manifest: Manifest) -> Iterator[tuple[int, int, bytes]]:
    """(level, node, block bytes) for every block of an export, read lazily level by level.

    safe_open memory-maps the file, so a multi-GB level is never held in memory at once.
    """
    for level in range(1, manifest.depth + 1):
        if manifest.ranks[level - 1] == 0:
            continue
        with safe_open(str(level_file(export_dir, level)), framework="pt") as f:
            blocks = f.get_slice("blocks")
            shape = tuple(blocks.get_shape())
            want = (manifest.n_nodes(level), *manifest.block_shape(level))
            if shape != want:
                raise ValueError(f"level {level}: bank tensor has shape {shape}, "
                                 f"manifest says {want}")
            for node in range(manifest.n_nodes(level)):
                yield level, node, tensor_to_bytes(blocks[node:node + 1][0], manifest.dtype)
