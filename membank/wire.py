"""The gRPC wire codec that the bank server and the bank client share.

This is the only shared module that imports the generated protobuf classes
(`membank.v1.bank_pb2`, built by `make stubs`); everything else in `membank/` stays free of
protobuf. It holds four things:

- `encode_chunk`: the wire bytes of one `BlockChunk`, written by hand so the block body is
  copied exactly once (into the output bytes) instead of first into a protobuf message and
  then again when that message is serialised. The bytes are identical to what
  `BlockChunk(...).SerializeToString()` writes, so any protobuf client can parse them.
- `iter_block_chunks`: a block split into `CHUNK_BYTES` chunks, header on the first only.
- `safe_parser`: a request deserializer that returns None on malformed bytes, so a servicer
  can answer INVALID_ARGUMENT (grpc itself would answer INTERNAL).
- `parse_chunk`: the client's side of `encode_chunk`: a received BlockChunk's fields with
  `data` as a memoryview INTO the received bytes (protobuf's parser would copy the body once
  into the message and again on every `.data` access). Any valid protobuf encoding parses
  (fields in any order, unknown fields skipped), not only what `encode_chunk` writes.

Nothing to run; `tests/unit/test_wire.py` checks it against protobuf's own serialiser.
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping, TypeVar

from google.protobuf.message import DecodeError, Message

from membank.v1 import bank_pb2

# 1 MiB chunks keep every message far below gRPC's default 4 MiB limit, so neither side needs
# raised limits, while still being large enough that per-message overhead is negligible.
CHUNK_BYTES = 1 << 20

# BlockChunk.data is field 15 with wire type 2 (length-delimited): tag = (15 << 3) | 2.
_DATA_FIELD = 15
_WIRE_TYPE_LEN = 2


def _varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative integer."""
    if n < 0:
        raise ValueError("varint of a negative number")
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


_DATA_TAG = _varint((_DATA_FIELD << 3) | _WIRE_TYPE_LEN)


def encode_chunk(index: int, header: bank_pb2.BlockHeader | Mapping | None, offset: int,
                 data) -> bytes:
    """The exact wire bytes of `BlockChunk(index=, header=, offset=, data=)`.

    `data` is any bytes-like object (a memoryview slice of the block avoids a copy); it is
    copied once, by the final join. `header` is a BlockHeader, a dict of its fields, or None.
    """
    small = bank_pb2.BlockChunk(index=index, offset=offset)
    if header is not None:
        if isinstance(header, bank_pb2.BlockHeader):
            small.header.CopyFrom(header)
        else:
            small.header.CopyFrom(bank_pb2.BlockHeader(**header))
    prefix = small.SerializeToString()
    n = memoryview(data).nbytes
    if n == 0:
        # proto3 does not write a bytes field that holds its default (empty) value
        return prefix
    # data is field 15, the highest number, so protobuf would also write it last
    return b"".join((prefix, _DATA_TAG, _varint(n), data))


def iter_block_chunks(index: int, header: Mapping | bank_pb2.BlockHeader, data) -> Iterator[bytes]:
    """Encoded BlockChunks of one block: at most CHUNK_BYTES of data each, header on the first.

    A zero-byte block still yields one chunk, so the client always receives its header.
    """
    view = memoryview(data).cast("B")
    n = len(view)
    yield encode_chunk(index, header, 0, view[:CHUNK_BYTES])
    for offset in range(CHUNK_BYTES, n, CHUNK_BYTES):
        yield encode_chunk(index, None, offset, view[offset:offset + CHUNK_BYTES])


class ChunkFormatError(ValueError):
    """Bytes that are not a valid BlockChunk encoding."""


def _read_varint(buf, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ChunkFormatError("truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def parse_chunk(raw) -> tuple[int, bank_pb2.BlockHeader | None, int, memoryview]:
    """(index, header or None, offset, data) of a BlockChunk's wire bytes; no copy of data.

    `data` is a view into `raw`: keep `raw` alive while using it. Raises ChunkFormatError.
    """
    view = memoryview(raw).cast("B")
    end = len(view)
    pos = index = offset = 0
    header_parts: list[memoryview] = []
    data = view[0:0]
    while pos < end:
        tag, pos = _read_varint(view, pos, end)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = _read_varint(view, pos, end)
            if field == 1:
                index = value & 0xFFFFFFFF
            elif field == 3:
                offset = value & 0xFFFFFFFFFFFFFFFF
        elif wire_type == _WIRE_TYPE_LEN:
            n, pos = _read_varint(view, pos, end)
            if n > end - pos:
                raise ChunkFormatError("length-delimited field runs past the message")
            if field == _DATA_FIELD:
                data = view[pos:pos + n]          # protobuf: the last one wins
            elif field == 2:
                header_parts.append(view[pos:pos + n])   # protobuf: repeated ones merge
            pos += n
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ChunkFormatError(f"unsupported wire type {wire_type}")
        if pos > end:
            raise ChunkFormatError("field runs past the message")
    header = None
    if header_parts:
        try:
            header = bank_pb2.BlockHeader.FromString(b"".join(header_parts))
        except DecodeError as e:
            raise ChunkFormatError(f"malformed BlockHeader: {e}") from None
    return index, header, offset, data


M = TypeVar("M", bound=Message)


def safe_parser(message_class: type[M]) -> Callable[[bytes], M | None]:
    """A request deserializer that returns None instead of raising on malformed bytes."""
    def parse(raw: bytes) -> M | None:
        try:
            return message_class.FromString(raw)
        except DecodeError:
            return None

    parse.__name__ = f"parse_{message_class.__name__}"
    return parse
