"""Ingest: checksums verified, idempotent, versions immutable, `current` switched last.

Run: .venv/bin/python -m pytest -q tests/integration/test_ingest.py
"""
from __future__ import annotations

import json
import shutil

import lmdb
import pytest

from membank.artifacts import MANIFEST, iter_blocks, load_manifest
from membank.blocks import digest
from membank.keys import block_key, content_key, current_key, manifest_key, version_info_key
from services.bank_server.ingest import IngestError, ingest, main
from services.bank_server.publish import PublishError, publish_in_env
from services.bank_server.publish import main as publish_main
from services.bank_server.store import LMDBStore
from tests.conftest import as_exported

pytestmark = pytest.mark.integration
MAP = 1 << 30


def dump(path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        out = {bytes(k): bytes(v) for k, v in txn.cursor()}
    env.close()
    return out


def test_ingest_writes_every_block_and_publishes(tiny_export, tmp_path):
    db = tmp_path / "db"
    m = ingest(tiny_export, db, progress=False, map_size=MAP, batch_bytes=10_000)  # several txns
    with LMDBStore(db, MAP) as store:
        assert store.current_version("test") == "v1"
        assert store.manifest("test", "v1") == m and as_exported(m) == load_manifest(tiny_export)
        for level, node, data in iter_blocks(tiny_export, m):
            assert store.get(m.storage_key(level, node)) == data
        assert m.block_store == "content"
        assert store.current_version("other") is None and store.manifest("test", "v2") is None


def test_ingest_is_idempotent(tiny_export, tmp_path):
    db = tmp_path / "db"
    ingest(tiny_export, db, progress=False, map_size=MAP)
    first = dump(db)
    ingest(tiny_export, db, progress=False, map_size=MAP)
    assert dump(db) == first
    n_blocks = sum(1 for k in first if k.startswith(b"h/"))
    # blocks + manifest + ingest info + current
    assert n_blocks == 2 + 4 and len(first) == n_blocks + 3
    assert version_info_key("test", "v1") in first


def test_unpublished_version_leaves_current_alone(tiny_export, tmp_path):
    db = tmp_path / "db"
    ingest(tiny_export, db, publish=False, progress=False, map_size=MAP)
    assert current_key("test") not in dump(db)
    assert manifest_key("test", "v1") in dump(db)

    ingest(tiny_export, db, progress=False, map_size=MAP)                      # publishes v1
    ingest(tiny_export, db, version="v2", publish=False, progress=False, map_size=MAP)
    with LMDBStore(db, MAP) as store:
        assert store.current_version("test") == "v1"
        assert store.manifest("test", "v2").version == "v2"
    publish_in_env(db, "test", "v2", MAP)
    with LMDBStore(db, MAP) as store:
        assert store.current_version("test") == "v2"
    with pytest.raises(PublishError):
        publish_in_env(db, "test", "v3", MAP)


def test_corrupt_export_is_refused_before_publishing(tiny_export, tmp_path):
    db = tmp_path / "db"
    ingest(tiny_export, db, progress=False, map_size=MAP)
    bad = tmp_path / "bad_export"
    shutil.copytree(tiny_export, bad)
    doc = json.loads((bad / MANIFEST).read_text())
    doc["version"] = "v2"
    doc["checksums"][1][2] = "0" * 16
    (bad / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(IngestError, match=r"block \(2, 2\)"):
        ingest(bad, db, progress=False, map_size=MAP)
    stored = dump(db)
    assert stored[current_key("test")] == b"v1"
    assert manifest_key("test", "v2") not in stored          # the half-written v2 does not exist


def test_a_version_is_immutable(tiny_export, tmp_path):
    db = tmp_path / "db"
    ingest(tiny_export, db, progress=False, map_size=MAP)
    other = tmp_path / "other"
    shutil.copytree(tiny_export, other)
    doc = json.loads((other / MANIFEST).read_text())
    doc["shards"] = ["a", "b"]                               # same version, different content
    (other / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(IngestError, match="immutable"):
        ingest(other, db, progress=False, map_size=MAP)


def test_cli(tiny_export, tmp_path, capsys):
    main([str(tiny_export), "--lmdb", str(tmp_path / "db"), "--map-size-gb", "1", "--no-publish"])
    assert "ingested test version v1" in capsys.readouterr().out
    assert current_key("test") not in dump(tmp_path / "db")


# -- shards, streaming, resume ------------------------------------------------------------------
from membank.blocks import checksum  # noqa: E402
from membank.keys import SHARD_KEY, version_info_key  # noqa: E402,F811
from membank.placement import shard_blocks  # noqa: E402
from services.bank_server.gc import gc  # noqa: E402
from services.bank_server.gc import main as gc_main  # noqa: E402
from services.bank_server.ingest import ingest_stream  # noqa: E402


def block_keys(path) -> set[bytes]:
    return {k for k in dump(path) if k.startswith((b"b/", b"h/"))}


def test_shard_ingest_writes_only_owned_blocks(big_export, tmp_path):
    shards = ["s0", "s1", "s2"]
    full = load_manifest(big_export)
    stored = {}
    for s in shards:
        stored[s] = ingest(big_export, tmp_path / s, shard_id=s, shards=shards, replication=1,
                           placement_level=2, progress=False, map_size=MAP)
    assert stored["s0"] == stored["s1"] == stored["s2"]          # one manifest, every shard
    m = stored["s0"]
    assert m.shards == shards and m.placement_level == 2 and m.checksums == full.checksums
    union = set()
    for s in shards:
        want = m.storage_keys(shard_blocks(m, s))
        assert block_keys(tmp_path / s) == want
        assert dump(tmp_path / s)[SHARD_KEY] == s.encode()
        union |= want
    assert union == m.storage_keys()
    # level 1 sits above the placement level: every shard has it; level 3 is split
    assert all(m.storage_key(1, n) in block_keys(tmp_path / s)
               for s in shards for n in range(2))
    # a shard's LMDB refuses another shard's (or an unsharded) ingest
    with pytest.raises(IngestError, match="holds shard 's0'"):
        ingest(big_export, tmp_path / "s0", shard_id="s1", shards=shards, progress=False,
               map_size=MAP)
    with pytest.raises(IngestError, match="not in the manifest"):
        ingest(big_export, tmp_path / "x", shard_id="s9", shards=shards, progress=False,
               map_size=MAP)


def test_stream_ingest_into_two_shards_in_one_pass(tiny_export, tmp_path):
    ref = load_manifest(tiny_export)
    blocks = {(l, n): bytes(d) for l, n, d in iter_blocks(tiny_export, ref)}
    header = {k: v for k, v in ref.model_dump().items() if k != "checksums"}
    header.update(version="s1", shards=["a", "b"], placement_level=1)
    targets = {"a": tmp_path / "a", "b": tmp_path / "b"}
    m = ingest_stream(targets, header, ((l, n, d) for (l, n), d in reversed(blocks.items())),
                      progress=False, map_size=MAP)
    assert m.checksums == ref.checksums                        # computed while streaming
    for s in ("a", "b"):
        with LMDBStore(tmp_path / s, MAP) as store:
            assert store.current_version("test") == "s1" and store.manifest("test", "s1") == m
            for l, n in shard_blocks(m, s):
                assert store.get(m.storage_key(l, n)) == blocks[(l, n)]
    assert len(block_keys(tmp_path / "a")) + len(block_keys(tmp_path / "b")) == len(blocks)
    # a stream that ends early publishes nothing
    header["version"] = "s2"
    short = list((l, n, d) for (l, n), d in blocks.items())[:-1]
    with pytest.raises(IngestError, match="1 blocks missing"):
        ingest_stream(targets, header, short, progress=False, map_size=MAP)
    for s in ("a", "b"):
        assert dump(tmp_path / s)[current_key("test")] == b"s1"
        assert manifest_key("test", "s2") not in dump(tmp_path / s)


def test_rerun_skips_blocks_already_written(big_export, tmp_path, caplog):
    db = tmp_path / "db"
    m = load_manifest(big_export)
    # a first run that "died" after some blocks: write them by hand
    env = lmdb.open(str(db), map_size=MAP)
    written = list(iter_blocks(big_export, m))[:3]
    with env.begin(write=True) as txn:
        for l, n, d in written:
            txn.put(content_key("big", f"blake3-{digest(d)}"), d)
    env.close()
    caplog.set_level("INFO")
    ingest(big_export, db, progress=False, map_size=MAP)
    assert any("3 already there" in r.message for r in caplog.records)
    with LMDBStore(db, MAP) as store:
        assert store.current_version("big") == "b1"
        stored = store.manifest("big", "b1")
        for l, n, d in iter_blocks(big_export, m):
            assert store.get(stored.storage_key(l, n)) == d


# -- GC -----------------------------------------------------------------------------------------
def test_gc_keeps_current_and_newest(tiny_export, tmp_path):
    """The versioned layout of LMDBs written before content addressing (every version its own
    copy of every block): gc collects them as before."""
    db = tmp_path / "db"
    for v in ("v1", "v2", "v3", "v4"):
        ingest(tiny_export, db, version=v, publish=(v == "v2"), progress=False, map_size=MAP,
               block_store="version")
    with LMDBStore(db, MAP) as store:
        assert [v for v, _ in store.versions("test")] == ["v1", "v2", "v3", "v4"]
        assert store.current_version("test") == "v2"
    dry = gc(db, "test", keep=1, dry_run=True, map_size=MAP)
    assert dry["deleted"] == ["v1", "v3"] and dry["blocks_deleted"] == 12
    assert len(block_keys(db)) == 24                              # dry run: nothing deleted
    report = gc(db, "test", keep=1, map_size=MAP)                 # keeps v4 (newest) + v2
    assert report["kept"] == ["v2", "v4"] and report["deleted"] == ["v1", "v3"]
    left = dump(db)
    assert {k.split(b"/")[2] for k in left if k.startswith(b"b/")} == {b"v2", b"v4"}
    assert manifest_key("test", "v1") not in left and version_info_key("test", "v3") not in left
    assert left[current_key("test")] == b"v2"
    gc(db, "test", keep=0, map_size=MAP)                          # never the current one
    assert {k.split(b"/")[2] for k in dump(db) if k.startswith(b"b/")} == {b"v2"}
    with LMDBStore(db, MAP) as store:
        m = store.manifest("test", "v2")
        for l, n in m.blocks():
            assert checksum(store.get(block_key("test", "v2", l, n))) == m.checksum(l, n)


def test_gc_orphans_and_cached_manifests(tiny_export, tmp_path):
    db = tmp_path / "db"
    ingest(tiny_export, db, progress=False, map_size=MAP)
    ingest(tiny_export, db, version="v2", publish=False, progress=False, map_size=MAP)
    env = lmdb.open(str(db), map_size=MAP)                       # a killed ingest's leftovers
    with env.begin(write=True) as txn:
        txn.put(block_key("test", "dead", 1, 0), b"x")
    env.close()
    store = LMDBStore(db, MAP)
    assert store.manifest("test", "v2") is not None               # now cached in-process
    store.close()
    r = gc(db, "test", keep=0, map_size=MAP)
    assert r["deleted"] == ["v2"] and r["orphan_versions"] == ["dead"]
    assert block_key("test", "dead", 1, 0) in dump(db)            # orphans only when asked
    r = gc(db, "test", keep=0, orphans=True, map_size=MAP)
    assert r["blocks_deleted"] == 1 and block_key("test", "dead", 1, 0) not in dump(db)
    with LMDBStore(db, MAP) as store:
        assert store.manifest("test", "v2") is None and store.manifest("test", "v1") is not None


def test_gc_and_publish_cli(tiny_export, tmp_path, capsys):
    db = tmp_path / "db"
    for v in ("v1", "v2", "v3"):
        ingest(tiny_export, db, version=v, progress=False, map_size=MAP)
    gc_main(["--lmdb", str(db), "--bank", "test", "--keep", "2", "--map-size-gb", "1"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["deleted"] == ["v1"] and report["kept"] == ["v2", "v3"]
    # roll back to v2: stdout says what it replaced
    assert publish_main(["--lmdb", str(db), "--map-size", str(MAP), "test", "v2"]) == 0
    assert capsys.readouterr().out.strip() == "v3"
    with LMDBStore(db, MAP) as store:
        assert store.current_version("test") == "v2"
    assert publish_main(["--lmdb", str(db), "--map-size", str(MAP), "test", "v9"]) == 2
    assert "never completely ingested" in capsys.readouterr().err
    # a collected version: gc's tombstone says so (and the name is never reused)
    assert publish_main(["--lmdb", str(db), "--map-size", str(MAP), "test", "v1"]) == 3
    assert "garbage-collected" in capsys.readouterr().err


def test_writemap_ingest_is_read_back_the_same(big_export, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ingest(big_export, a, progress=False, map_size=MAP)
    ingest(big_export, b, progress=False, map_size=MAP, writemap=True)
    da, db_ = dump(a), dump(b)
    assert da.keys() == db_.keys()
    assert all(da[k] == db_[k] for k in da if not k.startswith(b"i/"))   # info: a timestamp
    assert (b / "data.mdb").stat().st_blocks * 512 < MAP                # sparse file


# -- content addressing (issue 18) --------------------------------------------------------------
def _changed(tiny_export, block=(2, 1)):
    """The export's blocks with one block's bytes changed: what continued training that fetched
    only that block leaves (lazy AdamW: every other block bit-identical)."""
    ref = load_manifest(tiny_export)
    blocks = {(l, n): bytes(d) for l, n, d in iter_blocks(tiny_export, ref)}
    blocks[block] = bytes(b ^ 0x55 for b in blocks[block])
    header = {k: v for k, v in ref.model_dump().items() if k != "checksums"}
    return header, blocks


def test_a_version_that_changes_one_block_writes_one_block(tiny_export, tmp_path):
    db = tmp_path / "db"
    first: dict = {}
    m1 = ingest(tiny_export, db, progress=False, map_size=MAP, report=first)
    assert first[None]["written"] == 6 and first[None]["shared"] == 0
    header, blocks = _changed(tiny_export)
    header["version"] = "v2"
    second: dict = {}
    m2 = ingest_stream({None: db}, header, ((l, n, d) for (l, n), d in blocks.items()),
                       progress=False, map_size=MAP, report=second)
    assert second[None] == {"written": 1, "bytes_written": m2.block_nbytes(2), "shared": 5,
                            "bytes_shared": sum(m2.block_nbytes(l) for l, _ in m2.blocks())
                            - m2.block_nbytes(2)}
    assert len(block_keys(db)) == 7                        # one copy of each distinct block
    with LMDBStore(db, MAP) as store:
        for m in (m1, m2):
            for l, n in m.blocks():
                assert checksum(store.get(m.storage_key(l, n))) == m.checksum(l, n)
    # gc of v1 deletes the one block only v1 lists; the five v2 shares stay
    r = gc(db, "test", keep=0, map_size=MAP)
    assert r["deleted"] == ["v1"] and r["blocks_deleted"] == 1
    assert block_keys(db) == m2.storage_keys()


def test_gc_keeps_a_block_a_version_ingested_during_gc_shares(tiny_export, tmp_path):
    """gc reads the manifests, then deletes blocks; a version completed in between that
    shares a doomed version's block keeps it (the delete transaction looks again)."""
    import threading
    db = tmp_path / "db"
    m1 = ingest(tiny_export, db, progress=False, map_size=MAP)
    header, blocks = _changed(tiny_export)
    header["version"] = "v2"
    ingest_stream({None: db}, header, ((l, n, d) for (l, n), d in blocks.items()),
                  progress=False, map_size=MAP)                 # current: v2
    # during gc's grace period, v3 = v1's content under a new name
    late = threading.Timer(0.2, lambda: ingest(tiny_export, db, version="v3", publish=False,
                                               progress=False, map_size=MAP))
    late.start()
    r = gc(db, "test", keep=0, grace_s=1.0, map_size=MAP)
    late.join()
    assert r["deleted"] == ["v1"] and r["blocks_deleted"] == 0
    with LMDBStore(db, MAP) as store:
        m3 = store.manifest("test", "v3")
        assert m3.storage_keys() == m1.storage_keys()
        for l, n in m3.blocks():
            assert checksum(store.get(m3.storage_key(l, n))) == m3.checksum(l, n)


def test_gc_deletes_unlisted_content_blocks_only_as_orphans(tiny_export, tmp_path):
    db = tmp_path / "db"
    m = ingest(tiny_export, db, progress=False, map_size=MAP)
    stray = content_key("test", "blake3-" + "ab" * 32)          # a killed ingest's block
    env = lmdb.open(str(db), map_size=MAP)
    with env.begin(write=True) as txn:
        txn.put(stray, b"x")
    env.close()
    assert gc(db, "test", keep=0, map_size=MAP)["blocks_deleted"] == 0
    assert stray in dump(db)
    assert gc(db, "test", keep=0, orphans=True, map_size=MAP)["blocks_deleted"] == 1
    assert block_keys(db) == m.storage_keys()


def test_gc_waits_for_an_ingest_that_is_writing(tiny_export, tmp_path):
    """An ingest that is still writing may rely on blocks it shares with a doomed version
    (unlisted until its manifest lands): its lease keeps gc from starting; a killed ingest's
    lease expires."""
    import threading
    import time as _time

    from services.bank_server.gc import GCError
    db = tmp_path / "db"
    ingest(tiny_export, db, progress=False, map_size=MAP)                       # v1
    header, blocks = _changed(tiny_export)
    header["version"] = "v2"
    ingest_stream({None: db}, header, ((l, n, d) for (l, n), d in blocks.items()),
                  progress=False, map_size=MAP)                                  # current: v2
    started, release = threading.Event(), threading.Event()
    ref = load_manifest(tiny_export)
    v1_blocks = [(l, n, bytes(d)) for l, n, d in iter_blocks(tiny_export, ref)]

    def slow():                       # v3 = v1's content, one block, then a pause
        for i, b in enumerate(v1_blocks):
            if i == 1:
                started.set()
                release.wait(10)
            yield b
    v3_header = {**{k: v for k, v in ref.model_dump().items() if k != "checksums"},
                 "version": "v3"}
    writer = threading.Thread(target=lambda: ingest_stream(
        {None: db}, v3_header, slow(), progress=False, map_size=MAP, batch_bytes=1,
        publish=False))
    writer.start()
    assert started.wait(10)
    with pytest.raises(GCError, match="v3 being written"):
        gc(db, "test", keep=0, map_size=MAP)
    assert gc(db, "test", keep=0, map_size=MAP, dry_run=True)["deleted"] == ["v1"]  # a look
    release.set()
    writer.join()
    with LMDBStore(db, MAP) as store:                          # v3 complete and intact
        m3 = store.manifest("test", "v3")
        for l, n in m3.blocks():
            assert checksum(store.get(m3.storage_key(l, n))) == m3.checksum(l, n)
    r = gc(db, "test", keep=1, map_size=MAP)                    # keeps v3 and current v2
    assert r["deleted"] == ["v1"] and r["blocks_deleted"] == 0  # v3 lists all of v1's blocks
    # a lease left by a killed ingest: gc waits for it only while it is fresh
    env = lmdb.open(str(db), map_size=MAP)
    with env.begin(write=True) as txn:
        txn.put(b"w/test/dead", json.dumps({"renewed_at": _time.time() - 7200}).encode())
        txn.put(content_key("test", "blake3-" + "cd" * 32), b"orphan")
    env.close()
    r = gc(db, "test", keep=0, map_size=MAP, lease_s=3600)
    assert r["orphan_content_blocks"] == 1 and r["orphan_content_bytes"] == 6
    with pytest.raises(GCError):
        gc(db, "test", keep=0, map_size=MAP, lease_s=3 * 3600)
