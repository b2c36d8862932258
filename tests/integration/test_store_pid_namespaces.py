"""LMDB marks each process holding an environment by a lock at its PID, so two processes with the
same PID number in different PID namespaces cannot both open one: what the compose stack hit with
a shard's server and an ingest job, each PID 1 of its own container (deploy/README.md, "PID
namespaces"). The tools say so in one line instead of a traceback. Real namespaces via
`unshare --pid --fork` (root only; skipped otherwise)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

HOLD = ("import sys, time; from services.bank_server.store import open_env; "
        "e = open_env(sys.argv[1], 1 << 20, readonly=False); print('open', flush=True); "
        "time.sleep(60)")


def pid1(*argv: str) -> list[str]:
    return ["unshare", "--pid", "--fork", "--kill-child", sys.executable, *argv]


@pytest.fixture
def namespaces():
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for PID namespaces")
    r = subprocess.run(pid1("-c", "import os; print(os.getpid())"), capture_output=True,
                       text=True)
    if r.returncode != 0 or r.stdout.strip() != "1":
        pytest.skip(f"no new PID namespace here: {r.stderr.strip()[:200]}")


def test_a_pid_clash_is_one_clear_line_and_no_pid_clash_works(namespaces, tmp_path):
    holder = subprocess.Popen(pid1("-c", HOLD, str(tmp_path)), cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"open\n"
        # PID 1 of another namespace, as an ingest job's container: refused, one line
        r = subprocess.run(pid1("-m", "services.bank_server.publish", "--lmdb", str(tmp_path),
                                "demo", "v1"), cwd=REPO, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2, r.stderr
        assert "another PID namespace" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        # the same tool with another PID number (as under compose's `init: true`) gets past
        # the lock: it answers that there is no such version, not a lock error
        r = subprocess.run([sys.executable, "-m", "services.bank_server.publish", "--lmdb",
                            str(tmp_path), "demo", "v1"], cwd=REPO, capture_output=True,
                           text=True, timeout=60)
        assert "PID" not in r.stderr and "never completely ingested" in r.stderr, r.stderr
    finally:
        holder.kill()
        holder.wait()
