"""Blocks and export files as torch tensors: the torch side of membank/blocks.py,
membank/quant.py and membank/artifacts.py, which stay torch-free for the bank server.

- `tensor_to_bytes` / `tensor_from_buffer`: a block tensor (L, n_mats, r, W) <-> its buffer in
  the bank dtype; `torch.frombuffer` makes the tensor, no parsing, no pickle.
- `dequantize_into`: an int8 payload decoded straight into a tensor (the device's memory room);
  `roundtrip`: quantize + dequantize with the bank's own code (the evaluation's "fetched-int8").
- `save_tensors_atomic`, `write_bank`, `load_generic`: the export's safetensors files, written
  to a temporary name and renamed (the export layout: membank/artifacts.py).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from membank.artifacts import GENERIC, level_file
from membank.blocks import block_nbytes, checksum
from membank.quant import quantize, split_int8


# -- block buffers ------------------------------------------------------------------------------
def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def tensor_to_bytes(t: torch.Tensor, dtype: str) -> bytes:
    """Serialise a block tensor (L, 3, r, d) to its buffer in `dtype`."""
    t = t.detach().to(torch_dtype(dtype)).contiguous().cpu()
    # view as uint8 so bfloat16 (which numpy lacks) serialises the same way as float32
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_from_buffer(buf, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """A block tensor viewing `buf` (no copy when buf is writable, e.g. a bytearray).

    Raises ValueError when the buffer's size does not match the shape: a partial or corrupt
    block must never become a tensor.
    """
    expected = block_nbytes(shape, dtype)
    if len(memoryview(buf).cast("B")) != expected:
        raise ValueError(f"block buffer has {len(memoryview(buf).cast('B'))} bytes, "
                         f"expected {expected} for shape {tuple(shape)} {dtype}")
    if expected == 0:
        return torch.empty(shape, dtype=torch_dtype(dtype))
    if isinstance(buf, bytes):  # torch.frombuffer wants a writable buffer; bytes are not
        buf = bytearray(buf)
    return torch.frombuffer(buf, dtype=torch_dtype(dtype)).view(*shape)


# -- int8 payloads (membank/quant.py) -----------------------------------------------------------
def dequantize_into(buf, shape: tuple[int, ...], out: torch.Tensor) -> torch.Tensor:
    """Decode an int8 payload straight into `out` (a tensor of `shape`, any float dtype, may be
    a strided view such as one level's slice of the model's memory room): no block-sized
    allocation for a float32 `out`. The payload is fully checked before `out` is touched."""
    q, scales = split_int8(buf, shape)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, the block {tuple(shape)}")
    qt = _readonly_tensor(q, torch.int8)
    st = _readonly_tensor(scales, torch.float32)
    if out.dtype == torch.float32:
        out.copy_(qt)                               # int8 -> float32, exact
        out.mul_(st.unsqueeze(-1))                  # (L, n, r, 1) broadcast over W
    else:   # multiply in float32 and round once to out's dtype (as `roundtrip(...).to(dtype)`)
        out.copy_(qt.to(torch.float32).mul_(st.unsqueeze(-1)))
    return out


def _readonly_tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor viewing a (possibly read-only) numpy array without copying it; only read."""
    if a.size == 0:
        return torch.empty(a.shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "non-writable buffer": we only read
        return torch.frombuffer(a.data if a.flags.c_contiguous else a.tobytes(),
                                dtype=dtype).view(a.shape)


def roundtrip(t: torch.Tensor) -> torch.Tensor:
    """t -> quantize -> dequantize, per row over the last axis, with the same code as the
    bank and the device (the evaluation's "fetched-int8" memory). Any leading shape."""
    x = t.detach().to(torch.float32).cpu().contiguous().numpy()
    q, scales = quantize(x)
    return torch.from_numpy(q.astype(np.float32) * scales[..., None]).to(t.dtype)


# -- export files (membank/artifacts.py) --------------------------------------------------------
def save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path,
                        metadata: dict | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


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
