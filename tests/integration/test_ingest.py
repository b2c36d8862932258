"""Ingest: checksums verified, idempotent, versions immutable, `current` switched last.

Run: .venv/bin/python -m pytest -q tests/integration/test_ingest.py
"""
from __future__ import annotations

import json
import shutil

import lmdb
import pytest

from membank.artifacts import MANIFEST, iter_blocks, load_manifest
from membank.keys import block_key, current_key, manifest_key
from services.bank_server.ingest import IngestError, ingest, main, publish_version
from services.bank_server.store import LMDBStore

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
        assert store.manifest("test", "v1") == m == load_manifest(tiny_export)
        for level, node, data in iter_blocks(tiny_export, m):
            assert store.get(block_key("test", "v1", level, node)) == data
        assert store.current_version("other") is None and store.manifest("test", "v2") is None


def test_ingest_is_idempotent(tiny_export, tmp_path):
    db = tmp_path / "db"
    ingest(tiny_export, db, progress=False, map_size=MAP)
    first = dump(db)
    ingest(tiny_export, db, progress=False, map_size=MAP)
    assert dump(db) == first
    n_blocks = sum(1 for k in first if k.startswith(b"b/"))
    assert n_blocks == 2 + 4 and len(first) == n_blocks + 2    # blocks + manifest + current


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
    publish_version(db, "test", "v2", map_size=MAP)
    with LMDBStore(db, MAP) as store:
        assert store.current_version("test") == "v2"
    with pytest.raises(IngestError):
        publish_version(db, "test", "v3", map_size=MAP)


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
