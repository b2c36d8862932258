"""BankServicer.fetch_blocks against a real LMDB when the store changes under a fetch, and the
configurable blocks-per-request limit. The servicer runs in-process (no gRPC server) with a
context double whose `abort` raises, so the interleavings are exact, not timing-dependent.

Run: .venv/bin/python -m pytest -q tests/unit/test_servicer_races.py
"""
from __future__ import annotations

import asyncio
from contextlib import contextmanager

import grpc
import pytest

from membank.v1 import bank_pb2
from services.bank_server.gc import gc
from services.bank_server.ingest import ingest
from services.bank_server.servicer import BankServicer
from services.bank_server.settings import BankServerSettings
from services.bank_server.store import LMDBStore

MAP = 1 << 30


class Aborted(Exception):
    def __init__(self, code, details):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class Context:
    """The grpc.aio.ServicerContext methods the servicer uses; `write` keeps the chunks."""

    def __init__(self):
        self.chunks: list[bytes] = []

    async def write(self, chunk):
        self.chunks.append(chunk)

    def peer(self):
        return "ipv4:127.0.0.1:1"

    async def abort(self, code, details):
        raise Aborted(code, details)

    def time_remaining(self):
        return None


class GcOnFirstRead:
    """A block tier that lets a `gc` of every old version run just before the first block read:
    the fetch has already resolved its manifest, exactly the window a concurrent gc hits."""

    def __init__(self, store: LMDBStore, run_gc):
        self.store, self.run_gc, self.fired = store, run_gc, False

    @contextmanager
    def read(self, key, expect=None):
        if not self.fired:
            self.fired = True
            self.run_gc()
        with self.store.read(key, expect) as buf:
            yield buf

    def stats(self):
        return self.store.stats()


def fetch(servicer: BankServicer, bank: str, version: str, blocks) -> list[bytes]:
    req = bank_pb2.FetchBlocksRequest(bank=bank, version=version, blocks=[
        bank_pb2.BlockId(level=l, node=n) for l, n in blocks])

    async def drain():
        context = Context()
        await servicer.fetch_blocks(req, context)
        return context.chunks
    return asyncio.run(drain())


@pytest.fixture
def two_versions(tiny_export, tmp_path):
    """An LMDB with test/v1 and test/v2, v2 published; stored by version, so that each has
    its own copy of every block for gc to take away (by content they would share them)."""
    db = tmp_path / "db"
    ingest(tiny_export, db, version="v1", progress=False, map_size=MAP, block_store="version")
    ingest(tiny_export, db, version="v2", progress=False, map_size=MAP, block_store="version")
    return db


def test_fetch_racing_gc_of_its_version_is_not_found(two_versions):
    # writable: gc in this process shares the environment (one per process and path)
    store = LMDBStore(two_versions, MAP, readonly=False)
    try:
        blocks = GcOnFirstRead(store, lambda: gc(two_versions, "test", keep=0, map_size=MAP))
        servicer = BankServicer(store, blocks)
        with pytest.raises(Aborted) as e:
            fetch(servicer, "test", "v1", [(1, 0), (2, 1)])
        assert blocks.fired
        assert e.value.code == grpc.StatusCode.NOT_FOUND, e.value
        assert "v1" in e.value.details and "garbage-collected" in e.value.details
        # the published version is untouched and still served
        assert len(fetch(servicer, "test", "v2", [(1, 0), (2, 1)])) >= 2
        # after the gc, the version is plainly unknown
        with pytest.raises(Aborted) as e:
            fetch(servicer, "test", "v1", [(1, 0)])
        assert e.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        store.close()


def test_block_missing_while_version_exists_is_still_data_loss(two_versions):
    import lmdb

    from membank.keys import block_key
    env = lmdb.open(str(two_versions), map_size=MAP)
    with env.begin(write=True) as txn:
        txn.delete(block_key("test", "v2", 2, 1))       # lost from disk, manifest intact
    env.close()
    with LMDBStore(two_versions, MAP) as store:
        with pytest.raises(Aborted) as e:
            fetch(BankServicer(store, store), "test", "v2", [(2, 1)])
    assert e.value.code == grpc.StatusCode.DATA_LOSS and "missing" in e.value.details


def test_blocks_per_request_limit_is_a_setting(two_versions, monkeypatch):
    monkeypatch.delenv("MEMBANK_SERVER_MAX_BLOCKS_PER_REQUEST", raising=False)
    assert BankServerSettings.from_args([]).max_blocks_per_request == 64
    s = BankServerSettings.from_args(["--max-blocks-per-request", "3"])
    assert s.max_blocks_per_request == 3
    monkeypatch.setenv("MEMBANK_SERVER_MAX_BLOCKS_PER_REQUEST", "5")
    assert BankServerSettings.from_args([]).max_blocks_per_request == 5
    with pytest.raises(ValueError):
        BankServerSettings(max_blocks_per_request=0)
    with LMDBStore(two_versions, MAP) as store:
        servicer = BankServicer(store, store, max_blocks_per_request=s.max_blocks_per_request)
        assert len(fetch(servicer, "test", "v2", [(1, 0), (1, 1), (2, 0)])) >= 3
        with pytest.raises(Aborted) as e:
            fetch(servicer, "test", "v2", [(1, 0), (1, 1), (2, 0), (2, 1)])
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "4 blocks requested, at most 3" in e.value.details
