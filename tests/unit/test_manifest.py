"""membank/manifest.py: inconsistent manifests are refused; shapes and path_blocks.

Run: .venv/bin/python -m pytest -q tests/unit/test_manifest.py
"""
import pytest
from pydantic import ValidationError

from membank.manifest import Manifest


def make(**over) -> dict:
    base = dict(bank="test", version="v1", dtype="float32", d_model=32, mem_layers=[0, 1],
                branching=2, ranks=[8, 4], checksums=[["a"] * 2, ["b"] * 4])
    return {**base, **over}


def test_valid_roundtrip():
    m = Manifest(**make())
    assert Manifest.from_json(m.to_json()) == m
    assert m.depth == 2 and m.n_nodes(2) == 4
    assert m.block_shape(1) == (2, 3, 8, 32)
    assert m.block_nbytes(1) == 2 * 3 * 8 * 32 * 4
    assert Manifest(**make(dtype="bfloat16")).block_nbytes(2) == 2 * 3 * 4 * 32 * 2
    assert list(m.blocks()) == [(1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (2, 3)]


@pytest.mark.parametrize("over", [
    dict(checksums=[["a"] * 2]),                        # fewer levels of checksums than ranks
    dict(checksums=[["a"] * 2, ["b"] * 3]),             # wrong count at a level
    dict(ranks=[8, 0], checksums=[["a"] * 2, ["b"] * 4]),   # r = 0 level must list none
    dict(shards=[]),
    dict(shards=["s0", "s0"]),
    dict(bank=""),
    dict(bank="a/b"),                                   # would break the key layout
    dict(version="v 1"),
    dict(dtype="float16"),
    dict(branching=1, checksums=[["a"], ["b"]]),
    dict(replication=0),
    dict(placement_level=0),
    dict(d_model=0),
    dict(extra_field=1),
])
def test_inconsistent_manifests_are_refused(over):
    with pytest.raises(ValidationError):
        Manifest(**make(**over))


def test_bad_json_is_refused():
    with pytest.raises(ValidationError):
        Manifest.from_json('{"format": "membank.manifest/2"}')


def test_path_blocks():
    m = Manifest(**make())
    assert m.path_blocks([0, 0]) == [(1, 0), (2, 0)]
    assert m.path_blocks([1, 0]) == [(1, 1), (2, 2)]
    assert m.path_blocks([1, 1]) == [(1, 1), (2, 3)]
    skip = Manifest(**make(ranks=[0, 4], checksums=[[], ["b"] * 4]))
    assert skip.path_blocks([1, 1]) == [(2, 3)]           # the r = 0 level holds no block
    assert not skip.has_block(1, 0) and skip.has_block(2, 3) and not skip.has_block(2, 4)


def test_owners_uses_the_manifest_shard_map():
    m = Manifest(**make(shards=["a", "b", "c"], replication=2, placement_level=2))
    assert m.owners(1, 0) == ["a", "b", "c"]
    assert len(m.owners(2, 3)) == 2


def test_memory_kind_and_block_width():
    # a manifest from before kinds
    old = Manifest(**make()).model_dump(exclude={"kind", "block_width"})
    m = Manifest.model_validate(old)
    assert m.kind == "ffn" and m.block_shape(1) == (2, 3, 8, 32)
    lora = Manifest(**make(kind="lora-ffn", block_width=96))
    assert lora.block_shape(2) == (2, 3, 4, 96) and Manifest.from_json(lora.to_json()) == lora
    assert Manifest(**make(kind="kv", block_width=24)).block_shape(1) == (2, 2, 8, 24)
    for over in (dict(kind="kv"), dict(block_width=31), dict(kind="lora-xx", block_width=8)):
        with pytest.raises(ValidationError):
            Manifest(**make(**over))


def test_block_header_is_what_the_wire_carries():
    m = Manifest(**make(encodings={"int8": [["i"] * 2, ["j"] * 4]}))
    assert m.block_header(2, 3) == (2, 3, "v1", "b", m.block_nbytes(2), "float32", (2, 3, 4, 32))
    h = m.block_header(1, 1, "int8")
    assert (h.checksum, h.nbytes, h.dtype) == ("i", m.block_nbytes(1, "int8"), "int8")
    assert list(h._asdict()) == ["level", "node", "version", "checksum", "nbytes", "dtype",
                                 "shape"]                     # the wire's field order


@pytest.mark.parametrize("blocks, encoding, code, message", [
    ([(1, 0), (2, 3)], "", None, None),
    ([(0, 0)], "", "INVALID_ARGUMENT", "level 0 has no blocks in test/v1 (levels with blocks: "
                                       "[2])"),
    ([(1, 0)], "", "INVALID_ARGUMENT", "level 1 has no blocks"),          # r = 0
    ([(3, 0)], "", "INVALID_ARGUMENT", "level 3 has no blocks"),
    ([(2, 0), (2, 4)], "", "NOT_FOUND", "no node 4 at level 2 (it has 4 nodes)"),
    ([(2, -1)], "", "NOT_FOUND", "no node -1 at level 2"),
    ([(0, 0)], "int8", "NOT_FOUND", "test/v1 has no int8 blocks (available: native)"),
])
def test_check_fetch_answers_as_the_server_does(blocks, encoding, code, message):
    from membank.fetch import FetchError, check_fetch

    m = Manifest(**make(ranks=[0, 4], checksums=[[], ["b"] * 4]))
    if code is None:
        check_fetch(Manifest(**make()), blocks, encoding)
        return
    with pytest.raises(FetchError) as e:
        check_fetch(m, blocks, encoding)
    assert e.value.code == code and e.value.message.startswith(message), e.value
