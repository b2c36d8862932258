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
                                  optional (readers take a missing file as no generic memory)

Everything is safetensors or JSON: nothing here is unpickled. Files are written to a temporary
name and renamed, so a crash never leaves a half-written export that looks complete
(`manifest.json` is written last and marks the export complete).

This module is torch-free: the bank server's ingest reads the bank through `iter_blocks`, and
the device and training read the rest. The writers of the tensor files (`write_bank`,
`save_tensors_atomic`) and `load_generic` need torch and live in membank/nn/tensors.py.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Iterator

from membank.blocks import DIGEST_ALGO, hasher
from membank.config import Config
from membank.manifest import Manifest

CONFIG = "config.json"
ANCHOR = "anchor.safetensors"
TOKENIZER = "tokenizer.json"
ROUTER = "router.safetensors"
MANIFEST = "manifest.json"
GENERIC = "generic.safetensors"
STATIC_EMBEDDER = "static-embedder.safetensors"   # only when the router was built with it

# the safetensors header's names of the bank dtypes
_ST_DTYPES = {"float32": "F32", "bfloat16": "BF16"}


def level_file(export_dir: str | Path, level: int) -> Path:
    return Path(export_dir) / "bank" / f"level{level}.safetensors"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def anchor_id(export_dir: str | Path) -> str:
    """What names the export's anchor: "blake3-{hex}" of its weights file. The manifest records
    the anchor its blocks were trained with (`Manifest.anchor`), and a device whose anchor
    differs refuses the blocks: memory trained against other weights means nothing to it."""
    h = hasher(DIGEST_ALGO)
    with open(Path(export_dir) / ANCHOR, "rb") as f:
        for chunk in iter(lambda: f.read(8 << 20), b""):
            h.update(chunk)
    return f"{DIGEST_ALGO}-{h.hexdigest()}"


def load_config(export_dir: str | Path) -> Config:
    return Config.from_dict(json.loads((Path(export_dir) / CONFIG).read_text()))


def load_manifest(export_dir: str | Path) -> Manifest:
    path = Path(export_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{export_dir} is not a complete export (no {MANIFEST})")
    return Manifest.from_json(path.read_text())


def iter_blocks(export_dir: str | Path, manifest: Manifest,
                only: set[tuple[int, int]] | None = None
                ) -> Iterator[tuple[int, int, memoryview]]:
    """(level, node, view) of an export's blocks (only those in `only`, if given), read from
    bank/level{l}.safetensors through a memory map: a block is a contiguous slice of the level
    tensor (k^l, *block_shape), which is the block format already, so nothing is converted or
    copied (no torch). `bytes(view)` where a copy is wanted.

    ValueError when a level file's tensor does not match the manifest (dtype, shape, size).
    """
    for level in range(1, manifest.depth + 1):
        if manifest.ranks[level - 1] == 0:
            continue
        path = level_file(export_dir, level)
        with open(path, "rb") as f:
            # the map lives as long as a view of it does (the writer may batch views across
            # levels); it is unmapped when the last one is dropped
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        (n,) = struct.unpack("<Q", mm[:8])
        entry = json.loads(mm[8:8 + n])["blocks"]
        want = [manifest.n_nodes(level), *manifest.block_shape(level)]
        if entry["shape"] != want or entry["dtype"] != _ST_DTYPES[manifest.dtype]:
            raise ValueError(f"{path}: tensor {entry['dtype']} {entry['shape']}, manifest "
                             f"says {_ST_DTYPES[manifest.dtype]} {want}")
        size = manifest.block_nbytes(level)
        start, end = entry["data_offsets"]
        if end - start != size * manifest.n_nodes(level):
            raise ValueError(f"{path}: {end - start} data bytes, expected "
                             f"{size * manifest.n_nodes(level)}")
        base = 8 + n + start
        view = memoryview(mm)
        for node in range(manifest.n_nodes(level)):
            if only is None or (level, node) in only:
                yield level, node, view[base + node * size: base + (node + 1) * size]
