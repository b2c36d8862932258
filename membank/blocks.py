"""The block format: one tree node's memory as one contiguous little-endian buffer.

A level-l block holds, for every memory layer, the three FFN-memory matrices stacked as
    (n_mem_layers, 3, r_l, d_model)      [0]=W1m (gate), [1]=W2m (up), [2]=W3m^T (down, transposed)
in the bank's dtype (float32 or bfloat16), row-major. W3m is stored transposed so that all three
matrices share the (r, d) shape and a block is one tensor. Integrity is an xxh3_64 checksum
of the bytes. A bank may also store each block int8-encoded (one float32 scale per row):
membank/quant.py. This module is torch-free (the bank server needs checksums and sizes only);
a buffer becomes a tensor, with `torch.frombuffer`, in membank/nn/tensors.py.
"""
from __future__ import annotations

import sys

import xxhash

from membank.config import DTYPES

assert sys.byteorder == "little", \
    "the block format is little-endian; big-endian hosts must byteswap"

CHECKSUM_ALGO = "xxh3_64"


def checksum(buf) -> str:
    """xxh3_64 hex digest of a bytes-like object (integrity, not security)."""
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
