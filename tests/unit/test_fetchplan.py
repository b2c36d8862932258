"""fetchplan.py (the checks every block transport shares) over a real ingested LMDB, and the data
plane client's target syntax and fetch plan (pure functions, no server). The protocol itself:
test_dataplane_protocol.py.

Run: .venv/bin/python -m pytest -q tests/unit/test_fetchplan.py
"""
from __future__ import annotations

import json
import shutil

import lmdb
import pytest

from membank.artifacts import iter_blocks, load_manifest
from membank.keys import manifest_key
from services.bank_server.fetchplan import (
    FetchError,
    admit_bytes,
    plan_fetch,
    read_block,
    resolve_manifest,
)
from services.bank_server.ingest import ingest
from services.bank_server.security import RateLimiter
from services.bank_server.store import LMDBStore
from services.model_client.dataplane_client import dataplane_target, parse_target
from tests.conftest import as_exported

MAP = 1 << 30


@pytest.fixture(scope="module")
def store(lmdb_dir):
    with LMDBStore(lmdb_dir, MAP) as s:
        yield s


def refused(fn, *args, **kw) -> FetchError:
    with pytest.raises(FetchError) as e:
        fn(*args, **kw)
    return e.value


@pytest.mark.parametrize("bank, version, blocks, code, words", [
    ("test", "", [], "INVALID_ARGUMENT", "no blocks requested"),
    ("test", "", [(1, 0)] * 65, "INVALID_ARGUMENT", "65 blocks requested, at most 64"),
    ("", "", [(1, 0)], "INVALID_ARGUMENT", "empty bank name"),
    ("a/../b", "", [(1, 0)], "INVALID_ARGUMENT", "invalid bank name"),
    ("x" * 129, "", [(1, 0)], "INVALID_ARGUMENT", "invalid bank name"),
    ("nope", "", [(1, 0)], "NOT_FOUND", "unknown bank 'nope'"),
    ("nope", "v1", [(1, 0)], "NOT_FOUND", "unknown bank 'nope'"),
    ("test", "v9", [(1, 0)], "NOT_FOUND", "unknown version 'v9'"),
    ("test", "", [(0, 0)], "INVALID_ARGUMENT", "level 0 has no blocks in test/v1"),
    ("test", "", [(3, 0)], "INVALID_ARGUMENT", "level 3"),
    ("test", "", [(-1, 0)], "INVALID_ARGUMENT", "level -1"),
    ("big", "", [(2, 0)], "INVALID_ARGUMENT", "levels with blocks: [1, 3]"),
    ("test", "", [(2, 4)], "NOT_FOUND", "no node 4 at level 2 (it has 4 nodes)"),
    ("test", "", [(1, -1)], "NOT_FOUND", "no node -1"),
    ("test", "", [(1, 2 ** 64 - 1)], "NOT_FOUND", "no node"),
    ("test", "", [(1, 0), (2, 9)], "NOT_FOUND", "no node 9"),      # after a good id
    # one 27.5 MB block listed 64 times would cost 64 sends for a 1 KB request (issue 16)
    ("test", "", [(1, 0), (2, 1), (1, 0)], "INVALID_ARGUMENT", "block (1, 0) is listed twice"),
    ("test", "", [(2, 1), (2, 1)], "INVALID_ARGUMENT", "block (2, 1) is listed twice"),
])
def test_every_check_and_its_message(store, bank, version, blocks, code, words):
    e = refused(plan_fetch, store, bank, version, blocks)
    assert e.code == code and words in e.message, e


def test_admit_bytes_charges_the_plan_per_client(store):
    plan = plan_fetch(store, "big", "", [(1, 0), (1, 1)])
    limiter = RateLimiter(rate=1e6, burst=4e6)
    admit_bytes(None, "peer:a", plan)                      # no limiter: no byte limit
    admit_bytes(limiter, "peer:a", plan)                   # 3.7 MB of 4
    e = refused(admit_bytes, limiter, "peer:a", plan)
    assert e.code == "RESOURCE_EXHAUSTED" and "byte rate limit exceeded (1 MB/s" in e.message
    assert "retry in" in e.message
    admit_bytes(limiter, "peer:b", plan)                   # another client's own budget


def test_unknown_encoding_is_invalid_argument(store):
    e = refused(plan_fetch, store, "test", "", [(1, 0)], encoding="int4")
    assert (e.code, "unknown encoding 'int4'" in e.message) == ("INVALID_ARGUMENT", True)


def test_a_plan_has_every_header_field_in_request_order(store, tiny_export):
    m = load_manifest(tiny_export)
    plan = plan_fetch(store, "test", "", [(2, 3), (1, 0), (2, 1)])
    assert as_exported(plan.manifest) == m
    assert plan.nbytes == 2 * m.block_nbytes(2) + m.block_nbytes(1)
    assert [(b.index, b.level, b.node) for b in plan.blocks] == [(0, 2, 3), (1, 1, 0), (2, 2, 1)]
    b = plan.blocks[0]
    assert b.key == plan.manifest.storage_key(2, 3)
    assert b.key.startswith(b"h/test/blake3-")            # stored by content (issue 18)
    assert b.expect.nbytes == m.block_nbytes(2) and b.expect.checksum == m.checksum(2, 3)
    assert b.header == m.block_header(2, 3)
    assert b.header._asdict() == {"level": 2, "node": 3, "version": "v1",
                                  "checksum": m.checksum(2, 3), "nbytes": m.block_nbytes(2),
                                  "dtype": "float32", "shape": m.block_shape(2)}
    assert as_exported(resolve_manifest(store, "test", "v1")) == m


def test_read_block_yields_the_verified_bytes(store, tiny_export):
    m = load_manifest(tiny_export)
    want = {(l, n): d for l, n, d in iter_blocks(tiny_export, m)}
    plan = plan_fetch(store, "test", "v1", list(m.blocks()))
    for b in plan.blocks:
        with read_block(store, store, plan.manifest, b) as buf:
            assert bytes(buf) == want[(b.level, b.node)]


def test_wrong_shard_names_the_owners(tiny_export, tmp_path):
    path = tmp_path / "s0.lmdb"
    ingest(tiny_export, path, shard_id="s0", shards=["s0", "s1", "s2"], replication=1,
           placement_level=2, progress=False, map_size=MAP)
    with LMDBStore(path, MAP) as s:
        m = s.manifest("test", "v1")
        mine = next(b for b in m.blocks() if m.owners(*b) == ["s0"])
        theirs = next(b for b in m.blocks() if "s0" not in m.owners(*b))
        assert len(plan_fetch(s, "test", "", [mine], shard_id="s0").blocks) == 1
        e = refused(plan_fetch, s, "test", "", [mine, theirs], shard_id="s0")
        assert e.code == "FAILED_PRECONDITION"
        assert e.message == (f"block ({theirs[0]}, {theirs[1]}) of test/v1 is on shard "
                             f"{m.owners(*theirs)[0]}, not on this shard (s0)")


def test_corrupt_missing_and_collected_blocks(lmdb_dir, tmp_path):
    copy = tmp_path / "copy.lmdb"
    shutil.copytree(lmdb_dir, copy)
    with LMDBStore(copy, MAP) as s:
        m = s.manifest("test", "v1")
    env = lmdb.open(str(copy), map_size=MAP)
    with env.begin(write=True) as txn:
        bad = bytearray(txn.get(m.storage_key(2, 1)))
        bad[7] ^= 0x01
        txn.put(m.storage_key(2, 1), bytes(bad))
        txn.delete(m.storage_key(2, 2))
    env.close()
    with LMDBStore(copy, MAP, readonly=False) as s:      # writable: gc is simulated below
        plan = plan_fetch(s, "test", "", [(2, 1), (2, 2), (2, 3)])
        corrupt, missing, fine = plan.blocks
        for b, words in ((corrupt, "block (2, 1) of test/v1 fails its manifest checksum"),
                         (missing, "block (2, 2) of test/v1 is missing from the store")):
            with pytest.raises(FetchError) as e:
                with read_block(s, s, plan.manifest, b):
                    pytest.fail("a bad block was yielded")
            assert (e.value.code, e.value.message) == ("DATA_LOSS", words)
        # the version is garbage-collected after the plan was made: NOT_FOUND, not DATA_LOSS
        with s.env.begin(write=True) as txn:
            txn.delete(manifest_key("test", "v1"))
            txn.delete(fine.key)
        with pytest.raises(FetchError) as e:
            with read_block(s, s, plan.manifest, fine):
                pass
        assert (e.value.code == "NOT_FOUND"
                and "garbage-collected during this fetch" in e.value.message)


# -- the data plane's target syntax and the device's fetch plan -------------------------------
def test_target_syntax():
    assert parse_target("127.0.0.1:50051+50052") == ("127.0.0.1:50051", "127.0.0.1", 50052)
    assert parse_target("[::1]:50051+7") == ("[::1]:50051", "::1", 7)
    assert parse_target("bank.example:443+9000")[1:] == ("bank.example", 9000)
    assert dataplane_target("h:1", "h:2") == "h:1+2" and dataplane_target("h:1", 3) == "h:1+3"
    for bad in ("127.0.0.1:50051", "127.0.0.1+50052", ":1+2", "h:1+x", "h:1+0", "h:1+70000", ""):
        with pytest.raises(ValueError, match="HOST:GRPC_PORT"):
            parse_target(bad)


def test_client_plan_checks_headers_and_skips_only_bytes_it_already_checked(tiny_export):
    """The device's fetch plan (dataplane_client._Plan): the request is JSON with the deadline
    in front; a header passes only if it agrees with the manifest, and only the very bytes of
    a header that passed are let through again without parsing."""
    from services.model_client.bank_client import BlockIntegrityError
    from services.model_client.dataplane_client import _Plan

    m = load_manifest(tiny_export)
    plan = _Plan(m, ((2, 3), (1, 0)), "", "tok")
    assert json.loads(plan.request_json(1234.5)) == {
        "deadline_ms": 1234.5, "bank": "test", "version": "v1", "blocks": [[2, 3], [1, 0]],
        "encoding": "", "token": "tok"}
    assert plan.nbytes == [m.block_nbytes(2), m.block_nbytes(1)] and plan.end == b'{"blocks":2}'
    good = {"index": 0, "level": 2, "node": 3, "version": "v1", "checksum": m.checksum(2, 3),
            "nbytes": m.block_nbytes(2), "dtype": m.dtype, "shape": list(m.block_shape(2))}

    def header(**changes) -> bytes:
        return json.dumps({**good, **changes}, separators=(",", ":")).encode()

    plan.check_header(0, header())
    assert plan.seen[0] == header()
    for bad in (header(checksum="0" * 16), header(index=1), header(version="v2"),
                header(nbytes=1), header(shape=[1, 2])):
        with pytest.raises(BlockIntegrityError):
            plan.check_header(0, bad)
    plan.check_header(0, header())                    # the checked bytes still pass
    with pytest.raises(BlockIntegrityError):          # block 1's header is another block's
        plan.check_header(1, header(index=1))
    # a block the manifest lacks is the server's answer, before any request
    e = refused(_Plan, m, ((2, 3), (9, 0)), "", None)
    assert (e.code, e.message) == ("INVALID_ARGUMENT", "level 9 has no blocks in test/v1 "
                                                       "(levels with blocks: [1, 2])")
