"""The block format: one tree node's memory as one contiguous little-endian buffer.

A level-l block holds, for every memory layer, the three FFN-memory matrices stacked as
    (n_mem_layers, 3, r_l, d_model)      [0]=W1m (gate), [1]=W2m (up), [2]=W3m^T (down, transposed)
in the bank's dtype (float32 or bfloat16), row-major. W3m is stored transposed so that all three
matrices share the (r, d) shape and a block is one tensor. A buffer becomes a tensor with
`torch.frombuffer`: no parsing, no pickle. Integrity is an xxh3_64 checksum of the bytes.
A bank may also store each block int8-encoded (one float32 scale per row): membank/quant.py.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import xxhash

from membank.config import DTYPES

if TYPE_CHECKING:
    import torch

assert sys.byteorder == "little", \
    "the block format is little-endian; big-endian hosts must byteswap"

CHECKSUM_ALGO = "xxh3_64"


def torch_dtype(name: str) -> "torch.dtype":
    # torch is imported here, not at module level: the bank server needs checksums and sizes
    # only, and importing torch would add about 2 s to every shard's start-up
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def checksum(buf) -> str:
    """xxh3_64 hex digest of a bytes-like object (about 10 GB/s; integrity, not security)."""
    return xxhash.xxh3_64_hexdigest(buf)


def checksum_stream():
    """An incremental `checksum`: `.update(part)` for each part in order, then `.hexdigest()`
    equals `checksum(whole)` (lets a receiver hash chunks as they arrive)."""
    return xxhash.xxh3_64()


def block_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = DTYPES[dtype]
    for s in shape:
        n *= s
    return n


def tensor_to_bytes(t: "torch.Tensor", dtype: str) -> bytes:
    """Serialise a block tensor (L, 3, r, d) to its buffer in `dtype`."""
    import torch  # lazily, see torch_dtype

    t = t.detach().to(torch_dtype(dtype)).contiguous().cpu()
    # view as uint8 so bfloat16 (which numpy lacks) serialises the same way as float32
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def tensor_from_buffer(buf, shape: tuple[int, ...], dtype: str) -> "torch.Tensor":
    """A block tensor viewing `buf` (no copy when buf is writable, e.g. a bytearray).

    Raises ValueError when the buffer's size does not match the shape: a partial or corrupt
    block must never become a tensor.
    """
    import torch

    expected = block_nbytes(shape, dtype)
    if len(memoryview(buf).cast("B")) != expected:
        raise ValueError(f"block buffer has {len(memoryview(buf).cast('B'))} bytes, "
                         f"expected {expected} for shape {tuple(shape)} {dtype}")
    if expected == 0:
        return torch.empty(shape, dtype=torch_dtype(dtype))
    if isinstance(buf, bytes):  # torch.frombuffer wants a writable buffer; bytes are not
        buf = bytearray(buf)
    return torch.frombuffer(buf, dtype=torch_dtype(dtype)).view(*shape)
