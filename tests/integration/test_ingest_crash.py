"""kill -9 during ingest: the published version stays current and intact, a rerun completes.

Each trial copies an LMDB that holds (and, in the first trial, a live bank server serves) v1,
starts `python -m services.bank_server.ingest` of v2 over it as a subprocess, SIGKILLs it at a
random moment of its writing phase, checks v1 (every block against its manifest checksum),
then reruns the ingest and checks v2.

Run: .venv/bin/python -m pytest -q tests/integration/test_ingest_crash.py
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from services.bank_server.ingest import ingest
from services.bank_server.store import Expect, LMDBStore
from services.model_client.bank_client import BankClient
from testkit.exports import synthetic_export
from tests.conftest import start_ingest_writing

pytestmark = pytest.mark.integration
MAP = 1 << 30
TRIALS = 6


@pytest.fixture(scope="module")
def crash_export(tmp_path_factory) -> Path:
    """84 blocks, 44 MB (float32): enough batches (1 MB each) to be killed in the middle."""
    out = tmp_path_factory.mktemp("export_crash")
    synthetic_export(out, bank="crash", version="v1", dtype="float32", d_model=256,
                     mem_layers=[0, 1, 2, 3], branching=4, ranks=[128, 64, 32], seed=7)
    return out


def verify_version(db: Path, version: str) -> int:
    """Every block of (crash, version) matches its manifest checksum; returns how many."""
    with LMDBStore(db, MAP) as store:
        m = store.manifest("crash", version)
        assert m is not None, f"{version} has no manifest"
        for level, node in m.blocks():
            key = m.storage_key(level, node)
            with store.read(key, Expect(m.block_nbytes(level), m.checksum(level, node))) as buf:
                assert buf is not None, f"{version} ({level}, {node}) missing"
        return sum(1 for _ in m.blocks())


def current(db: Path) -> str | None:
    with LMDBStore(db, MAP) as store:
        return store.current_version("crash")


def start_ingest(export: Path, db: Path) -> tuple[subprocess.Popen, float]:
    """Start ingest of v2; return (proc, time its writing phase began)."""
    # ~1 s of writing (44 MB at 40 MB/s), whatever the machine's load: kills at random
    # moments of it land between, and inside, its ~44 commits
    return start_ingest_writing(export, db, "--version", "v2", "--batch-mb", "1",
                                "--map-size-gb", "1", "--no-progress", "--max-mb-s", "40")


def test_kill_9_mid_ingest_keeps_v1_and_a_rerun_completes_v2(crash_export, tmp_path,
                                                              start_bank_server):
    base = tmp_path / "base"
    ingest(crash_export, base, progress=False, map_size=MAP)
    n_blocks = verify_version(base, "v1")

    # how long the writing phase takes when nothing kills it
    calib = tmp_path / "calib"
    shutil.copytree(base, calib)
    proc, t0 = start_ingest(crash_export, calib)
    for line in proc.stderr:                   # until the last commit (not the process exit)
        if b"and published it" in line:
            break
    write_s = time.monotonic() - t0
    proc.stderr.read()
    assert proc.wait(60) == 0
    assert current(calib) == "v2" and verify_version(calib, "v2") == n_blocks

    rng = random.Random(int(os.environ.get("CRASH_SEED", "5")))
    mid_write = 0
    for trial in range(TRIALS):
        db = tmp_path / f"trial{trial}"
        shutil.copytree(base, db)
        server = start_bank_server(db) if trial == 0 else None
        with (server if server is not None else _null()) as served:
            if served is not None:
                client = BankClient(served[0], timeout_s=10)
                m1 = client.get_manifest("crash")
            proc, t0 = start_ingest(crash_export, db)
            delay = rng.uniform(0, write_s)
            # the server keeps answering v1 while ingest writes
            while time.monotonic() < t0 + delay:
                if served is not None:
                    assert len(client.fetch("crash", "", [(1, 0), (3, 5)], m1)) == 2
                else:
                    time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc.stderr.close()
            now = current(db)
            assert now in ("v1", "v2"), now
            assert verify_version(db, "v1") == n_blocks          # v1 intact, whatever happened
            if now == "v1":
                mid_write += 1
            else:
                verify_version(db, "v2")                         # completed before the kill
            if served is not None:
                # a reader after the killed writer: v1 (or v2, if published) still served
                ids = list(m1.blocks())
                got = {}
                for i in range(0, len(ids), 32):
                    got.update(client.fetch("crash", "v1", ids[i:i + 32], m1))
                assert len(got) == n_blocks
        # a rerun completes v2 (in-process; skips the blocks the killed run committed)
        ingest(crash_export, db, version="v2", progress=False, map_size=MAP, batch_bytes=1 << 20)
        assert current(db) == "v2"
        assert verify_version(db, "v2") == n_blocks and verify_version(db, "v1") == n_blocks
        if served is not None:
            client.close()
        shutil.rmtree(db)
    assert mid_write >= TRIALS // 2, f"only {mid_write} of {TRIALS} kills hit the writing phase"


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
