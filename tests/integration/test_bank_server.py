"""The bank server as a real subprocess, driven through BankClient and raw gRPC.

Run: .venv/bin/python -m pytest -q tests/integration/test_bank_server.py
"""
from __future__ import annotations

import shutil

import grpc
import lmdb
import pytest

from membank.artifacts import iter_blocks, load_manifest
from membank.blocks import checksum
from membank.v1 import bank_pb2
from services.bank_server.store import LMDBStore
from services.model_client.bank_client import BankClient, BankError, BlockIntegrityError
from testkit.keys import trust
from tests.conftest import as_exported

pytestmark = pytest.mark.integration


def exported_blocks(export_dir) -> dict[tuple[int, int], bytes]:
    m = load_manifest(export_dir)
    return {(level, node): bytes(data) for level, node, data in iter_blocks(export_dir, m)}


@pytest.fixture(scope="module")
def tiny_blocks(tiny_export):
    return exported_blocks(tiny_export)


@pytest.fixture(scope="module")
def big_blocks(big_export):
    return exported_blocks(big_export)


@pytest.fixture
def client(bank_server):
    with BankClient(bank_server, timeout_s=10) as c:
        yield c


def assert_same(got: dict, want: dict, manifest):
    assert set(got) == set(want)
    for block_id, data in got.items():
        assert isinstance(data, bytearray)
        assert bytes(data) == want[block_id]
        assert checksum(data) == manifest.checksum(*block_id)


# -- happy paths -------------------------------------------------------------------------------
def test_get_manifest_round_trip(client, tiny_export, big_export):
    assert as_exported(client.get_manifest("test")) == load_manifest(tiny_export)
    assert as_exported(client.get_manifest("test", "v1")) == load_manifest(tiny_export)
    assert as_exported(client.get_manifest("big")) == load_manifest(big_export)
    assert trust().check(client.get_manifest("big"))        # signed with the test key


def test_fetch_every_block_in_one_call(client, tiny_blocks):
    m = client.get_manifest("test")
    got = client.fetch("test", m.version, list(m.blocks()), m)
    assert_same(got, tiny_blocks, m)


def test_fetch_in_several_calls(client, tiny_blocks):
    m = client.get_manifest("test")
    got = {}
    for path in ([0, 0], [0, 1], [1, 0], [1, 1]):
        got.update(client.fetch("test", "", m.path_blocks(path), m))
    assert_same(got, tiny_blocks, m)


def test_fetch_multi_chunk_bfloat16_blocks(client, big_blocks):
    m = client.get_manifest("big")
    assert m.block_nbytes(1) > 1 << 20            # really spans several chunks
    got = client.fetch("big", "b1", list(m.blocks()), m)
    assert_same(got, big_blocks, m)
    # any order is fine; a block listed twice is refused (one request must not cost many
    # sends of one block: issue 16), by the client's own check as by the server's
    again = client.fetch("big", "b1", [(3, 7), (1, 1)], m)
    assert list(again) == [(3, 7), (1, 1)]
    e = fetch_error(client, "big", "b1", [(3, 7), (1, 1), (3, 7)], m)
    assert e.code == "INVALID_ARGUMENT" and "block (3, 7) is listed twice" in e.message


def test_health(client, bank_server):
    assert client.health()
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with grpc.insecure_channel(bank_server) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "membank.v1.BankService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert not BankClient("127.0.0.1:1", timeout_s=1).health(timeout_s=0.5)


# -- errors ------------------------------------------------------------------------------------
def fetch_error(client, bank, version, blocks, manifest) -> BankError:
    with pytest.raises(BankError) as e:
        client.fetch(bank, version, blocks, manifest)
    return e.value


def test_node_out_of_range_is_not_found(client):
    m = client.get_manifest("test")
    err = fetch_error(client, "test", "v1", [(1, 0), (2, 4)], m)
    assert err.code == "NOT_FOUND" and "node 4" in err.message


def test_unknown_bank_and_version_are_not_found(client, bank_server):
    with pytest.raises(BankError) as e:
        client.get_manifest("nope")
    assert e.value.code == "NOT_FOUND"
    with pytest.raises(BankError) as e:
        client.get_manifest("test", "v999")
    assert e.value.code == "NOT_FOUND"
    # FetchBlocks directly, as a client holding a stale manifest would
    m = client.get_manifest("test")
    assert fetch_error(client, "nope", "v1", [(1, 0)], m.model_copy(update={"bank": "nope"})).code \
        == "NOT_FOUND"
    assert fetch_error(client, "test", "v9", [(1, 0)],
                       m.model_copy(update={"version": "v9"})).code \
        == "NOT_FOUND"


@pytest.mark.parametrize("bank, level", [("test", 0), ("test", 99), ("big", 2)])  # big: r_2 = 0
def test_bad_level_is_invalid_argument(client, bank, level):
    m = client.get_manifest(bank)
    err = fetch_error(client, bank, m.version, [(level, 0)], m)
    assert err.code == "INVALID_ARGUMENT"


def raw_fetch(address, request: bytes):
    """FetchBlocks with hand-made request bytes; returns the grpc.RpcError."""
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_stream("/membank.v1.BankService/FetchBlocks",
                               request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            list(call(request, timeout=5))
    return e.value


def test_malformed_requests_are_invalid_argument(bank_server, client):
    assert raw_fetch(bank_server, b"\xff\xff\xff").code() == grpc.StatusCode.INVALID_ARGUMENT
    empty_bank = bank_pb2.FetchBlocksRequest(blocks=[bank_pb2.BlockId(level=1, node=0)])
    assert raw_fetch(bank_server, empty_bank.SerializeToString()).code() \
        == grpc.StatusCode.INVALID_ARGUMENT
    no_blocks = bank_pb2.FetchBlocksRequest(bank="test")
    assert raw_fetch(bank_server, no_blocks.SerializeToString()).code() \
        == grpc.StatusCode.INVALID_ARGUMENT
    too_many = bank_pb2.FetchBlocksRequest(bank="test", blocks=[bank_pb2.BlockId(level=1)] * 65)
    err = raw_fetch(bank_server, too_many.SerializeToString())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "65" in err.details()
    with grpc.insecure_channel(bank_server) as ch:
        get = ch.unary_unary("/membank.v1.BankService/GetManifest",
                             request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            get(b"\xff\xff\xff", timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # none of that hurt the server
    assert client.health()
    m = client.get_manifest("test")
    assert len(client.fetch("test", "v1", [(1, 1)], m)) == 1


def test_header_disagreeing_with_manifest_is_refused(client):
    # a client whose manifest differs from the server's version must not accept the blocks
    m = client.get_manifest("test")
    fake = m.model_copy(update={"checksums": [["0" * 16] * 2, m.checksums[1]]})
    with pytest.raises(BlockIntegrityError):
        client.fetch("test", "v1", [(1, 0)], fake)
    assert len(client.fetch("test", "v1", [(2, 0)], fake)) == 1   # other level still fine


def test_corrupted_block_is_data_loss(lmdb_dir, tmp_path, start_bank_server, tiny_blocks):
    copy = tmp_path / "corrupt.lmdb"
    shutil.copytree(lmdb_dir, copy)
    with LMDBStore(copy, 1 << 30) as store:
        key = store.manifest("test", "v1").storage_key(2, 1)
    bad = bytearray(tiny_blocks[(2, 1)])
    bad[100] ^= 0xFF
    env = lmdb.open(str(copy), map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(key, bytes(bad))
    env.close()
    with start_bank_server(copy) as (address, _), BankClient(address) as c:
        m = c.get_manifest("test")
        err = fetch_error(c, "test", "v1", [(1, 0), (2, 1)], m)
        assert err.code == "DATA_LOSS"
        assert isinstance(err, BankError) and not isinstance(err, BlockIntegrityError)
        # the intact blocks are still served
        assert bytes(c.fetch("test", "v1", [(2, 0)], m)[(2, 0)]) == tiny_blocks[(2, 0)]


# -- Redis tier --------------------------------------------------------------------------------
def test_redis_tier_caches_and_survives_redis_outage(lmdb_dir, redis_server, start_bank_server,
                                                     tiny_blocks, big_blocks):
    r = redis_server.client()
    with start_bank_server(lmdb_dir, "--redis-url", redis_server.url) as (address, _), \
            BankClient(address) as c:
        m = c.get_manifest("test")
        ids = list(m.blocks())
        assert_same(c.fetch("test", "v1", ids, m), tiny_blocks, m)
        # every block is now in Redis, under its content key (and nothing else is)
        assert all(r.exists(m.storage_key(*b)) for b in ids)
        assert {k.decode()[:2] for k in r.keys("*")} == {"h/"}
        assert 0 < r.ttl(m.storage_key(1, 0)) <= 3600

        hits_before = r.info("stats")["keyspace_hits"]
        assert_same(c.fetch("test", "v1", ids, m), tiny_blocks, m)
        assert r.info("stats")["keyspace_hits"] - hits_before >= len(ids)

        # Redis goes away: fetches degrade to LMDB, never fail
        redis_server.proc.kill()
        redis_server.proc.wait()
        for _ in range(2):
            assert_same(c.fetch("test", "v1", ids, m), tiny_blocks, m)
        mb = c.get_manifest("big")
        assert_same(c.fetch("big", "b1", list(mb.blocks()), mb), big_blocks, mb)
        assert c.health()
