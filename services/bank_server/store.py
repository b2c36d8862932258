"""The bank server's storage: an LMDB environment holding blocks, manifests and `current`.

Keys come from `membank.keys` only (see there for the layout). Block and manifest keys are
immutable once written (gc leaves a tombstone, so a version name is never written twice), and
parsed manifests are cached by (bank, version); still, a cached manifest is used only while the
stored one is the same bytes (checked whenever LMDB committed anything since: a manifest gc
deleted is dropped, one written again under the name behind the tombstone's back is re-read).
The `current` pointer is the one mutable key and is read afresh on every request, so a publish
by `ingest` is visible to the next request without a restart.

    store = LMDBStore("data/bank.lmdb", map_size=64 << 30)
    version = store.current_version("demo")
    manifest = store.manifest("demo", version)
    with store.read(block_key("demo", version, 1, 0), Expect(nbytes, checksum)) as buf:
        ...   # buf: a read-only memoryview INTO the memory map, valid only inside the `with`
    data = store.get(block_key("demo", version, 1, 0))   # a copy (bytes), valid anywhere

Zero copy: `read` hands out LMDB's own pages (`buffers=True`) inside a short read transaction;
the servicer hashes them and encodes the gRPC chunks straight from them, so a served block is
copied once (into the chunk bytes) instead of twice. Readers never block on the writer (LMDB
MVCC: a read transaction sees the last committed snapshot and takes no lock), and py-lmdb
opens every environment with MDB_NOTLS, so a read transaction is not tied to a thread slot.

Cold reads: a block is one contiguous run of LMDB overflow pages. With readahead off (MADV_RANDOM
on the map) every 4 KiB page is a separate disk read; with readahead on and an explicit
MADV_WILLNEED over the block's pages the kernel issues the whole block at once
(benchmarks/tiers.py measures it per size; BENCHMARKS.md, "Cache tiers").

Verify once (`verify_ttl_s` > 0, the server's `verify_ttl_s` setting): a block read with an
`Expect` is hashed and, when it matches, remembered with the file's stamp (inode, size, mtime,
ctime). A later read of it is served without hashing again only while (1) the stamp is
unchanged: any LMDB commit and any other write into data.mdb (a tool, a stray `dd`) moves the
mtime and the ctime, and while a tool can put the mtime back (`touch -d`, os.utime), doing so
moves the ctime again, which nothing but the kernel's clock sets; (2)
every page of the block is in the page cache when it is read (mincore): a block evicted since
is read back from disk by this read and hashed again, so bit rot on the device is caught (a
page that another reader pulled back in between is not seen: (3) covers it); (3) the check is
younger than `verify_ttl_s`, a periodic re-check that bounds whatever else slips by. The
device verifies every block again against its own manifest, end to end. Saves the hash on the
hot path (measured in BENCHMARKS.md, "Fetch").

Map size: a server maps `map_size` (or the data's size, if larger) when it opens the LMDB. An
ingest with a larger map can grow the data past that; LMDB then refuses every new read
transaction with MDB_MAP_RESIZED until the reader adopts the new size (`set_mapsize(0)`). The
store does that on the spot and begins again: LMDB unmaps the old map to do it, so it waits until
no read of this store holds a view into the map (`_MapGuard`), and no new read starts meanwhile.
If the new map cannot be mapped (address space), the environment is unusable: every read raises
StoreUnavailable and `failure` says why; the server turns health NOT_SERVING on it (server.py).

One environment per process and path (LMDB forbids opening the same file twice in a process:
closing one handle would drop the other's POSIX locks): `acquire_env` hands out a shared,
reference-counted handle, used by the store, ingest, GC and rebalance alike.

No protobuf here: the servicer converts at the edge.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterator, Protocol

import lmdb
import numpy as np

from membank.blocks import checksum
from membank.keys import SHARD_KEY, current_key, manifest_key, manifest_prefix, version_info_key
from membank.manifest import Manifest

# LMDB reader slots of a store directory, shared by every process that opens it (servers,
# ingest, gc): each in-flight block read holds one (settings.py checks the server's caps fit)
MAX_READERS = 512

log = logging.getLogger(__name__)

# values at least this large get an explicit MADV_WILLNEED (one big read instead of page faults)
PREFETCH_MIN_BYTES = 256 << 10
# verify once: at most this many verified blocks remembered (~100 B each)
_VERIFIED_MAX = 1 << 17
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_WILLNEED = 3


class CorruptBlock(Exception):
    """The authoritative store holds bytes that fail the expected size or checksum."""


class StoreUnavailable(Exception):
    """The LMDB cannot be read now (its grown map could not be adopted): a server fault, not
    the request's (fetchplan answers UNAVAILABLE; health goes NOT_SERVING)."""


class _MapGuard:
    """Reads share the memory map; adopting a new map size excludes them all (LMDB unmaps the
    old map, and a zero-copy view into it would then point at nothing). Shared holds nest per
    thread (a read that looks up a manifest inside its `with`)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._remapping = False
        self._depth = threading.local()

    def held(self) -> bool:
        return getattr(self._depth, "n", 0) > 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._depth, "n", 0)
        if depth == 0:
            with self._cond:
                while self._remapping:
                    self._cond.wait()
                self._readers += 1
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth
            if depth == 0:
                with self._cond:
                    self._readers -= 1
                    if self._remapping and self._readers == 0:
                        self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._remapping:
                self._cond.wait()
            self._remapping = True            # new readers wait from now on
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._remapping = False
                self._cond.notify_all()


@dataclass(frozen=True)
class Expect:
    """What a block must be: its size and its manifest checksum (xxh3_64 hex)."""
    nbytes: int
    checksum: str

    def ok(self, buf) -> bool:
        return memoryview(buf).nbytes == self.nbytes and checksum(buf) == self.checksum


class BlockStore(Protocol):
    """Anything that maps a block key to its bytes (LMDB, an LRU or Redis in front of LMDB).

    `read(key, expect)` yields a buffer valid inside the `with` (None when the key is absent);
    with `expect`, the buffer is one that matches it: a cache tier evicts a mismatching entry
    and reads on, the last tier (LMDB) raises CorruptBlock. `get` is the copying convenience.
    """

    def get(self, key: bytes) -> bytes | None: ...

    def read(self, key: bytes, expect: Expect | None = None) -> ContextManager: ...

    def stats(self) -> dict: ...


def read_from(store, key: bytes, expect: Expect | None = None) -> ContextManager:
    """`store.read(key, expect)` itself (no extra layer: it is on every block fetch's path), or
    the same over `store.get` for get-only stores."""
    if hasattr(store, "read"):
        return store.read(key, expect)
    return _read_via_get(store, key, expect)


@contextmanager
def _read_via_get(store, key: bytes, expect: Expect | None) -> Iterator:
    data = store.get(key)
    if data is not None and expect is not None and not expect.ok(data):
        raise CorruptBlock(f"{bytes(key)[:120]!r} fails its checksum")
    yield data


# -- environments -----------------------------------------------------------------------------
def open_env(path: str | Path, map_size: int, *, readonly: bool,
             writemap: bool = False) -> lmdb.Environment:
    """Open an LMDB environment directly (prefer acquire_env: one handle per process and path).

    `writemap` (writers only): write through the memory map instead of copying every page
    through malloc'd buffers; still crash-safe (LMDB syncs the data before the meta page that
    commits it), but LMDB then sizes the file to map_size (sparse: `du` shows the real use,
    `ls -l` the map size). Whether it speeds up ingest depends on the disk
    (`benchmarks/paper_scale.py --writemap`; BENCHMARKS.md, "Paper scale").
    """
    if not readonly:
        Path(path).mkdir(parents=True, exist_ok=True)
    # LMDB marks a live reader by locking the lock file at its PID. Two processes with the same
    # PID number in different PID namespaces (a server and an ingest job, each PID 1 in its own
    # container) cannot both have it open: the second fails at its first transaction (py-lmdb's
    # open runs one) with EAGAIN. Say what to do, rather than "Resource temporarily unavailable".
    try:
        return lmdb.open(
            str(path),
            map_size=map_size,
            readonly=readonly,
            writemap=writemap and not readonly,
            # readers never take the write lock; the lock file only tracks reader slots, so a
            # writer (ingest) and any number of servers can share the same directory
            lock=True,
            # blocks are MBs of contiguous overflow pages read whole: readahead (plus WILLNEED in
            # LMDBStore.read) turns a cold block into a few large reads instead of 4 KiB faults
            readahead=True,
            max_readers=MAX_READERS,
            max_dbs=0,
            subdir=True,
        )
    except lmdb.LockError as e:
        raise StoreLockedError(
            f"{path}: {e}: a process with this PID number in another PID namespace (e.g. PID 1 "
            f"of another container) has this LMDB open; run the server under an init "
            f"(compose `init: true`, Kubernetes `shareProcessNamespace: true`) or run this "
            f"inside its container (deploy/README.md, \"PID namespaces\")") from None


class StoreLockedError(lmdb.LockError):
    """The LMDB is held by a process whose PID clashes with ours (open_env)."""


_ENVS: dict[str, list] = {}          # realpath -> [env, readonly, refcount]
_ENVS_LOCK = threading.Lock()


def acquire_env(path: str | Path, map_size: int, *, readonly: bool,
                writemap: bool = False) -> lmdb.Environment:
    """The process's one environment for `path` (opened on first use, reference counted).

    A read-only handle is served by an already open writable one; asking for a writable one
    while a read-only one is open raises (LMDB cannot change it in place).
    """
    if not readonly:
        Path(path).mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(path)
    with _ENVS_LOCK:
        entry = _ENVS.get(key)
        if entry is not None:
            if entry[1] and not readonly:
                raise RuntimeError(f"{path} is open read-only in this process; close the "
                                   f"LMDBStore before writing to it")
            entry[2] += 1
            return entry[0]
        env = open_env(path, map_size, readonly=readonly, writemap=writemap)
        _ENVS[key] = [env, readonly, 1]
        return env


def release_env(env: lmdb.Environment) -> None:
    with _ENVS_LOCK:
        for key, entry in list(_ENVS.items()):
            if entry[0] is env:
                entry[2] -= 1
                if entry[2] == 0:
                    del _ENVS[key]
                    env.close()
                return
    env.close()   # not from acquire_env


# -- page cache -------------------------------------------------------------------------------
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


_LIBC = _libc()


def _page_span(buf) -> tuple[int, int]:
    """(page-aligned start address, length) of the pages a mapped buffer lies on."""
    n = memoryview(buf).nbytes
    addr = np.frombuffer(buf, dtype=np.uint8).ctypes.data
    start = addr - addr % _PAGE
    return start, addr + n - start


def resident(buf) -> bool:
    """Whether every page of a mapped buffer is in the page cache now (mincore). False when it
    cannot tell (no libc, or mincore failed)."""
    if _LIBC is None:
        return False
    start, length = _page_span(buf)
    n = (length + _PAGE - 1) // _PAGE
    vec, addr = _mincore_vector(n)
    if _LIBC.mincore(start, length, addr) != 0:
        return False
    return 0 not in vec[:n].translate(_BIT0)


# mincore's answer: a byte per page, bit 0 = resident (the other bits are reserved)
_BIT0 = bytes(b & 1 for b in range(256))
_VECTORS = threading.local()


def _mincore_vector(pages: int) -> tuple[bytearray, int]:
    """This thread's mincore vector (at least `pages` bytes) and its address: made once per
    thread, not per read (resident() runs for every verified block read)."""
    held = getattr(_VECTORS, "held", None)
    if held is None or len(held[0]) < pages:
        vec = bytearray(max(pages, 8192))      # 8192 pages: a 32 MiB block
        ref = ctypes.c_char.from_buffer(vec)   # keeps the address valid while held
        held = _VECTORS.held = (vec, ctypes.addressof(ref), ref)
    return held[0], held[1]


def prefetch(buf) -> bool:
    """Ask the kernel to read a mapped buffer's pages now, in one go (MADV_WILLNEED); a
    WILLNEED over resident pages still costs time (BENCHMARKS.md, "Cache tiers"), so call it
    only for buffers that are not `resident`. True when it issued the read-ahead."""
    if _LIBC is None:
        return False
    start, length = _page_span(buf)
    _LIBC.madvise(start, length, _MADV_WILLNEED)
    return True


def page_cache_residency(path: str | Path) -> float | None:
    """Fraction of a file's pages in the page cache (mincore over a private mapping)."""
    if _LIBC is None:
        return None
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _LIBC.mmap(None, size, 1, 1, fd, 0)        # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        try:
            pages = (size + _PAGE - 1) // _PAGE
            vec = np.zeros(pages, dtype=np.uint8)
            if _LIBC.mincore(addr, size, vec.ctypes.data) != 0:
                return None
            return float((vec & 1).sum()) / pages
        finally:
            _LIBC.munmap(addr, size)
    finally:
        os.close(fd)


def evict_from_page_cache(path: str | Path) -> None:
    """Drop a file's clean, unmapped pages from the page cache (benchmarks' cold reads).

    Pages still mapped by a process (an open LMDB environment that touched them) stay: close
    the environment first.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# -- the store --------------------------------------------------------------------------------
class LMDBStore:
    """Read access to a bank LMDB (readonly=False only for tools that also write)."""

    name = "lmdb"

    def __init__(self, path: str | Path, map_size: int = 64 << 30, *, readonly: bool = True,
                 prefetch: bool = True, verify_ttl_s: float = 0.0):
        """`verify_ttl_s` > 0: trust a block verified less than this long ago without hashing
        it again, while the file is unchanged and the block's pages stayed in the page cache
        (module docstring, "Verify once"); 0: hash on every read."""
        self.path = Path(path)
        if readonly and not (self.path / "data.mdb").exists():
            raise FileNotFoundError(f"no LMDB database at {self.path} (run ingest first)")
        self.env = acquire_env(self.path, map_size, readonly=readonly)
        self.prefetch = prefetch
        self.verify_ttl_s = verify_ttl_s
        self._guard = _MapGuard()
        self.failure: str | None = None   # set when the environment became unusable
        # (bank, version) -> (LMDB txn id it was last checked at, checksum of its JSON, parsed)
        self._manifests: dict[tuple[str, str], tuple[int, str, Manifest]] = {}
        # key -> (checksum, file stamp, monotonic time) of a verified read (see _trusted)
        self._verified: dict[bytes, tuple[str, tuple, float]] = {}
        self._data_fd = os.open(self.path / "data.mdb", os.O_RDONLY) if verify_ttl_s > 0 else None
        self._lock = threading.Lock()
        self._closed = False
        # cold_reads: blocks not wholly in the page cache when read (the disk was read);
        # trusted: reads of a block verified before, not hashed again
        self._n = {"reads": 0, "hits": 0, "misses": 0, "bytes": 0, "corrupt": 0,
                   "cold_reads": 0, "trusted": 0}

    # -- transactions -----------------------------------------------------------------------
    @contextmanager
    def _txn(self) -> Iterator[lmdb.Transaction]:
        """A read transaction (buffers=True) under the map guard, ended on exit. A map grown by
        another process (MDB_MAP_RESIZED) is adopted and the transaction begun again, once."""
        for _ in range(2):
            with self._guard.shared():
                if self.failure is not None:
                    raise StoreUnavailable(self.failure)
                try:
                    txn = self.env.begin(buffers=True)
                except lmdb.MapResizedError:
                    txn = None
                if txn is not None:
                    try:
                        yield txn
                    finally:
                        txn.abort()   # read-only: abort = end; views must not outlive it
                    return
            self._adopt_map_size()
        raise StoreUnavailable(f"the LMDB at {self.path} grew again while this server adopted "
                               f"its map; retry")

    def _adopt_map_size(self) -> None:
        """Map the size the writer committed (set_mapsize(0)), with no read in flight."""
        if self._guard.held():      # a read of this thread holds the old map: cannot remap here
            raise StoreUnavailable(f"the LMDB at {self.path} grew during this read; retry")
        with self._guard.exclusive():
            if self.failure is not None:
                return
            try:
                self.env.begin().abort()     # another thread adopted it meanwhile
                return
            except lmdb.MapResizedError:
                pass
            old = self.env.info()["map_size"]
            try:
                self.env.set_mapsize(0)
            except lmdb.Error as e:
                # LMDB unmapped the old map and could not map the new one: this environment
                # must not be touched again (its meta pointers lead into the unmapped range)
                self.failure = (f"cannot map the grown LMDB at {self.path}: {e}; restart the "
                                f"server (with more address space)")
                log.error("%s", self.failure)
                return
            log.warning("the LMDB at %s grew past this server's map (another process wrote "
                        "with a larger map size); map %d MiB -> %d MiB", self.path, old >> 20,
                        self.env.info()["map_size"] >> 20)

    def check(self) -> str | None:
        """Begin and end one read (adopting a grown map on the way): None when the store is
        readable, else why not (`failure`). The server's health follows it."""
        try:
            with self._txn():
                pass
        except StoreUnavailable:
            pass
        return self.failure

    # -- blocks -----------------------------------------------------------------------------
    @contextmanager
    def read(self, key: bytes, expect: Expect | None = None) -> Iterator[memoryview | None]:
        """Zero copy: a read-only view of the value in the memory map, valid inside the `with`.

        With `expect`, raises CorruptBlock when the stored bytes do not match it.
        """
        with self._txn() as txn:
            buf = txn.get(key)
            cold = trusted = bad = False
            if buf is not None:
                big = self.prefetch and len(buf) >= PREFETCH_MIN_BYTES
                verify_once = expect is not None and self._data_fd is not None
                # mincore only where an answer is used: read-ahead of big blocks, verify once
                warm = (big or verify_once) and resident(buf)
                cold = big and not warm and prefetch(buf)
                if expect is not None:
                    stamp = self._stamp()
                    trusted = warm and self._trusted(key, expect, stamp)
                    if not trusted:
                        bad = not expect.ok(buf)
                        if not bad and stamp is not None:
                            self._remember(key, expect, stamp)
            with self._lock:
                self._n["reads"] += 1
                if buf is None:
                    self._n["misses"] += 1
                else:
                    self._n["hits"] += 1
                    self._n["bytes"] += len(buf)
                    self._n["corrupt"] += bad
                    self._n["cold_reads"] += cold
                    self._n["trusted"] += trusted
            if bad:
                self._verified.pop(bytes(key), None)
                raise CorruptBlock(f"{bytes(key)[:120]!r} fails its manifest checksum")
            yield buf

    def _stamp(self) -> tuple | None:
        """What identifies data.mdb's content: (inode, size, mtime, ctime in ns). Every LMDB
        commit and every other write to the file moves the mtime and the ctime; the mtime can be
        put back (utime), the ctime cannot. None when verify-once is off."""
        if self._data_fd is None:
            return None
        st = os.fstat(self._data_fd)
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _trusted(self, key: bytes, expect: Expect, stamp: tuple | None) -> bool:
        """A verified read of these bytes under this stamp, younger than verify_ttl_s."""
        seen = self._verified.get(bytes(key)) if stamp is not None else None
        if seen is None or seen[0] != expect.checksum or seen[1] != stamp:
            return False
        return time.monotonic() - seen[2] < self.verify_ttl_s

    def _remember(self, key: bytes, expect: Expect, stamp: tuple) -> None:
        if len(self._verified) >= _VERIFIED_MAX:   # bounded: forget all, re-verify as read
            self._verified.clear()
        self._verified[bytes(key)] = (expect.checksum, stamp, time.monotonic())

    def generation(self) -> int:
        """LMDB's last committed write transaction: it moves with every commit to the store
        (ingest, publish, gc), by this process or any other; what is derived from the store's
        versions and manifests stays valid while it does not move."""
        with self._txn() as txn:
            return txn.id()

    def reader_check(self) -> int:
        """Free the reader slots of processes that died holding them (a killed data plane
        worker: LMDB frees them only when asked); how many were freed."""
        return self.env.reader_check()

    def get(self, key: bytes) -> bytes | None:
        """A copy of the value (valid after the transaction), or None."""
        with self._txn() as txn:
            buf = txn.get(key)
            return None if buf is None else bytes(buf)

    # -- versions ---------------------------------------------------------------------------
    def current_version(self, bank: str) -> str | None:
        """The published version of a bank, or None for an unknown bank."""
        raw = self.get(current_key(bank))
        return None if raw is None else raw.decode()

    def manifest(self, bank: str, version: str) -> Manifest | None:
        """The manifest of (bank, version), or None when that version does not exist (never
        completed, or garbage-collected since)."""
        with self._txn() as txn:
            generation = txn.id()
            cached = self._manifests.get((bank, version))
            if cached is not None and cached[0] == generation:
                return cached[2]        # nothing committed since it was checked
            raw = txn.get(manifest_key(bank, version))
            if raw is None:             # never written, or collected by gc
                with self._lock:
                    self._manifests.pop((bank, version), None)
                return None
            digest = checksum(raw)      # the same JSON: keep the parsed one
            manifest = cached[2] if cached is not None and cached[1] == digest \
                else Manifest.from_json(bytes(raw))
        with self._lock:
            self._manifests[(bank, version)] = (generation, digest, manifest)
        return manifest

    def versions(self, bank: str) -> list[tuple[str, dict]]:
        """Complete versions of a bank with their ingest info, oldest first."""
        with self._txn() as txn:
            return versions_in(txn, bank)

    def banks(self) -> list[str]:
        """Banks with a published version (readiness lists them)."""
        out = []
        with self._txn() as txn:
            cursor = txn.cursor()
            if cursor.set_range(b"c/"):
                for key in cursor.iternext(keys=True, values=False):
                    if not bytes(key).startswith(b"c/"):
                        break
                    out.append(bytes(key[2:]).decode())
        return out

    @property
    def shard_id(self) -> str | None:
        """The shard this LMDB was ingested for (None: every block, single-shard mode)."""
        raw = self.get(SHARD_KEY)
        return None if raw is None else raw.decode()

    # -- metrics ----------------------------------------------------------------------------
    def stats(self, *, residency: bool = True) -> dict:
        """Counters since start: reads, hits (found), misses (absent), bytes, corrupt,
        cold_reads (blocks that were not wholly in the page cache); the file size, its disk use
        and, with residency, the fraction of it in the page cache (mincore, a few ms for a
        10 GB file)."""
        with self._lock:
            out = {"tier": self.name, **self._n}
        data = self.path / "data.mdb"
        try:
            out["file_bytes"] = data.stat().st_size
            out["disk_bytes"] = data.stat().st_blocks * 512
            out["resident_fraction"] = page_cache_residency(data) if residency else None
        except OSError:
            pass
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            release_env(self.env)
            if self._data_fd is not None:
                os.close(self._data_fd)

    def __enter__(self) -> "LMDBStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def list_versions(env: lmdb.Environment, bank: str) -> list[tuple[str, dict]]:
    """(version, info) of every complete version (manifest present), oldest first.

    Order: the `completed_at` ingest wrote beside the manifest; versions without it count as
    oldest, by name.
    """
    with env.begin(buffers=True) as txn:
        return versions_in(txn, bank)


def versions_in(txn: lmdb.Transaction, bank: str) -> list[tuple[str, dict]]:
    """`list_versions` inside an open read transaction."""
    prefix = manifest_prefix(bank)
    out = []
    cur = txn.cursor()
    if cur.set_range(prefix):
        for k in cur.iternext(values=False):
            k = bytes(k)
            if not k.startswith(prefix):
                break
            version = k[len(prefix):].decode()
            raw = txn.get(version_info_key(bank, version))
            out.append((version, json.loads(bytes(raw)) if raw is not None else {}))
    return sorted(out, key=lambda vi: (vi[1].get("completed_at", 0.0), vi[0]))


def tune_malloc() -> None:
    """Keep multi-MB block buffers on the heap instead of a fresh mmap per allocation.

    glibc serves allocations above M_MMAP_THRESHOLD with their own mmap, which the kernel
    zero-fills page by page on first touch and unmaps on free, so every block read would pay
    its page faults again. Raising the mmap threshold to 64 MiB (above the paper's largest
    27.5 MB block; older glibc caps it at 32 MiB, so fall back to that) and the trim threshold
    well above it lets freed block buffers be reused. Not glibc (musl, macOS): nothing to do.
    """
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, 64 << 20) or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        ok = libc.mallopt(M_TRIM_THRESHOLD, 256 << 20) and ok
    except (OSError, AttributeError):
        return
    if not ok:
        log.debug("mallopt refused the thresholds; keeping glibc defaults")
