"""Per-client limits that hold for a whole shard across its processes: a table in shared memory.

With `workers` > 1 (settings.py, workers.py) a shard is several processes: the server process
(gRPC, admin HTTP) and data-plane workers that accept on one listening socket. A client's limits
belong to the shard, not to a process: its data plane connections (per client and in all), its
requests/s and its block bytes/s over both transports. They live here, in one file that every
process of the shard maps (the server creates it in a private directory), one row per client:

    key       u64                 stable hash of the client key ("peer:127.0.0.1"); 0: free row
    seen      f64                 last time.monotonic() of a change (CLOCK_MONOTONIC: one clock
                                  for every process on the machine)
    req, req_t       f64, f64     the request token bucket and when it was last refilled
    bytes, bytes_t   f64, f64     the block-byte token bucket, the same way (NaN: full)
    conns     i32[MAX_WORKERS]    open data plane connections, per worker process
and before the rows `totals` i32[MAX_WORKERS] (each worker's open connections) and the salt.

A client's row is looked for in a window of WINDOW rows from its hash (keyed with a random
salt that the server writes into the file, so no client can pick addresses that crowd
another's window); when the window holds neither its row nor a free one, the window's least
recently seen row without connections is reused (a client dropped that way starts again with
full buckets, as RateLimiter's LRU does). A window whose every row holds open connections
(only as many rows as connections can, at most dataplane_max_connections of 16384) leaves a
new client without a row: refused, by the slots and the limiters alike (fail closed; with the
salt, no one can aim for that). Every change is made under a POSIX record lock on the file
(fcntl.lockf: the kernel releases it when its holder dies) and a thread lock (record locks do
not exclude the threads of one process); a take costs about 20 us against RateLimiter's 1 us.
Connections are counted per worker so that the server can clear what a dead worker held
before it starts a new one.

    table = PeerTable.create(path, rows=16384)         # the server process
    table = PeerTable.open(path)                       # each worker
    limiter = SharedRateLimiter(table, "req", rate=20, burst=50)   # as security.RateLimiter
    slots = SharedSlots(table, worker=0, max_connections=64, max_per_peer=8)  # or LocalSlots
    why = slots.acquire("127.0.0.1")                  # "" admitted, else the refusal's reason
    slots.release("127.0.0.1")
"""
from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np

from services.bank_server.security import RateLimiter

MAX_WORKERS = 32        # data plane processes per shard (settings.workers is checked against it)
WINDOW = 32             # rows a client's row may sit in, from its hash
_ROW = np.dtype([("key", "<u8"), ("seen", "<f8"), ("req", "<f8"), ("req_t", "<f8"),
                 ("bytes", "<f8"), ("bytes_t", "<f8"), ("conns", "<i4", (MAX_WORKERS,))])
_SALT = 16                                  # bytes of the hash key, after the totals
_HEADER = 4 * MAX_WORKERS + 64              # totals: i32 per worker; the salt, padded


class PeerTable:
    """The shared table (see the module docstring). Use `create` or `open`."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = Path(path), fd
        size = os.fstat(fd).st_size
        n = (size - _HEADER) // _ROW.itemsize
        if n < WINDOW or _HEADER + n * _ROW.itemsize != size:
            os.close(fd)
            raise ValueError(f"{path}: not a peer table ({size} bytes)")
        self._map = mmap.mmap(fd, size)
        self.totals = np.frombuffer(self._map, dtype="<i4", count=MAX_WORKERS)
        self.rows = np.frombuffer(self._map, dtype=_ROW, offset=_HEADER, count=n)
        self._keys = self.rows["key"]
        self._salt = bytes(self._map[4 * MAX_WORKERS:4 * MAX_WORKERS + _SALT])
        self._thread_lock = threading.Lock()

    @classmethod
    def create(cls, path: Path, rows: int = 16384) -> "PeerTable":
        """A new, zeroed table file (refuses an existing one: it may be another shard's)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, _HEADER + max(rows, WINDOW) * _ROW.itemsize)   # zero-filled
        os.pwrite(fd, os.urandom(_SALT), 4 * MAX_WORKERS)
        return cls(path, fd)

    @classmethod
    def open(cls, path: Path) -> "PeerTable":
        return cls(path, os.open(path, os.O_RDWR))

    def close(self) -> None:
        # the numpy views must go before the map can close
        self.totals = self.rows = self._keys = None   # type: ignore[assignment]
        try:
            self._map.close()
        except BufferError:       # a view still alive somewhere: the OS unmaps at exit
            pass
        os.close(self.fd)

    @contextmanager
    def locked(self):
        with self._thread_lock:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)

    def row(self, key: str, now: float) -> int | None:
        """The index of `key`'s row, taking one if it has none; None when its window is all
        clients with open connections. Call it locked."""
        # a hash every process agrees on (Python's own is salted per process), keyed with the
        # table's salt; never 0 (a free row)
        h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8, key=self._salt)
                           .digest(), "little") | 1
        start = h % (len(self._keys) - WINDOW + 1)
        window = self._keys[start:start + WINDOW]
        hit = np.flatnonzero(window == h)
        if hit.size:
            i = start + int(hit[0])
            self.rows["seen"][i] = now
            return i
        free = np.flatnonzero(window == 0)
        if free.size:
            i = start + int(free[0])
        else:
            idle = np.flatnonzero(self.rows["conns"][start:start + WINDOW].sum(axis=1) == 0)
            if not idle.size:
                return None
            i = start + int(idle[np.argmin(self.rows["seen"][start + idle])])
        self.rows[i] = (h, now, math.nan, now, math.nan, now, np.zeros(MAX_WORKERS, "<i4"))
        return i

    def clear_worker(self, worker: int) -> None:
        """Forget every connection `worker` held (it died; the server starts a new one)."""
        with self.locked():
            self.totals[worker] = 0
            self.rows["conns"][:, worker] = 0


class SharedRateLimiter:
    """security.RateLimiter's token buckets (same rule, same `take`), kept in a PeerTable so
    that every process of a shard charges one bucket per client. `bucket`: which of the row's
    two buckets ("req": requests, "bytes": block bytes)."""

    def __init__(self, table: PeerTable, bucket: Literal["req", "bytes"], rate: float,
                 burst: float):
        self.table, self.rate, self.burst = table, float(rate), float(burst)
        self._tokens, self._t = bucket, bucket + "_t"

    def take(self, key: str, cost: float = 1.0, *, now: float | None = None) -> float:
        """0.0 if `cost` units are admitted (and counted), else seconds until they would be."""
        now = time.monotonic() if now is None else now
        need = min(float(cost), self.burst)
        rows = self.table.rows
        with self.table.locked():
            i = self.table.row(key, now)
            if i is None:            # no row to count in: refused (fail closed), retry soon
                return max(1.0 / self.rate, 0.1)
            tokens = float(rows[self._tokens][i])
            last = float(rows[self._t][i])
            tokens = self.burst if math.isnan(tokens) else min(
                self.burst, tokens + max(0.0, now - last) * self.rate)
            wait = 0.0
            if tokens >= need:
                tokens -= cost
            else:
                wait = (need - tokens) / self.rate
            rows[self._tokens][i] = tokens
            rows[self._t][i] = now
            return wait


def slots_full(total: int, mine: int, host: str, max_connections: int, max_per_peer: int) -> str:
    """Why one more data plane connection from `host` is over a limit ("" when it is not):
    the global cap bounds threads and fds; the per-peer cap keeps one client from taking them
    all (a device elsewhere still gets a slot)."""
    if total >= max_connections:
        return f"too many data plane connections (limit {max_connections})"
    if mine >= max_per_peer:
        return (f"too many data plane connections from {host} (limit {max_per_peer} per "
                f"client)")
    return ""


class LocalSlots:
    """Data plane connection slots of one process (workers = 1), in all and per client."""

    def __init__(self, max_connections: int, max_per_peer: int):
        self.max_connections, self.max_per_peer = max_connections, max_per_peer
        self._per_peer: dict[str, int] = {}
        self._total = 0
        self._lock = threading.Lock()

    def acquire(self, host: str) -> str:
        """Count a new connection from `host`: "" when admitted, else why it is refused."""
        with self._lock:
            why = slots_full(self._total, self._per_peer.get(host, 0), host,
                             self.max_connections, self.max_per_peer)
            if not why:
                self._total += 1
                self._per_peer[host] = self._per_peer.get(host, 0) + 1
            return why

    def release(self, host: str) -> None:
        with self._lock:
            self._total = max(0, self._total - 1)
            left = self._per_peer.pop(host, 1) - 1
            if left > 0:
                self._per_peer[host] = left


class SharedSlots:
    """LocalSlots for a shard of several processes: counted in a PeerTable, per `worker`."""

    def __init__(self, table: PeerTable, worker: int, max_connections: int, max_per_peer: int):
        if not 0 <= worker < MAX_WORKERS:
            raise ValueError(f"worker index {worker} outside 0..{MAX_WORKERS - 1}")
        self.table, self.worker = table, worker
        self.max_connections, self.max_per_peer = max_connections, max_per_peer

    def acquire(self, host: str) -> str:
        """Count a new connection from `host`: "" when admitted, else why it is refused."""
        t = self.table
        with t.locked():
            total = int(t.totals.sum())
            i = t.row(f"peer:{host}", time.monotonic())
            mine = 0 if i is None else int(t.rows["conns"][i].sum())
            why = slots_full(total, mine, host, self.max_connections, self.max_per_peer)
            if not why and i is None:
                why = "too many data plane clients at once"
            if not why:
                t.totals[self.worker] += 1
                t.rows["conns"][i, self.worker] += 1
            return why

    def release(self, host: str) -> None:
        t = self.table
        with t.locked():
            t.totals[self.worker] = max(0, int(t.totals[self.worker]) - 1)
            i = t.row(f"peer:{host}", time.monotonic())
            if i is not None and t.rows["conns"][i, self.worker] > 0:
                t.rows["conns"][i, self.worker] -= 1


def build_limiters(settings, table: PeerTable | None = None):
    """(requests/s limiter, block bytes/s limiter) as the settings ask (rate_limit_rps,
    rate_limit_mb_s; None where off): this process's own RateLimiters, or, given the shard's
    table, SharedRateLimiters that every process of the shard charges."""
    def make(bucket, rate, burst):
        if table is None:
            return RateLimiter(rate, burst)
        return SharedRateLimiter(table, bucket, rate, burst)
    limiter = (make("req", settings.rate_limit_rps, settings.rate_limit_burst)
               if settings.rate_limit_rps else None)
    byte_limiter = (make("bytes", settings.rate_limit_mb_s * 1e6,
                         settings.rate_limit_burst_mb * 1e6) if settings.rate_limit_mb_s else None)
    return limiter, byte_limiter
