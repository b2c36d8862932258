"""Data-plane worker processes: one shard's data plane on every core.

    python -m services.bank_server.server --lmdb L --port 0 --dataplane-port 0 --workers 4

One Python process serves the data plane on threads, and its interpreter lock caps what it
sends when many devices fetch at once (BENCHMARKS.md, "Shard workers"). With settings.workers
N > 1 the server process (server.py: gRPC, admin HTTP, health) binds the data plane's listening
socket once and starts N processes that accept on it (`python -m services.bank_server.workers`,
the socket inherited as a file descriptor, the settings as one JSON line on its stdin, so no
token shows on a command line or on disk; the socket is never bound twice, so a second, unrelated
server still cannot take the port): the kernel hands each new connection to one of them. Each
opens the LMDB itself (LMDB is made for many reader processes) and serves with dataplane.py,
exactly as the in-process data plane does. What holds for the shard as a whole:
- limits: data plane connections in all and per client, requests/s and block bytes/s per client
  (over gRPC and the data plane together) live in one table in shared memory (peers.py);
- the in-process LRU budget (lru_mb) is split evenly over the N + 1 processes that serve blocks;
- metrics: each worker writes prometheus_client's multiprocess files into one directory, which
  the admin endpoint's /metrics and /v1/stats add to the server's own (metrics.py); the tier
  gauges are the server process's own tiers;
- SIGTERM: the server signals every worker and shuts the shared listener (no new connections
  anywhere); each worker drains as dataplane.stop(grace) does; the server waits for them;
- a worker that dies is started again, after its connection counts are cleared and LMDB's
  reader table is checked (a killed process leaves its read slots taken until someone runs
  mdb_reader_check); a worker ends with its server (PR_SET_PDEATHSIG, which follows the thread
  that started it: the supervisor lives as long as the server; and a check of its parent once
  a second), so none outlives it.
The table and the metrics files live in a private temporary directory, removed at exit.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydantic import SecretStr

from services.bank_server.dataplane import DataPlaneServer, bind
from services.bank_server.peers import PeerTable, SharedSlots, build_limiters
from services.bank_server.security import server_ssl_context
from services.bank_server.settings import BankServerSettings
from services.bank_server.store import LMDBStore, tune_malloc

log = logging.getLogger("membank.bank_server.workers")

READY = "membank dataplane worker ready"   # a worker's one line on stdout, once it accepts
_START_TIMEOUT_S = 60.0                      # imports + LMDB open; generous on a loaded machine
_RESTART_PAUSE_S = 1.0                       # between restarts of a worker that keeps dying


def settings_json(settings: BankServerSettings) -> str:
    """The settings as one JSON line, secrets included (for a worker's stdin only)."""
    fields = settings.model_dump()
    for name, value in fields.items():
        if isinstance(value, SecretStr):
            fields[name] = value.get_secret_value()
    return json.dumps(fields, default=str)


def split_lru(settings: BankServerSettings) -> BankServerSettings:
    """The settings one block-serving process of a shard uses: its share of the LRU budget."""
    if settings.workers == 1 or not settings.lru_mb:
        return settings
    share = settings.lru_mb / (settings.workers + 1)
    # the largest block one LRU keeps stays what the whole budget would keep (a quarter of
    # it, unless set), as far as a share can hold it: the hot 27.5 MB blocks stay cacheable
    item = settings.lru_max_item_mb or settings.lru_mb / 4
    return settings.model_copy(update={"lru_mb": share, "lru_max_item_mb": min(share, item)})


class DataPlaneWorkers:
    """The server's side: the shared listener, the table, the worker processes.

        workers = DataPlaneWorkers(settings)                # before the limiters are built
        limiter, byte_limiter = workers.limiters()
        port = workers.start(on_exit=store.reader_check)     # blocks until every one is ready
        ...
        workers.stop(grace)                                  # drain (blocking)
        workers.close()                                      # after everything else drained
    """

    def __init__(self, settings: BankServerSettings):
        self.s = settings
        self.room = Path(tempfile.mkdtemp(prefix="membank-shard-"))
        try:
            self.metrics_dir = self.room / "metrics"
            self.metrics_dir.mkdir()
            self.table: PeerTable | None = PeerTable.create(self.room / "peers")
        except BaseException:
            shutil.rmtree(self.room, ignore_errors=True)
            raise
        self.listener: socket.socket | None = None
        self.procs: list[subprocess.Popen | None] = [None] * settings.workers
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()      # spawning vs stopping: a worker is never missed
        self._supervisor: threading.Thread | None = None
        self._on_exit = None

    def limiters(self):
        """The requests/s and block bytes/s limiters, shared with every worker (peers.py)."""
        return build_limiters(self.s, self.table)

    def start(self, on_exit=None) -> int:
        """Bind, start every worker and wait until each accepts; the bound port. `on_exit()` is
        called after a worker died, before it is started again (LMDBStore.reader_check)."""
        self._on_exit = on_exit
        self.listener = bind(self.s)
        for i in range(self.s.workers):
            self.procs[i] = self._spawn(i)
        for i, proc in enumerate(self.procs):
            self._wait_ready(i, proc)
        self._supervisor = threading.Thread(target=self._supervise, daemon=True,
                                            name="dataplane-workers")
        self._supervisor.start()
        return self.listener.getsockname()[1]

    def stop(self, grace: float) -> None:
        """Drain every worker (SIGTERM: each runs dataplane.stop(grace)); kill what is left
        after grace + 5 s; remove the room. Blocking."""
        with self._lock:          # no worker is being started once this holds
            self._stopping.set()
            live = [p for p in self.procs if p is not None and p.poll() is None]
        for p in live:
            p.send_signal(signal.SIGTERM)
        if self.listener is not None:
            try:   # Linux: wakes every worker's accept and refuses new connections at once
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + grace + 5.0
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("data plane worker %d did not drain in time; killing it", p.pid)
                p.kill()
                p.wait()
        if self._supervisor is not None:
            self._supervisor.join(2.0)

    def close(self) -> None:
        """Free everything (after stop, once gRPC drained too: its limiters use the table), or
        without a drain when the start failed: workers still alive are killed."""
        with self._lock:
            self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(5.0)
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.table is not None:
            self.table.close()
            self.table = None
        shutil.rmtree(self.room, ignore_errors=True)

    # -- processes ---------------------------------------------------------------------------
    def _spawn(self, index: int) -> subprocess.Popen:
        fd = self.listener.fileno()
        cmd = [sys.executable, "-m", "services.bank_server.workers", "--index", str(index),
               "--listen-fd", str(fd), "--room", str(self.room)]
        proc = subprocess.Popen(cmd, pass_fds=(fd,), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            proc.stdin.write(settings_json(self.s) + "\n")
            proc.stdin.close()
        except OSError:           # it died at once: _wait_ready says so
            pass
        return proc

    def _wait_ready(self, index: int, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        line = ""
        while time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 0.2)[0]:
                line = proc.stdout.readline()
                break
        proc.stdout.close()     # it prints nothing else; its logs go to stderr
        if not line.startswith(READY):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            raise RuntimeError(f"data plane worker {index} did not start (exit code "
                               f"{proc.returncode}; its error is above)")

    def _supervise(self) -> None:
        """Start again any worker that exits while the shard is not stopping. Never dies of an
        error: the workers it started end with it (PR_SET_PDEATHSIG follows this thread)."""
        while not self._stopping.wait(0.2):
            for i, proc in enumerate(self.procs):
                if proc is None or proc.poll() is None:
                    continue
                try:
                    self._restart(i, proc)
                except Exception:
                    log.exception("data plane worker %d: restart failed; trying again", i)

    def _restart(self, i: int, proc: subprocess.Popen) -> None:
        from prometheus_client import multiprocess
        log.error("data plane worker %d (pid %d) exited with %s; starting it again",
                  i, proc.pid, proc.returncode)
        multiprocess.mark_process_dead(proc.pid, str(self.metrics_dir))
        self.table.clear_worker(i)
        if self._on_exit is not None:
            self._on_exit()
        self.restarts += 1
        if self._stopping.wait(_RESTART_PAUSE_S):
            return
        with self._lock:
            if self._stopping.is_set():
                return
            self.procs[i] = self._spawn(i)
        self._wait_ready(i, self.procs[i])


# -- the worker's side ---------------------------------------------------------------------------
def _end_with_parent() -> None:
    """Ask the kernel for SIGTERM when the server process dies (Linux; elsewhere the parent
    check in worker_main covers it)."""
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def worker_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m services.bank_server.workers",
                                description="One data plane worker of a shard; the bank server "
                                "starts these itself (--workers), not by hand.")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--listen-fd", type=int, required=True)
    p.add_argument("--room", type=Path, required=True)
    args = p.parse_args(argv)
    parent = os.getppid()
    _end_with_parent()
    settings = split_lru(BankServerSettings(**json.loads(sys.stdin.readline())))
    logging.basicConfig(level=settings.log_level,
                        format=f"%(asctime)s %(levelname)s %(name)s[w{args.index}]: %(message)s")
    # prometheus_client picks its multiprocess mode from the environment when it is imported
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(args.room / "metrics")
    from services.bank_server.metrics import ServerMetrics
    from services.bank_server.tiers import build_block_store, tiers
    tune_malloc()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the server; it drains us

    store = LMDBStore(settings.lmdb_path, settings.map_size, readonly=True,
                      verify_ttl_s=settings.verify_ttl_s)
    blocks = build_block_store(settings, store)
    table = PeerTable.open(args.room / "peers")
    limiter, byte_limiter = build_limiters(settings, table)
    secret = lambda v: None if v is None else v.get_secret_value()   # noqa: E731
    server = DataPlaneServer(
        settings, store, blocks, metrics=ServerMetrics(), limiter=limiter,
        byte_limiter=byte_limiter, auth_token=secret(settings.auth_token),
        admin_token=secret(settings.admin_token), ssl_context=server_ssl_context(settings),
        slots=SharedSlots(table, args.index, settings.dataplane_max_connections,
                          settings.dataplane_max_connections_per_peer))
    server.start(socket.socket(fileno=args.listen_fd))
    print(READY, flush=True)
    while not stop.wait(1.0):
        if os.getppid() != parent:      # the server is gone (PDEATHSIG missed it)
            break
    server.stop(settings.shutdown_grace_s)
    for tier in tiers(blocks)[:-1]:
        tier.close()
    store.close()


if __name__ == "__main__":
    worker_main()
