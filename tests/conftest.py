"""Shared pytest fixtures: tiny exports, an ingested LMDB, a bank server and a redis-server.

Every server a test needs is started here as a real subprocess on a free port (never the
system Redis on 6379) and stopped at teardown:

    bank_server            one `python -m services.bank_server.server` over `lmdb_dir` (session)
    start_bank_server      a factory for servers with other flags / other LMDBs (per test)
    redis_server           a private `redis-server` (per test; the local cluster's LocalRedis):
                           `.url`, `.port`, `.proc`, `.client()`
Free ports, relays and synthetic exports come from testkit/ (shared with benchmarks/ and
loadtests/).

Run: `.venv/bin/python -m pytest -q tests/unit tests/integration`
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from membank.config import get_preset
from services.bank_server import launch
from services.bank_server.cluster import LocalRedis
from testkit.exports import synthetic_export
from testkit.keys import signing_key
from testkit.models import TINY_TEXTS, make_model_export  # noqa: F401 (fixtures and tests)
from testkit.net import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(name="free_port")
def free_port_fixture():
    return free_port


# -- exports (random blocks: testkit/exports.py) --------------------------------------------
@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """The `tiny` preset's bank (k=2, ranks (8, 4), d 32, 2 layers), bank "test" v1, float32."""
    cfg = get_preset("tiny")
    out = tmp_path_factory.mktemp("export_tiny")
    synthetic_export(out, bank="test", version="v1", dtype="float32",
                     d_model=cfg.model.d_model, mem_layers=cfg.memory.mem_layers(cfg.model.n_layer),
                     branching=cfg.memory.branching, ranks=list(cfg.memory.ranks))
    return out


@pytest.fixture(scope="session")
def big_export(tmp_path_factory) -> Path:
    """A bfloat16 bank "big" whose level-1 blocks span several 1 MiB chunks (1.76 MiB each,
    so the last chunk is partial), a level without blocks (r = 0) and a small level 3."""
    out = tmp_path_factory.mktemp("export_big")
    synthetic_export(out, bank="big", version="b1", dtype="bfloat16", d_model=512,
                     mem_layers=[0, 1], branching=2, ranks=[300, 0, 8], seed=1)
    return out


@pytest.fixture(scope="session")
def wide_export(tmp_path_factory) -> Path:
    """A bfloat16 bank "wide" of 32 distinct level-1 blocks (1.76 MiB each, depth 1): long
    fetches without listing a block twice (a request may not repeat a block: issue 16)."""
    out = tmp_path_factory.mktemp("export_wide")
    synthetic_export(out, bank="wide", version="w1", dtype="bfloat16", d_model=512,
                     mem_layers=[0, 1], branching=32, ranks=[300], seed=2)
    return out


@pytest.fixture(scope="session")
def lmdb_dir(tmp_path_factory, tiny_export, big_export) -> Path:
    """One LMDB holding both banks, published, signed with the test key."""
    from services.bank_server.ingest import ingest
    path = tmp_path_factory.mktemp("lmdb") / "bank.lmdb"
    # signed with the test operator's key (testkit/keys.py), as a real deployment signs
    ingest(tiny_export, path, progress=False, map_size=1 << 30, signing_key=signing_key())
    ingest(big_export, path, progress=False, map_size=1 << 30, signing_key=signing_key())
    return path


@pytest.fixture(scope="session")
def trusted_key_file(tmp_path_factory) -> Path:
    """The test signing key's public half as a PEM file, for `--trusted-keys`."""
    from testkit.keys import write_public_key
    return write_public_key(tmp_path_factory.mktemp("keys") / "test.pub")


# -- subprocesses ----------------------------------------------------------------------------
def run_bank_server(lmdb: Path, *extra: str, log_path: Path | None = None, timeout: float = 30.0):
    """Start a bank server subprocess on port 0; yield (address, proc) once it listens."""
    return launch.run_bank_server(lmdb, "--map-size-gb", "1", *extra, log_path=log_path,
                                  timeout=timeout, cwd=REPO)


@pytest.fixture(scope="session")
def bank_server(lmdb_dir, tmp_path_factory) -> str:
    """Address "host:port" of a bank server over `lmdb_dir`, shared by the session."""
    log = tmp_path_factory.mktemp("logs") / "bank_server.log"
    with run_bank_server(lmdb_dir, log_path=log) as (address, _):
        yield address


@pytest.fixture
def start_bank_server(tmp_path):
    """Factory: `with start_bank_server(lmdb, *flags) as (address, proc): ...`."""
    def start(lmdb: Path, *extra: str):
        return run_bank_server(lmdb, *extra,
                               log_path=tmp_path / f"server-{time.monotonic_ns()}.log")
    return start


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server on a free port (no persistence), killed at teardown."""
    server = LocalRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop(kill=True)


# -- a whole tiny model export (anchor + tokenizer + router + bank), no training ---------------
# the builder lives in testkit/models.py (benchmarks/abuse.py uses it too); imported here so that
# tests keep `from tests.conftest import make_model_export, TINY_TEXTS`


@pytest.fixture(scope="session")
def tiny_model_export(tmp_path_factory) -> Path:
    """A loadable `tiny` model export (make_model_export), shared by the session."""
    return make_model_export(tmp_path_factory.mktemp("model_tiny") / "export")


def start_ingest_writing(export: Path, db: Path, *flags: str, timeout: float = 60.0
                         ) -> tuple[subprocess.Popen, float]:
    """Start `services.bank_server.ingest EXPORT --lmdb DB FLAGS` as a subprocess and return
    (proc, the time its writing phase began), read off its ": writing" log line; for tests that
    kill ingest at random moments of that phase."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.bank_server.ingest", str(export), "--lmdb", str(db),
         *flags], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1.0)
        if ready:
            line = proc.stderr.readline()
            if not line:
                break
            if b": writing" in line:
                return proc, time.monotonic()
    proc.kill()
    raise RuntimeError("ingest did not start writing")


def as_exported(manifest):
    """`manifest` without what ingest adds to an export's (issue 16: every block's digest and
    the signature; issue 18: the storage layout), to compare a stored or served manifest with
    the export's."""
    return manifest.model_copy(update={"digests": {}, "signature": None,
                                       "block_store": "version"})


class FakeEmbedder:
    """A stable 384-d unit vector per text: routing without loading MiniLM (different prompts
    may take different paths)."""
    dim = 384

    def encode(self, texts, **_):
        rows = [np.random.default_rng(sum(t.encode())).standard_normal(self.dim) for t in texts]
        out = np.asarray(rows, dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


class ConstantEmbedder:
    """The same 384-d unit vector for every text: every prompt takes the same path."""
    dim = 384

    def encode(self, texts, **_):
        return np.ones((len(texts), self.dim), dtype=np.float32) / self.dim ** 0.5


def wait_for(predicate, timeout: float, step: float = 0.1) -> bool:
    """Poll `predicate` until it holds or `timeout` s pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
