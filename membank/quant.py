"""Optional int8 block encoding: one float32 scale per row, dequantized on the device.

A block (membank/blocks.py) is `(L, n_mats, r, W)` in the bank dtype. Its int8 encoding is
symmetric per row, a row being one `(layer, matrix, neuron)` triple, i.e. the last axis W:

    scale[L, m, r] = max_w |x[L, m, r, w]| / 127           (float32; 0 for an all-zero row)
    q[L, m, r, w]  = round_half_even(x / scale), in [-127, 127]   (int8; 0 where scale = 0)
    x'             = q * scale                             |x - x'| <= scale / 2 per element

Encoded payload (little-endian, no header: the manifest gives the shape):

    q        L * n_mats * r * W bytes, int8, C order (the block's own order)
    scales   L * n_mats * r * 4 bytes, float32, C order over (L, n_mats, r)

`encoded_nbytes(shape, "int8")` is its size. For FFN memories a row is one neuron's W1m or W2m
input weights or its W3m output weights, so one outlier weight costs precision only within its
own neuron. Payloads are made once, at ingest (services/bank_server/ingest.py), never per
request; the device verifies them against the manifest's per-encoding checksum like a native
block, then `membank.nn.tensors.dequantize_into` writes them straight into the model's
preallocated memory.

Pure numpy, no torch (ingest on the bank server encodes; bfloat16 is widened by bit shifting).
The torch side, decoding into a tensor and `roundtrip` for the evaluation's "fetched-int8"
model, is in membank/nn/tensors.py.
Run its tests: .venv/bin/python -m pytest -q tests/unit/test_quant.py
"""
from __future__ import annotations

import sys

import numpy as np

from membank.blocks import block_nbytes

assert sys.byteorder == "little", \
    "the int8 payload is little-endian; big-endian hosts must byteswap"

NATIVE = ""            # the bank's own dtype (float32 or bfloat16): the default everywhere
INT8 = "int8"
ENCODINGS = (INT8,)    # encodings a version may carry besides its native blocks
QMAX = 127             # symmetric: -128 is never written, so negation cannot overflow


def normalize(name: str | None) -> str:
    """"" / "native" / None -> NATIVE, "int8" -> INT8; ValueError for anything else."""
    if name in (None, "", "native"):
        return NATIVE
    if name in ENCODINGS:
        return name
    raise ValueError(f"unknown block encoding {name!r}; known: native, {', '.join(ENCODINGS)}")


def label(encoding: str) -> str:
    """The name people read ("native" for the bank dtype)."""
    return encoding or "native"


def n_rows(shape: tuple[int, ...]) -> int:
    """Rows of a block: every axis but the last (W)."""
    n = 1
    for s in shape[:-1]:
        n *= s
    return n


def encoded_nbytes(shape: tuple[int, ...], encoding: str, dtype: str) -> int:
    """Bytes of one block of `shape` (bank dtype `dtype`) in `encoding`."""
    if encoding == NATIVE:
        return block_nbytes(shape, dtype)
    if encoding == INT8:
        return block_nbytes(shape, "float32") // 4 + 4 * n_rows(shape)
    raise ValueError(f"unknown block encoding {encoding!r}")


# -- encode (numpy) ---------------------------------------------------------------------------
def native_to_float32(buf, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A native block buffer as a float32 array of `shape` (a copy for bfloat16, a view else)."""
    if len(memoryview(buf).cast("B")) != block_nbytes(shape, dtype):
        raise ValueError(f"block buffer has {len(memoryview(buf).cast('B'))} bytes, expected "
                         f"{block_nbytes(shape, dtype)} for shape {tuple(shape)} {dtype}")
    if dtype == "float32":
        return np.frombuffer(buf, dtype="<f4").reshape(shape)
    if dtype == "bfloat16":
        # bfloat16 is the top half of a float32: widening is exact
        return (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view("<f4").reshape(shape)
    raise ValueError(f"unknown bank dtype {dtype!r}")


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 of x's shape, scales float32 of x.shape[:-1]) of a float array.

    ValueError on NaN or inf: a non-finite weight has no int8 value, and a bank holding one is
    broken anyway (native blocks with NaN would poison the model just the same)."""
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("cannot quantize a block holding NaN or inf")
    if x.ndim == 0 or x.shape[-1] == 0:
        return np.zeros(x.shape, np.int8), np.zeros(x.shape[:-1], np.float32)
    amax = np.abs(x).max(axis=-1)                                   # (..., ) per row
    scales = (amax / np.float32(QMAX)).astype(np.float32)
    # all-zero rows: divide by 1 (x is 0 there, so q is 0) and keep scale 0, so they decode to
    # exact zeros; a tiny non-zero amax whose scale underflows to 0 is treated the same way
    safe = np.where(scales > 0, scales, np.float32(1))
    q = np.rint(x / safe[..., None])
    np.clip(q, -QMAX, QMAX, out=q)        # x / scale can exceed 127 by a rounding ulp
    return q.astype(np.int8), np.where(scales > 0, scales, np.float32(0)).astype(np.float32)


def encode_int8(x: np.ndarray) -> bytes:
    """The int8 payload (q then scales) of a float block array (L, n_mats, r, W)."""
    q, scales = quantize(x)
    return q.tobytes(order="C") + scales.astype("<f4").tobytes(order="C")


def encode_block(buf, shape: tuple[int, ...], dtype: str, encoding: str) -> bytes:
    """A native block buffer re-encoded as `encoding` (what ingest stores)."""
    if encoding == INT8:
        return encode_int8(native_to_float32(buf, shape, dtype))
    raise ValueError(f"nothing to encode for encoding {encoding!r}")


# -- decode (numpy) ---------------------------------------------------------------------------
def split_int8(buf, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 (shape), scales float32 (shape[:-1])) views of an int8 payload, no copy.

    ValueError when the size is wrong or a scale is negative or not finite (such a payload was
    not written by `encode_int8`; its checksum should have caught it first)."""
    view = memoryview(buf).cast("B")
    nq = block_nbytes(shape, "float32") // 4
    want = nq + 4 * n_rows(shape)
    if len(view) != want:
        raise ValueError(f"int8 payload has {len(view)} bytes, expected {want} for shape "
                         f"{tuple(shape)}")
    q = np.frombuffer(view, dtype=np.int8, count=nq).reshape(shape)
    scales = np.frombuffer(view, dtype="<f4", offset=nq).reshape(shape[:-1])
    if not (np.isfinite(scales).all() and (scales >= 0).all()):
        raise ValueError("int8 payload holds a negative or non-finite scale")
    return q, scales


def dequantize(buf, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of `shape` from an int8 payload."""
    q, scales = split_int8(buf, shape)
    return q.astype(np.float32) * scales[..., None]
