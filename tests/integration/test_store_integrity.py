"""Storage integrity (issue 16, points 9 and 10): version names are never reused, the LMDB map
may grow under a serving server, a full map fails ingest cleanly, verify-once is not fooled by a
restored mtime, and a warm-up that finds corrupt blocks does not report ready.

Real parts: bank servers are subprocesses (conftest.start_bank_server), Redis is a private
redis-server, ingest and gc run as they do in production (the library or the CLI).

Run: .venv/bin/python -m pytest -q tests/integration/test_store_integrity.py
"""
from __future__ import annotations

import asyncio
import os
import resource
import shutil
import time

import grpc
import lmdb
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from membank.artifacts import iter_blocks, load_manifest
from membank.config import get_preset
from membank.keys import current_key, manifest_key
from services.bank_server.gc import gc
from services.bank_server.ingest import IngestError, ingest
from services.bank_server.ingest import main as ingest_main
from services.bank_server.publish import PublishError, publish_in_env
from services.bank_server.readiness import Readiness
from services.bank_server.store import LMDBStore
from services.model_client.bank_client import BankClient, BankError, BlockIntegrityError
from services.model_client.dataplane_client import DataPlaneClient, dataplane_target
from testkit.exports import synthetic_export
from tests.conftest import as_exported
from tests.integration.test_ingest import dump

pytestmark = pytest.mark.integration
MAP = 1 << 30


def blocks_of(export_dir) -> dict[tuple[int, int], bytes]:
    m = load_manifest(export_dir)
    return {(l, n): bytes(d) for l, n, d in iter_blocks(export_dir, m)}


@pytest.fixture(scope="module")
def other_tiny_export(tmp_path_factory):
    """The tiny bank's shapes ("test" v1) with other random blocks: other content, same name."""
    cfg = get_preset("tiny")
    out = tmp_path_factory.mktemp("export_other")
    synthetic_export(out, bank="test", version="v1", dtype="float32",
                     d_model=cfg.model.d_model, mem_layers=cfg.memory.mem_layers(cfg.model.n_layer),
                     branching=cfg.memory.branching, ranks=list(cfg.memory.ranks), seed=7)
    return out


def health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="membank.v1.BankService"), timeout=5).status


# -- 9. version names are immutable for real -------------------------------------------------------
def test_a_collected_version_name_is_never_ingested_again(tiny_export, other_tiny_export,
                                                          tmp_path, capsys):
    db = tmp_path / "db"
    ingest(tiny_export, db, progress=False, map_size=MAP)                       # v1
    ingest(tiny_export, db, version="v2", progress=False, map_size=MAP)         # current
    assert gc(db, "test", keep=0, map_size=MAP)["deleted"] == ["v1"]
    assert dump(db)[b"t/test/v1"]                                 # the tombstone
    blocks_before = {k for k in dump(db) if k.startswith((b"b/", b"h/"))}
    for export in (other_tiny_export, tiny_export):               # other content, or the same
        with pytest.raises(IngestError, match="garbage-collected"):
            ingest(export, db, progress=False, map_size=MAP)
    assert manifest_key("test", "v1") not in dump(db)
    assert {k for k in dump(db) if k.startswith((b"b/", b"h/"))} == blocks_before  # nothing new
    with pytest.raises(SystemExit) as e:                          # the CLI: one line, exit 1
        ingest_main([str(other_tiny_export), "--lmdb", str(db), "--map-size-gb", "1",
                     "--no-progress"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ingest failed: test version v1 was garbage-collected")
    assert "Traceback" not in "\n".join(err)
    # publishing the collected name back is refused as such, not as "never ingested"
    with pytest.raises(PublishError) as pe:
        publish_in_env(db, "test", "v1", MAP)
    assert pe.value.kind == "gone"
    assert dump(db)[current_key("test")] == b"v2"


def test_a_forced_reingest_never_serves_the_old_content(tiny_export, other_tiny_export, tmp_path,
                                                        start_bank_server, redis_server):
    """Even if a version name is reused behind the tombstone's back, the server's manifest cache,
    its LRU and Redis never hand out the old manifest or the old bytes."""
    db = tmp_path / "db"
    ingest(tiny_export, db, progress=False, map_size=MAP)
    ingest(tiny_export, db, version="v2", publish=False, progress=False, map_size=MAP)
    old, new = blocks_of(tiny_export), blocks_of(other_tiny_export)
    with start_bank_server(db, "--lru-mb", "16", "--redis-url", redis_server.url) as (addr, _), \
            BankClient(addr) as c:
        m = c.get_manifest("test", "v1")
        assert {b: bytes(d) for b, d in c.fetch("test", "v1", list(m.blocks()), m).items()} == old
        publish_in_env(db, "test", "v2", MAP)
        gc(db, "test", keep=0, map_size=MAP)                      # v1 is gone ...
        env = lmdb.open(str(db), map_size=MAP)
        with env.begin(write=True) as txn:                        # ... and its tombstone forced
            txn.delete(b"t/test/v1")                              # away by hand
        env.close()
        ingest(other_tiny_export, db, publish=False, progress=False, map_size=MAP)
        m2 = c.get_manifest("test", "v1")
        assert as_exported(m2) == load_manifest(other_tiny_export) != as_exported(m)
        got = c.fetch("test", "v1", list(m2.blocks()), m2)
        assert {b: bytes(d) for b, d in got.items()} == new


# -- 10. LMDB map changes --------------------------------------------------------------------------
@pytest.fixture
def small_map_db(tiny_export, tmp_path):
    db = tmp_path / "db"
    ingest(tiny_export, db, progress=False, map_size=MAP)
    assert (db / "data.mdb").stat().st_size < 1 << 20
    return db


def test_ingest_with_a_larger_map_while_serving(small_map_db, big_export, start_bank_server):
    """A server opened with a 2 MiB map; ingest (1 GiB map) grows the data past it: the server
    adopts the new size (MDB_MAP_RESIZED) and keeps serving, the new bank included."""
    big = blocks_of(big_export)
    with start_bank_server(small_map_db, "--map-size-gb", "0.002") as (addr, _), \
            BankClient(addr) as c:
        m = c.get_manifest("test")
        assert len(c.fetch("test", "v1", [(1, 0)], m)) == 1
        ingest(big_export, small_map_db, progress=False, map_size=MAP)
        assert (small_map_db / "data.mdb").stat().st_size > 2 << 20
        assert len(c.fetch("test", "v1", [(1, 1)], m)) == 1
        mb = c.get_manifest("big")
        got = c.fetch("big", "b1", list(mb.blocks()), mb)
        assert {b: bytes(d) for b, d in got.items()} == big
        assert health(addr) == health_pb2.HealthCheckResponse.SERVING


def test_a_map_the_server_cannot_adopt_turns_health_not_serving(small_map_db, big_export,
                                                                 start_bank_server):
    """The grown map cannot be mapped (the server's address space is capped below it): reads
    cannot recover, so health goes NOT_SERVING and fetches answer UNAVAILABLE, not a crash."""
    with start_bank_server(small_map_db, "--map-size-gb", "0.002", "--dataplane-port", "0") \
            as (addr, proc), BankClient(addr) as c, \
            DataPlaneClient(dataplane_target(addr, proc.dataplane_address), timeout_s=10) as dp:
        m = c.get_manifest("test")
        vm = next(int(line.split()[1]) * 1024 for line in open(f"/proc/{proc.pid}/status")
                  if line.startswith("VmSize:"))
        cap = vm + (512 << 20)
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (cap, cap))
        ingest(big_export, small_map_db, progress=False, map_size=64 << 30)
        deadline = time.monotonic() + 20
        with pytest.raises(BankError) as e:
            c.fetch("test", "v1", [(1, 0)], m)
        assert e.value.code == "UNAVAILABLE"
        with pytest.raises(BankError) as e:                        # the data plane too
            dp.fetch("test", "v1", [(1, 0)], m)
        assert e.value.code == "UNAVAILABLE"
        while health(addr) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health never went NOT_SERVING"
            time.sleep(0.2)
        assert proc.poll() is None                                 # no crash


def test_map_full_during_ingest_is_one_line_and_publishes_nothing(small_map_db, big_export,
                                                                   capsys):
    with pytest.raises(IngestError, match="map"):
        ingest(big_export, small_map_db, progress=False, map_size=2 << 20)
    with pytest.raises(SystemExit) as e:
        ingest_main([str(big_export), "--lmdb", str(small_map_db), "--map-size-gb", "0.002",
                     "--no-progress"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ingest failed: ") and "map" in err[-1]
    assert "Traceback" not in "\n".join(err)
    stored = dump(small_map_db)
    assert manifest_key("big", "b1") not in stored and current_key("big") not in stored
    assert stored[current_key("test")] == b"v1"
    # a rerun with room completes the version
    ingest(big_export, small_map_db, progress=False, map_size=MAP)
    assert dump(small_map_db)[current_key("big")] == b"b1"


def test_ingest_reads_the_servers_map_size_setting(big_export, tmp_path, monkeypatch, capsys):
    """No --map-size-gb: ingest opens the LMDB with the server's MEMBANK_SERVER_MAP_SIZE_GB."""
    monkeypatch.setenv("MEMBANK_SERVER_MAP_SIZE_GB", "0.001")
    with pytest.raises(SystemExit) as e:
        ingest_main([str(big_export), "--lmdb", str(tmp_path / "db"), "--no-progress"])
    assert e.value.code == 1 and "map" in capsys.readouterr().err


# -- verify once -----------------------------------------------------------------------------------
def test_verify_once_is_not_fooled_by_a_restored_mtime(tiny_export, tmp_path, start_bank_server):
    db = tmp_path / "db"
    ingest(tiny_export, db, progress=False, map_size=MAP)
    block = blocks_of(tiny_export)[(1, 0)]
    with start_bank_server(db, "--verify-ttl-s", "600") as (addr, _), BankClient(addr) as c:
        m = c.get_manifest("test")
        for _ in range(2):                      # verified, then trusted
            assert bytes(c.fetch("test", "v1", [(1, 0)], m)[(1, 0)]) == block
        data = db / "data.mdb"
        st = os.stat(data)
        at = data.read_bytes().find(block)
        assert at >= 0
        fd = os.open(data, os.O_WRONLY)
        try:                                    # a write in place, as a tool or bit rot would
            os.pwrite(fd, bytes([block[len(block) // 2] ^ 0xFF]), at + len(block) // 2)
        finally:
            os.close(fd)
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))      # and the mtime put back
        assert os.stat(data).st_mtime_ns == st.st_mtime_ns
        with pytest.raises(BankError) as e:
            c.fetch("test", "v1", [(1, 0)], m)
        assert e.value.code == "DATA_LOSS" and not isinstance(e.value, BlockIntegrityError)


# -- warm-up ---------------------------------------------------------------------------------------
def test_a_warm_up_that_finds_corrupt_blocks_is_not_ready(tiny_export, tmp_path):
    db = tmp_path / "db"
    m = ingest(tiny_export, db, progress=False, map_size=MAP)
    bad = bytearray(blocks_of(tiny_export)[(1, 1)])
    bad[10] ^= 0xFF
    env = lmdb.open(str(db), map_size=MAP)
    with env.begin(write=True) as txn:
        txn.put(m.storage_key(1, 1), bytes(bad))
    env.close()
    with LMDBStore(db, MAP) as store:
        readiness = Readiness(store, store, levels=1)
        asyncio.run(readiness.warm())
        ok, detail = readiness.status()
    assert not ok and detail["warm"]["corrupt"] == ["test/v1 (1, 1)"]
    assert any("corrupt" in p and "test/v1 (1, 1)" in p for p in detail["problems"])
    # the same store intact is ready
    shutil.rmtree(db)
    ingest(tiny_export, db, progress=False, map_size=MAP)
    with LMDBStore(db, MAP) as store:
        readiness = Readiness(store, store, levels=1)
        asyncio.run(readiness.warm())
        assert readiness.status()[0]


def test_publishing_a_collected_version_is_failed_precondition(tiny_export, tmp_path,
                                                               start_bank_server):
    """Over the Publish RPC and the admin HTTP API of a real server (publish's child process)."""
    import json
    import urllib.error
    import urllib.request

    from membank.v1 import bank_pb2
    db = tmp_path / "db"
    ingest(tiny_export, db, progress=False, map_size=MAP)
    ingest(tiny_export, db, version="v2", progress=False, map_size=MAP)
    gc(db, "test", keep=0, map_size=MAP)
    (tmp_path / "admin").write_text("admin-token-456")
    with start_bank_server(db, "--admin-token-file", str(tmp_path / "admin")) as (addr, proc):
        with grpc.insecure_channel(addr) as ch:
            call = ch.unary_unary("/membank.v1.BankAdmin/Publish",
                                  request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=bank_pb2.PublishResponse.FromString)
            with pytest.raises(grpc.RpcError) as e:
                call(bank_pb2.PublishRequest(bank="test", version="v1"), timeout=30,
                     metadata=(("authorization", "Bearer admin-token-456"),))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "garbage-collected" in e.value.details()
        req = urllib.request.Request(f"http://{proc.admin_address}/v1/publish", method="POST",
                                     data=json.dumps({"bank": "test", "version": "v1"}).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": "Bearer admin-token-456"})
        with pytest.raises(urllib.error.HTTPError) as he:
            urllib.request.urlopen(req, timeout=30)
        assert he.value.code == 409
    assert dump(db)[current_key("test")] == b"v2"
