"""The block format: one tree node's memory as one contiguous little-endian buffer.

A level-l block holds, for every memory layer, the three FFN-memory matrices stacked as
    (n_mem_layers, 3, r_l, d_model)      [0]=W1m (gate), [1]=W2m (up), [2]=W3m^T (down, transposed)
in the bank's dtype (float32 or bfloat16), row-major. W3m is stored transposed so that all three
matrices share the (r, d) shape and a block is one tensor. Two hashes of the bytes: an xxh3_64
checksum (fast, forgeable: the bank server's check against accidents, on disk and in its cache
tiers) and a cryptographic digest (BLAKE3 by default; SHA-256 accepted), listed in the signed
manifest and checked by the device (membank/signing.py). A bank may also store each block
int8-encoded (one float32 scale per row): membank/quant.py. This module is torch-free (the bank
server needs checksums and sizes only); a buffer becomes a tensor, with `torch.frombuffer`, in
membank/nn/tensors.py.
"""
from __future__ import annotations

import hashlib
import sys

import blake3
import xxhash

from membank.config import DTYPES

assert sys.byteorder == "little", \
    "the block format is little-endian; big-endian hosts must byteswap"

CHECKSUM_ALGO = "xxh3_64"
# BLAKE3: 2.6x SHA-256's speed on this machine's 27.5 MB blocks (BENCHMARKS.md, "Verifying
# blocks"), and a tree hash, so chunk proofs under one block digest are possible later
DIGEST_ALGO = "blake3"
# every hash a manifest may name -> its incremental constructor (`.update`, `.hexdigest`)
HASHERS = {"xxh3_64": xxhash.xxh3_64, "blake3": blake3.blake3, "sha256": hashlib.sha256}


def checksum(buf) -> str:
    """xxh3_64 hex digest of a bytes-like object (integrity, not security)."""
    return xxhash.xxh3_64_hexdigest(buf)


def checksum_stream():
    """An incremental `checksum`: `.update(part)` for each part in order, then `.hexdigest()`
    equals `checksum(whole)` (lets a receiver hash chunks as they arrive)."""
    return xxhash.xxh3_64()


def hasher(algo: str):
    """An incremental hash of `algo` (a key of HASHERS): `.update(part)` for each part in order,
    then `.hexdigest()`."""
    return HASHERS[algo]()


def digest(buf, algo: str = DIGEST_ALGO) -> str:
    """The hex digest of a bytes-like object under `algo` (default: the cryptographic one)."""
    h = HASHERS[algo]()
    h.update(buf)
    return h.hexdigest()


def block_nbytes(shape: tuple[int, ...], dtype: str) -> int:
    n = DTYPES[dtype]
    for s in shape:
        n *= s
    return n
