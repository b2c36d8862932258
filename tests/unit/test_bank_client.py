"""BankClient reassembly against hand-made chunk streams: a bad block is never returned.

No server: the FetchBlocks call is replaced by a list of BlockChunks.
Run: .venv/bin/python -m pytest -q tests/unit/test_bank_client.py
"""
import pytest

from membank import wire
from membank.blocks import checksum
from membank.manifest import Manifest
from membank.v1 import bank_pb2
from services.model_client.bank_client import BankClient, BlockIntegrityError

# level 1 blocks: 1 layer x 3 x r=4 x d=8 x 4 bytes = 384 bytes; level 2: r=0
NBYTES = 384
BLOCKS = [bytes([n]) * NBYTES for n in range(2)]
MANIFEST = Manifest(bank="b", version="v1", dtype="float32", d_model=8, mem_layers=[0], branching=2,
                    ranks=[4, 0], checksums=[[checksum(b) for b in BLOCKS], []])


def header(node, **over):
    h = dict(level=1, node=node, version="v1", checksum=MANIFEST.checksum(1, node), nbytes=NBYTES,
             dtype="float32", shape=list(MANIFEST.block_shape(1)))
    return {**h, **over}


def chunks_of(index, node, data=None, **over):
    data = BLOCKS[node] if data is None else data
    return [bank_pb2.BlockChunk.FromString(c)
            for c in wire.iter_block_chunks(index, header(node, **over), data)]


def fetch_with(chunks, ids=((1, 0), (1, 1))):
    client = BankClient("127.0.0.1:1")             # never connects: the call is replaced
    client._fetch_blocks = lambda request, timeout: iter(chunks)
    try:
        return client.fetch("b", "v1", list(ids), MANIFEST)
    finally:
        client.close()


def split(chunk, at):
    """Two chunks carrying the first `at` bytes and the rest of one chunk's data."""
    a = bank_pb2.BlockChunk(index=chunk.index, header=chunk.header, offset=chunk.offset,
                            data=chunk.data[:at])
    b = bank_pb2.BlockChunk(index=chunk.index, offset=chunk.offset + at, data=chunk.data[at:])
    return a, b


def test_good_stream():
    a, b = split(chunks_of(1, 1)[0], 100)
    got = fetch_with(chunks_of(0, 0) + [a, b])
    assert {k: bytes(v) for k, v in got.items()} == {(1, 0): BLOCKS[0], (1, 1): BLOCKS[1]}


@pytest.mark.parametrize("make", [
    lambda: chunks_of(0, 0),                                          # block 1 never arrives
    lambda: chunks_of(0, 0) + [split(chunks_of(1, 1)[0], 100)[0]],   # block 1 truncated
    lambda: chunks_of(0, 0) + [split(chunks_of(1, 1)[0], 100)[1]],   # data before header
    lambda: chunks_of(0, 0) + list(reversed(split(chunks_of(1, 1)[0], 100))),  # out of order
    lambda: chunks_of(0, 0) + chunks_of(1, 1, data=bytes(NBYTES)),   # bytes fail the checksum
    lambda: chunks_of(0, 0) + chunks_of(1, 1, checksum="0" * 16),    # header disagrees
    lambda: chunks_of(0, 0) + chunks_of(1, 1, version="v2"),
    lambda: chunks_of(0, 0) + chunks_of(1, 1, shape=[1, 3, 4, 9]),
    lambda: chunks_of(0, 0) + chunks_of(1, 0),                       # block 1 carries node 0
    lambda: chunks_of(0, 0) + chunks_of(0, 0) + chunks_of(1, 1),     # a second header
    lambda: chunks_of(0, 0) + chunks_of(1, 1) + chunks_of(2, 1),     # an index never asked for
    lambda: chunks_of(0, 0) + chunks_of(1, 1, data=BLOCKS[1] + b"x"),  # too many bytes
])
def test_bad_streams_raise(make):
    with pytest.raises(BlockIntegrityError):
        fetch_with(make())


def test_manifest_must_match_the_request():
    with BankClient("127.0.0.1:1") as client:
        with pytest.raises(ValueError):
            client.fetch("b", "v2", [(1, 0)], MANIFEST)
        with pytest.raises(ValueError):
            client.fetch("other", "v1", [(1, 0)], MANIFEST)
