"""The local cluster launcher's CLI (services/bank_server/cluster.py): it starts shard-aware
ingest + one server per shard, prints the targets, serves until SIGINT, then stops every
process it started. (Its library side runs in tests/integration/test_faults.py.)

Run: .venv/bin/python -m pytest -q tests/integration/test_local_cluster.py
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from membank.placement import shard_blocks
from services.model_client.bank_client import BankClient
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def cli(*args: str, log=None) -> subprocess.Popen:
    # unbuffered binary stdout: a line read leaves nothing in a Python buffer select() cannot see
    return subprocess.Popen([sys.executable, "-m", "services.bank_server.cluster", *args],
                            cwd=REPO, stdout=subprocess.PIPE, bufsize=0,
                            stderr=log if log is not None else subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def read_json_line(proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(b"{"):
            return json.loads(line)
    proc.kill()
    raise AssertionError("no targets line (see the launcher's log)")


def test_cli_serves_each_shard_its_blocks_until_sigint(tiny_export, tmp_path):
    log = open(tmp_path / "launcher.log", "wb")     # a file: a full pipe would block it
    proc = cli("--export", str(tiny_export), "--shards", "2", "--workdir", str(tmp_path),
               "--map-size-gb", "1", "--", "--no-admin", log=log)
    try:
        info = read_json_line(proc, 120)
        assert info["bank"] == "test" and info["redis"] is None
        assert sorted(info["targets"]) == ["shard-0", "shard-1"]
        served = set()
        for shard, address in info["targets"].items():
            with BankClient(address) as c:
                m = c.get_manifest("test")
                assert m.shards == ["shard-0", "shard-1"]
                mine = list(shard_blocks(m, shard))    # may be none: 2 level-1 groups only
                if mine:
                    served |= set(c.fetch("test", m.version, mine, m))
        assert served == set(m.blocks())      # between them, the shards serve the whole bank
        pids = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)],
                                               capture_output=True, text=True).stdout.split()]
        assert len(pids) == 2                 # one server per shard, children of the launcher
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(60)
        log.close()
    assert rc == 0
    for pid in pids:                          # every server it started is gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_cli_refuses_replication_above_shards_in_one_line(tiny_export, tmp_path):
    proc = cli("--export", str(tiny_export), "--shards", "2", "--replication", "3",
               "--workdir", str(tmp_path))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.decode().strip().splitlines() == ["cluster: replication must be 1..2 (the number of "
                                        "shards), got 3"]
