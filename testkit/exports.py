"""Synthetic exports: a manifest and bank/level*.safetensors of random blocks, no training.

    m = synthetic_export(Path("runs/x/export"), bank="load", version="v1", d_model=256,
                         mem_layers=[0, 1], branching=4, ranks=[16, 8])

What ingest, the bank server and the device read of an export (no anchor, tokenizer or router:
for those, tests/conftest.py `make_model_export`). Blocks are FFN blocks (3 matrices per layer),
standard normal, seeded: the same arguments write the same bytes. Needs torch (the export's
safetensors writer, membank/nn/tensors.py).
"""
from __future__ import annotations

from pathlib import Path

from membank.artifacts import MANIFEST, atomic_write_bytes
from membank.manifest import Manifest


def synthetic_export(out: str | Path, *, bank: str, version: str, d_model: int,
                     mem_layers: list[int], branching: int, ranks: list[int],
                     dtype: str = "float32", seed: int = 0,
                     placement_level: int | None = None, reuse: bool = False) -> Manifest:
    """Write the export into `out` (created) and return its manifest. A rank of 0 is a level
    without blocks. `reuse`: when `out` already holds a manifest, return it and write nothing
    (benchmarks cache their bank between runs)."""
    import torch

    from membank.nn.tensors import write_bank

    out = Path(out)
    if reuse and (out / MANIFEST).exists():
        return Manifest.from_json((out / MANIFEST).read_text())
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    levels = [torch.randn(branching ** l, len(mem_layers), 3, r, d_model, generator=g)
              if r else None
              for l, r in enumerate(ranks, start=1)]
    sums = write_bank(out, levels, dtype)
    extra = {} if placement_level is None else {"placement_level": placement_level}
    manifest = Manifest(bank=bank, version=version, dtype=dtype, d_model=d_model,
                        mem_layers=list(mem_layers), branching=branching, ranks=list(ranks),
                        checksums=sums, **extra)
    atomic_write_bytes(out / MANIFEST, manifest.to_json().encode())
    return manifest
