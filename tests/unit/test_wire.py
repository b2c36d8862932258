"""membank/wire.py: hand-written BlockChunk bytes equal protobuf's; chunking; safe parsing.

Run: .venv/bin/python -m pytest -q tests/unit/test_wire.py
"""
import pytest

from membank import wire
from membank.v1 import bank_pb2

HEADER = dict(level=2, node=3, version="v1", checksum="0123456789abcdef",
              nbytes=3 * wire.CHUNK_BYTES, dtype="bfloat16", shape=[2, 3, 8, 32])


@pytest.mark.parametrize("index, header, offset, data", [
    (0, None, 0, b""),                       # every field at its default: empty message
    (0, HEADER, 0, b""),                     # zero-byte block: header only
    (0, None, 0, b"x"),
    (5, HEADER, 0, b"abc"),
    (1, None, 1 << 20, bytes(range(256)) * 3),   # 2-byte length varint
    (2 ** 32 - 1, None, 2 ** 63, b"\x00" * 200),  # multi-byte varints for index and offset
    (7, HEADER, 0, b"\xff" * wire.CHUNK_BYTES),   # a full 1 MiB chunk
])
def test_encode_chunk_equals_protobuf(index, header, offset, data):
    want = bank_pb2.BlockChunk(index=index, header=header, offset=offset,
                               data=data).SerializeToString()
    assert wire.encode_chunk(index, header, offset, memoryview(data)) == want
    assert wire.encode_chunk(index, header, offset, data) == want
    back = bank_pb2.BlockChunk.FromString(want)
    assert (back.index, back.offset, back.data) == (index, offset, data)


def test_encode_chunk_accepts_a_header_message():
    h = bank_pb2.BlockHeader(**HEADER)
    assert wire.encode_chunk(1, h, 0, b"ab") == wire.encode_chunk(1, HEADER, 0, b"ab")


@pytest.mark.parametrize("n", [0, 1, wire.CHUNK_BYTES - 1, wire.CHUNK_BYTES, wire.CHUNK_BYTES + 1,
                               2 * wire.CHUNK_BYTES + 12345])
def test_iter_block_chunks_splits_and_reassembles(n):
    data = (bytes((i * 7) % 251 for i in range(n)) if n < 4096
            else (b"0123456789" * (n // 10 + 1))[:n])
    chunks = [bank_pb2.BlockChunk.FromString(c) for c in wire.iter_block_chunks(4, HEADER, data)]
    assert len(chunks) == max(1, -(-n // wire.CHUNK_BYTES))
    assert chunks[0].HasField("header") and chunks[0].header.checksum == HEADER["checksum"]
    assert not any(c.HasField("header") for c in chunks[1:])
    assert all(c.index == 4 for c in chunks)
    assert all(len(c.data) <= wire.CHUNK_BYTES for c in chunks)
    assert [c.offset for c in chunks] == [i * wire.CHUNK_BYTES for i in range(len(chunks))]
    assert b"".join(c.data for c in chunks) == data


def test_varint():
    for n in (0, 1, 127, 128, 300, 2 ** 32, 2 ** 64 - 1):
        # protobuf's own encoding of a uint64 field 3 is tag 0x18 + varint
        want = bank_pb2.BlockChunk(offset=n).SerializeToString()
        assert (b"\x18" + wire._varint(n) if n else b"") == want
    with pytest.raises(ValueError):
        wire._varint(-1)


def test_safe_parser():
    parse = wire.safe_parser(bank_pb2.FetchBlocksRequest)
    req = bank_pb2.FetchBlocksRequest(bank="b", blocks=[bank_pb2.BlockId(level=1, node=2)])
    assert parse(req.SerializeToString()) == req
    assert parse(b"") == bank_pb2.FetchBlocksRequest()     # empty bytes are a valid empty message
    assert parse(b"\xff\xff\xff") is None
    assert parse(b"\x0a\x05ab") is None                   # truncated length-delimited field
