"""membank/wire.py parse_chunk: the client's zero-copy reading of BlockChunk bytes agrees with
protobuf's parser on what the server writes and on any other valid encoding.

Run: .venv/bin/python -m pytest -q tests/unit/test_wire_parse.py
"""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from membank import wire
from membank.v1 import bank_pb2

HEADER = dict(level=2, node=3, version="v1", checksum="0123456789abcdef", nbytes=12,
              dtype="bfloat16", shape=[2, 3, 8, 32])


def same(raw: bytes):
    want = bank_pb2.BlockChunk.FromString(raw)
    index, header, offset, data = wire.parse_chunk(raw)
    assert (index, offset, bytes(data)) == (want.index, want.offset, want.data)
    assert header == (want.header if want.HasField("header") else None)


@pytest.mark.parametrize("index, header, offset, data", [
    (0, None, 0, b""), (0, HEADER, 0, b""), (5, HEADER, 0, b"abc"),
    (2 ** 32 - 1, None, 2 ** 63, b"\x00" * 300), (7, HEADER, 0, b"\xff" * wire.CHUNK_BYTES),
])
def test_parses_what_the_server_writes(index, header, offset, data):
    raw = wire.encode_chunk(index, header, offset, data)
    same(raw)
    assert isinstance(wire.parse_chunk(raw)[3], memoryview)          # no copy of the body


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, 2 ** 32 - 1), offset=st.integers(0, 2 ** 64 - 1),
       data=st.binary(max_size=300), with_header=st.booleans(),
       level=st.integers(0, 2 ** 32 - 1), version=st.text(max_size=20))
def test_agrees_with_protobuf_on_any_chunk(index, offset, data, with_header, level, version):
    msg = bank_pb2.BlockChunk(index=index, offset=offset, data=data)
    if with_header:
        msg.header.CopyFrom(bank_pb2.BlockHeader(level=level, version=version, shape=[1, 2]))
    raw = msg.SerializeToString()
    same(raw)
    # fields in another order and an unknown field (as another implementation may write)
    reordered = bank_pb2.BlockChunk(data=data).SerializeToString() + \
        bank_pb2.BlockChunk(index=index, offset=offset).SerializeToString() + b"\xa0\x06\x05"
    same(reordered)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64))
def test_random_bytes_parse_or_fail_cleanly(raw):
    try:
        want = bank_pb2.BlockChunk.FromString(raw)
    except Exception:
        want = None
    try:
        got = wire.parse_chunk(raw)
    except wire.ChunkFormatError:
        return            # protobuf may accept some bytes we refuse (groups); never the reverse
    if want is not None:
        assert (got[0], got[2], bytes(got[3])) == (want.index, want.offset, want.data)


# -- BankClient reading raw chunk bytes, into caller-owned buffers ------------------------------
def test_bank_client_raw_chunks_and_out_buffers():
    from membank.blocks import checksum
    from membank.manifest import Manifest
    from services.model_client.bank_client import BankClient, BlockIntegrityError

    n = 1 * 3 * 4 * 8 * 4   # level 1 blocks: (1 layer, 3, r=4, d=8) float32
    blocks = [bytes([7 + k]) * 384 for k in range(2)]
    m = Manifest(bank="b", version="v1", dtype="float32", d_model=8, mem_layers=[0], branching=2,
                 ranks=[4, 0], checksums=[[checksum(b) for b in blocks], []])
    assert m.block_nbytes(1) == 384 == n

    def raw_stream(i, node, data):
        h = dict(level=1, node=node, version="v1", checksum=m.checksum(1, node), nbytes=384,
                 dtype="float32", shape=list(m.block_shape(1)))
        return list(wire.iter_block_chunks(i, h, data))

    client = BankClient("127.0.0.1:1")
    try:
        client._fetch_blocks = lambda request, timeout: iter(raw_stream(0, 0, blocks[0]) +
                                                             raw_stream(1, 1, blocks[1]))
        mine = bytearray(384)
        got = client.fetch("b", "v1", [(1, 0), (1, 1)], m, out={(1, 0): mine})
        assert got[(1, 0)] is mine and bytes(mine) == blocks[0]
        assert isinstance(got[(1, 1)], bytearray) and bytes(got[(1, 1)]) == blocks[1]
        # a numpy view works as a destination too
        import numpy as np
        arr = np.zeros(384, dtype=np.uint8)
        client._fetch_blocks = lambda request, timeout: iter(raw_stream(0, 0, blocks[0]))
        client.fetch("b", "v1", [(1, 0)], m, out={(1, 0): arr})
        assert arr.tobytes() == blocks[0]
        # wrong-size destination, corrupt bytes, garbage chunk
        client._fetch_blocks = lambda request, timeout: iter(raw_stream(0, 0, blocks[0]))
        with pytest.raises(ValueError):
            client.fetch("b", "v1", [(1, 0)], m, out={(1, 0): bytearray(10)})
        client._fetch_blocks = lambda request, timeout: iter(raw_stream(0, 0, bytes(384)))
        with pytest.raises(BlockIntegrityError):
            client.fetch("b", "v1", [(1, 0)], m, out={(1, 0): bytearray(384)})
        client._fetch_blocks = lambda request, timeout: iter([b"\x0a\xff\xff"])
        with pytest.raises(BlockIntegrityError):
            client.fetch("b", "v1", [(1, 0)], m)
    finally:
        client.close()
