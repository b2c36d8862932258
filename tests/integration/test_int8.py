"""int8 blocks end to end: ingest `--encodings int8`, a bank server subprocess serving them over
real gRPC, the device verifying and dequantizing them; and the failure cases.

  ingest --encodings int8    -> int8 payloads beside the native blocks, their checksums in the
                                manifest, nothing visible before all of them are written
                                (kill -9 mid-ingest, then a rerun)
  FetchBlocks encoding=int8  -> header dtype int8, bytes = quant.encode_block(native), checksum
                                of the manifest's int8 table; through the LRU tier, native and
                                int8 of one block never mix
  MemoryModel(encoding=int8) -> attached weights == dequantize(quantize(native))
  a corrupted int8 block     -> DATA_LOSS (its native block still served)
  a version without int8     -> NOT_FOUND naming the encodings it has; unknown encoding ->
                                INVALID_ARGUMENT
  gc / rebalance             -> int8 blocks deleted / moved with their native blocks

Run: .venv/bin/python -m pytest -q tests/integration/test_int8.py
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import lmdb
import pytest
import torch

from membank import quant
from membank.artifacts import iter_blocks, load_manifest
from membank.blocks import checksum
from membank.nn.tensors import roundtrip, tensor_from_buffer
from membank.placement import shard_blocks
from membank.v1 import bank_pb2
from services.bank_server.gc import gc
from services.bank_server.ingest import IngestError, ingest
from services.bank_server.rebalance import rebalance
from services.bank_server.store import Expect, LMDBStore
from services.model_client.bank_client import BankClient, BankError
from services.model_client.fetcher import ShardedFetcher
from services.model_client.memory_model import MemoryModel
from services.model_client.targets import client_factory
from testkit.exports import synthetic_export
from testkit.keys import signing_key, trust
from tests.conftest import REPO, FakeEmbedder, start_ingest_writing

pytestmark = pytest.mark.integration
MAP = 1 << 30
INT8 = ("int8",)


@pytest.fixture(scope="module")
def int8_lmdb(tiny_model_export, tmp_path_factory) -> Path:
    """Bank "test": "vnative" (native only), "vbad" (int8, its int8 block (2, 1) then
    corrupted on disk) and "v1" (int8, published last: current)."""
    db = tmp_path_factory.mktemp("int8") / "bank.lmdb"
    key = signing_key()      # the test operator's (testkit/keys.py): devices pin it
    ingest(tiny_model_export, db, version="vnative", progress=False, map_size=MAP,
           signing_key=key)
    # vbad in the versioned layout, so corrupting its block leaves v1's (same content) intact
    bad_m = ingest(tiny_model_export, db, version="vbad", encodings=INT8, publish=False,
                   progress=False, map_size=MAP, signing_key=key, block_store="version")
    m = ingest(tiny_model_export, db, version="v1", encodings=INT8, progress=False, map_size=MAP,
               signing_key=key)
    assert m.encodings and m.version == "v1"
    env = lmdb.open(str(db), map_size=MAP)
    key = bad_m.storage_key(2, 1, "int8")
    with env.begin(write=True) as txn:
        bad = bytearray(txn.get(key))
        bad[5] ^= 0x7F
        txn.put(key, bytes(bad))
    env.close()
    return db


@pytest.fixture(scope="module")
def served(int8_lmdb, tmp_path_factory):
    """A bank server subprocess over int8_lmdb, with the in-process LRU tier on."""
    from tests.conftest import run_bank_server
    log = tmp_path_factory.mktemp("int8-logs") / "server.log"
    with run_bank_server(int8_lmdb, "--lru-mb", "8", log_path=log) as (address, _):
        yield address


@pytest.fixture(scope="module")
def native_blocks(tiny_model_export):
    m = load_manifest(tiny_model_export)
    return {(l, n): bytes(d) for l, n, d in iter_blocks(tiny_model_export, m)}


def raw_fetch(address: str, **request) -> grpc.RpcError | list:
    """FetchBlocks without the client's own checks; the RpcError, or the chunks."""
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_stream("/membank.v1.BankService/FetchBlocks",
                               request_serializer=bank_pb2.FetchBlocksRequest.SerializeToString,
                               response_deserializer=bank_pb2.BlockChunk.FromString)
        try:
            return list(call(bank_pb2.FetchBlocksRequest(**request), timeout=10))
        except grpc.RpcError as e:
            return e


def test_ingest_stores_int8_payloads_and_their_checksums(int8_lmdb, native_blocks):
    with LMDBStore(int8_lmdb, MAP) as store:
        m = store.manifest("test", "v1")
        assert set(m.encodings) == {"int8"}
        assert store.manifest("test", "vnative").encodings == {}
        info = dict(store.versions("test"))["v1"]
        assert info["encoded_bytes"]["int8"] == sum(m.block_nbytes(l, "int8")
                                                    for l, _ in m.blocks())
        for (level, node), native in native_blocks.items():
            payload = store.get(m.storage_key(level, node, "int8"))
            assert payload == quant.encode_block(native, m.block_shape(level), m.dtype, "int8")
            assert checksum(payload) == m.checksum(level, node, "int8")
            assert store.get(m.storage_key(level, node)) == native
            assert len(payload) < len(native) / 3       # float32 -> int8 + scales


def test_int8_over_grpc_verified_and_never_mixed_with_native(served, native_blocks):
    with BankClient(served) as c:
        m = c.get_manifest("test")
        assert m.version == "v1" and m.has_encoding("int8")
        ids = [(1, 0), (2, 3)]
        for _ in range(2):          # the second round comes from the server's LRU tier
            native = c.fetch("test", "", ids, m)
            packed = c.fetch("test", "", ids, m, encoding="int8")
            for b in ids:
                assert bytes(native[b]) == native_blocks[b]
                assert len(packed[b]) == m.block_nbytes(b[0], "int8")
                assert checksum(packed[b]) == m.checksum(*b, "int8")
    chunks = raw_fetch(served, bank="test", blocks=[bank_pb2.BlockId(level=1, node=1)],
                       encoding="int8")
    h = chunks[0].header
    assert (h.dtype, list(h.shape), h.nbytes) == ("int8", list(m.block_shape(1)),
                                                  m.block_nbytes(1, "int8"))


def test_memory_model_attaches_dequantized_int8(served, tiny_model_export, native_blocks,
                                                trusted_key_file):
    model = MemoryModel.from_pretrained(tiny_model_export, embedder=FakeEmbedder(),
                                        encoding="int8", trust=trust())
    with ShardedFetcher(served, client_factory=client_factory()) as bank:   # one address
        r = model.generate("The atomic number of Ruthenium is", bank=bank, max_new_tokens=2)
    assert r.memory and r.encoding == "int8", r.anchor_only_reason
    m = load_manifest(tiny_model_export)
    blocks = m.path_blocks(r.path)
    assert r.fetched_bytes == sum(m.block_nbytes(l, "int8") for l, _ in blocks)
    for level, node in blocks:
        native = tensor_from_buffer(bytearray(native_blocks[(level, node)]), m.block_shape(level),
                                    m.dtype)
        off, rk = model.offsets[level - 1], m.ranks[level - 1]
        assert torch.equal(model.mem[0, :, :, off:off + rk], roundtrip(native))
    # the CLI flag reaches the model the same way
    from membank_cli.cli import main
    main(["generate", "Gold is", "--model", str(tiny_model_export), "--bank", served,
          "--encoding", "int8", "--max-new-tokens", "1", "--json",
          "--trusted-keys", str(trusted_key_file)])


def test_corrupted_int8_block_is_data_loss(served):
    with BankClient(served) as c:
        m = c.get_manifest("test", "vbad")
        with pytest.raises(BankError) as e:
            c.fetch("test", "vbad", [(1, 0), (2, 1)], m, encoding="int8")
        assert e.value.code == "DATA_LOSS" and "int8" in e.value.message
        assert len(c.fetch("test", "vbad", [(2, 1)], m)) == 1        # native still intact
        assert len(c.fetch("test", "vbad", [(1, 0)], m, encoding="int8")) == 1


def test_missing_and_unknown_encodings(served):
    e = raw_fetch(served, bank="test", version="vnative",
                  blocks=[bank_pb2.BlockId(level=1, node=0)], encoding="int8")
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert "has no int8 blocks (available: native)" in e.details()
    e = raw_fetch(served, bank="test", blocks=[bank_pb2.BlockId(level=1, node=0)],
                  encoding="fp4")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown encoding" in e.details()
    # a client holding a manifest that (wrongly) lists int8 gets the server's NOT_FOUND
    with BankClient(served) as c:
        plain = c.get_manifest("test", "vnative")
        forged = plain.model_validate({**plain.model_dump(), "signature": None,
                                       "encodings": {"int8": plain.checksums},
                                       "digests": {**plain.digests,
                                                   "int8": plain.digests["native"]}})
        with pytest.raises(BankError) as err:
            c.fetch("test", "vnative", [(1, 0)], forged, encoding="int8")
        assert err.value.code == "NOT_FOUND"


def test_versions_stay_immutable_across_encodings(tiny_model_export, tmp_path):
    db = tmp_path / "db"
    ingest(tiny_model_export, db, progress=False, map_size=MAP)
    with pytest.raises(IngestError, match="encodings"):
        ingest(tiny_model_export, db, encodings=INT8, progress=False, map_size=MAP)
    ingest(tiny_model_export, db, progress=False, map_size=MAP)          # same content: no-op
    ingest(tiny_model_export, db, version="v2", encodings=INT8, progress=False, map_size=MAP)
    ingest(tiny_model_export, db, version="v2", encodings=INT8, progress=False, map_size=MAP)


def test_gc_deletes_int8_blocks_with_their_version(tiny_model_export, tmp_path):
    """v1 stored by version (an LMDB from before content addressing), v2 by content: gc of v1
    deletes its blocks in both encodings, and v2 keeps one copy of each of its own."""
    db = tmp_path / "db"
    ingest(tiny_model_export, db, version="v1", encodings=INT8, progress=False, map_size=MAP,
           block_store="version")
    m2 = ingest(tiny_model_export, db, version="v2", encodings=INT8, progress=False,
                map_size=MAP)
    report = gc(db, "test", keep=0, map_size=MAP)
    assert report["deleted"] == ["v1"]
    assert report["blocks_deleted"] == 2 * sum(1 for _ in m2.blocks())
    env = lmdb.open(str(db), map_size=MAP)
    with env.begin() as txn:
        keys = {bytes(k) for k, _ in txn.cursor() if bytes(k).startswith((b"b/", b"h/"))}
    env.close()
    assert keys == m2.storage_keys() and len(keys) == 2 * sum(1 for _ in m2.blocks())


def test_rebalance_moves_int8_blocks_too(tmp_path):
    export = tmp_path / "export"
    synthetic_export(export, bank="sh", version="v1", dtype="bfloat16", d_model=16,
                     mem_layers=[0], branching=4, ranks=[4, 2, 1], seed=3)
    old, new = ["s0", "s1", "s2"], ["s0", "s1", "s2", "s3"]
    lmdbs = {s: tmp_path / s for s in new}
    stored = [ingest(export, lmdbs[s], shard_id=s, shards=old, placement_level=2,
                     encodings=INT8, progress=False, map_size=MAP) for s in old]
    # every shard's manifest lists every block's int8 checksum, so they are one manifest
    assert stored[0] == stored[1] == stored[2]
    assert all(c for level in stored[0].encodings["int8"] for c in level)
    report = rebalance(lmdbs, "sh", "v1", "v1-s4", new, map_size=MAP)
    assert report["blocks_moved"] > 0
    with LMDBStore(lmdbs["s3"], MAP) as store:
        m = store.manifest("sh", "v1-s4")
        assert m is not None and set(m.encodings) == {"int8"}
        for level, node in shard_blocks(m, "s3"):
            for enc in ("", "int8"):
                key = m.storage_key(level, node, enc)
                with store.read(key, Expect(m.block_nbytes(level, enc),
                                            m.checksum(level, node, enc))) as buf:
                    assert buf is not None


# -- kill -9 during an int8 ingest ----------------------------------------------------------------
def start_ingest(export: Path, db: Path) -> tuple[subprocess.Popen, float]:
    return start_ingest_writing(export, db, "--version", "v2", "--encodings", "int8",
                                "--batch-mb", "1", "--map-size-gb", "1", "--no-progress",
                                "--max-mb-s", "6")


def check_version(db: Path, version: str) -> tuple[int, bool]:
    """(blocks, has int8) of a complete version; every block checked in every encoding."""
    with LMDBStore(db, MAP) as store:
        m = store.manifest("crash8", version)
        assert m is not None
        for level, node in m.blocks():
            for enc in ("", *m.encodings):
                key = m.storage_key(level, node, enc)
                with store.read(key, Expect(m.block_nbytes(level, enc),
                                            m.checksum(level, node, enc))) as buf:
                    assert buf is not None, (version, level, node, enc)
        return sum(1 for _ in m.blocks()), "int8" in m.encodings


def test_kill_9_mid_int8_ingest_publishes_nothing_partial(tmp_path):
    export = tmp_path / "export"
    # 84 blocks, 5.5 MB float32 (+ 1.4 MB int8): about a second of writing at 6 MB/s
    synthetic_export(export, bank="crash8", version="v1", dtype="float32", d_model=128,
                     mem_layers=[0, 1], branching=4, ranks=[64, 32, 16], seed=11)
    base = tmp_path / "base"
    ingest(export, base, progress=False, map_size=MAP)                 # v1, native only
    # how long the writing phase takes when nothing kills it
    calib = tmp_path / "calib"
    shutil.copytree(base, calib)
    proc, t0 = start_ingest(export, calib)
    for line in proc.stderr:
        if b"and published it" in line:
            break
    write_s = time.monotonic() - t0
    proc.stderr.read()
    assert proc.wait(60) == 0 and check_version(calib, "v2") == (84, True)

    rng = random.Random(int(os.environ.get("CRASH_SEED", "8")))
    mid_write, trials = 0, 4
    for trial in range(trials):
        db = tmp_path / f"trial{trial}"
        shutil.copytree(base, db)
        proc, t0 = start_ingest(export, db)
        time.sleep(max(0.0, t0 + rng.uniform(0, write_s) - time.monotonic()))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stderr.close()
        with LMDBStore(db, MAP) as store:
            now = store.current_version("crash8")
            v2 = store.manifest("crash8", "v2")
        assert now in ("v1", "v2")
        assert check_version(db, "v1") == (84, False)          # intact, whatever happened
        if v2 is None:
            mid_write += 1
        else:                   # killed after the manifest commit: then v2 is whole, int8 too
            assert check_version(db, "v2") == (84, True)
        # a rerun completes v2 with its int8 blocks (skipping what the killed run committed)
        ingest(export, db, version="v2", encodings=INT8, progress=False, map_size=MAP,
               batch_bytes=1 << 20)
        with LMDBStore(db, MAP) as store:
            assert store.current_version("crash8") == "v2"
        assert check_version(db, "v2") == (84, True)
        shutil.rmtree(db)
    assert mid_write >= trials // 2, f"only {mid_write} of {trials} kills hit the writing phase"


# -- the benchmark --------------------------------------------------------------------------------
def test_int8_benchmark_quick(tmp_path):
    """benchmarks/int8.py on the demo shapes: formulas, real payload sizes, one JSON line."""
    import json
    out = subprocess.run([sys.executable, "-m", "benchmarks.int8", "--shapes", "demo", "--formulas",
                          "demo,paper-160m", "--reps", "1", "--dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    f = report["formulas"]["paper-160m"]
    # (35, 3, 256, 512) bf16: 27,525,120 B -> 13,762,560 int8 + 107,520 scale bytes
    assert f["levels"][0]["native_bytes"] == 27_525_120
    assert f["levels"][0]["int8_bytes"] == 13_762_560 + 35 * 3 * 256 * 4
    served = report["served"]["demo"]
    assert served["path_bytes"]["int8"] == report["formulas"]["demo"]["path_int8_bytes"]
    assert served["path_bytes"]["native"] == report["formulas"]["demo"]["path_native_bytes"]
    assert "accuracy" not in report and list(tmp_path.iterdir()) == []
