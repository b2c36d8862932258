"""The device's block cache: a byte budget that knows the hierarchy, optionally backed by disk.

    cache = DeviceCache(budget_bytes=64 << 20, directory="~/.cache/membank",
                        disk_budget_bytes=1 << 30)
    buf = cache.get(manifest, level, node)          # verified bytes, or None (a miss)
    cache.put(manifest, level, node, buf)           # after the fetcher verified it
    cache.get(manifest, level, node, encoding="int8")   # the int8 payload (membank/quant.py)
    cache.stats()                                   # per level: hits, misses, bytes, evictions

Why deepest-first: a level-l node is shared by 1/k^(l-1) of all prompts, so a level-1 block is
reused by almost every prompt and a leaf block by few. Eviction takes the least recently used
block of the DEEPEST level that has any, and touches a shallower level only when nothing deeper
is left. A block larger than the whole budget is not cached at all.

Keys are by content: (bank, content id, level, encoding), the content id being the hash the
manifest lists for the block (`Manifest.content_id`: its signed digest). A new version that
leaves a block unchanged lists the same hash, so the cached block is hit under the new version
too: a publish costs a device only the blocks that changed (issue 18), and a rebalance (same
blocks, new shard map) costs nothing. The bank is part of the key: no other bank's block ever
stands in. A native block and its int8 payload are separate entries (other bytes, other hashes;
an int8 payload is about 1/2 of a bfloat16 block and 1/4 of a float32 one, so the same budget
holds 2-4x as many).

Trust: an entry remembers the manifest hash it was verified against (`Manifest.block_check`: the
signed digest, or the xxh3 checksum of an unsigned manifest without digests); `get` returns it
only when the asking manifest lists the same hash (no rehash: the bytes never left this
process). The disk tier is re-verified on every read back (the file hashed against the
manifest: a file on disk is as untrusted as a byte from the network); a file
of the wrong size or checksum is deleted and counted as `corrupt`, never returned. Files are
written to a unique temporary name and renamed into place (atomic: a reader sees a whole file or
none); no fsync, because a file torn by a power cut fails its checksum on read and is dropped.

File names are `{bank}@{level}@{content id}.block` for a native block and
`{bank}@{level}@{content id}@{encoding}.block` for an encoded one: bank ids match
`[A-Za-z0-9._-]+` (membank/manifest.py), content ids `{algo}-{hex}`, neither contains '@' or
'/', and encodings are a known list, so a name parses back to exactly one key and never leaves
the directory. Files of the layout before content addressing (`{bank}@{version}@{level}@{node}
[@{encoding}].blk`) are deleted when the directory is indexed; other files are ignored.

Thread-safe (one lock): the sharded fetcher's threads may put while the model reads.
Run its tests: .venv/bin/pytest -q tests/unit/test_device_cache.py
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from membank import quant
from membank.blocks import digest
from membank.keys import CONTENT_ID
from membank.manifest import Manifest

log = logging.getLogger("membank.client.cache")

Key = tuple[str, str, int, str]          # (bank, content id, level, encoding)
SUFFIX = ".block"
# a file of the cache's layout before content addressing (deleted at start-up)
_OLD_FILE = re.compile(r"[A-Za-z0-9._-]+@[A-Za-z0-9._-]+@\d+@\d+(?:@[a-z0-9]+)?\.blk")


@dataclass
class LevelStats:
    hits: int = 0          # served from memory
    disk_hits: int = 0     # served from disk (verified, then kept in memory)
    misses: int = 0
    bytes: int = 0         # resident in memory
    blocks: int = 0        # resident in memory
    evictions: int = 0     # evicted from memory
    corrupt: int = 0       # disk files dropped (wrong size or checksum)
    disk_bytes: int = 0    # resident on disk

    @property
    def hit_ratio(self) -> float:
        n = self.hits + self.disk_hits + self.misses
        return (self.hits + self.disk_hits) / n if n else 0.0


@dataclass
class _Entry:
    data: bytearray | bytes
    checksum: str


@dataclass
class _Tier:
    """One byte-budgeted tier: per level an OrderedDict in LRU order (oldest first)."""
    budget: int
    levels: dict[int, OrderedDict] = field(default_factory=dict)
    used: int = 0

    def touch(self, key: Key) -> None:
        self.levels[key[2]].move_to_end(key)

    def add(self, key: Key, value, nbytes: int) -> None:
        self.levels.setdefault(key[2], OrderedDict())[key] = value
        self.used += nbytes

    def victim(self, keep: Key | None = None) -> Key | None:
        """The least recently used key of the deepest non-empty level (never `keep`)."""
        for level in sorted(self.levels, reverse=True):
            for key in self.levels[level]:
                if key != keep:
                    return key
        return None

    def pop(self, key: Key):
        return self.levels[key[2]].pop(key)


def block_key(manifest: Manifest, level: int, node: int, encoding: str = "") -> Key:
    """The cache key of a block of `manifest` in `encoding`: by content, not by version."""
    return (manifest.bank, manifest.content_id(level, node, encoding), int(level), encoding)


def file_name(key: Key) -> str:
    bank, content, level, encoding = key
    return f"{bank}@{level}@{content}{'@' + encoding if encoding else ''}{SUFFIX}"


def parse_file_name(name: str) -> Key | None:
    """The key a cache file name stands for; None for anything else (ignored, never deleted)."""
    if not name.endswith(SUFFIX):
        return None
    parts = name[: -len(SUFFIX)].split("@")
    if len(parts) not in (3, 4) or not parts[0] or not CONTENT_ID.fullmatch(parts[2]):
        return None
    encoding = parts[3] if len(parts) == 4 else ""
    if len(parts) == 4 and encoding not in quant.ENCODINGS:
        return None
    try:
        level = int(parts[1])
    except ValueError:
        return None
    return (parts[0], parts[2], level, encoding) if level >= 1 else None


class DeviceCache:
    def __init__(self, budget_bytes: int, directory: str | Path | None = None,
                 disk_budget_bytes: int | None = None):
        """`budget_bytes`: memory budget. `directory`: optional persistent tier (created if
        missing; existing files are indexed, not read, until a `get` verifies them);
        `disk_budget_bytes`: its budget (None: 4x the memory budget)."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, not {budget_bytes}")
        self._lock = threading.Lock()
        self._mem = _Tier(int(budget_bytes))
        self._stats: dict[int, LevelStats] = {}
        self.directory = Path(directory).expanduser() if directory is not None else None
        self._disk: _Tier | None = None
        if self.directory is not None:
            disk_budget = (4 * int(budget_bytes) if disk_budget_bytes is None
                           else int(disk_budget_bytes))
            self._disk = _Tier(disk_budget)
            self.directory.mkdir(parents=True, exist_ok=True)
            self._index_disk()

    # -- public API --------------------------------------------------------------------------
    def get(self, manifest: Manifest, level: int, node: int, *, encoding: str = ""):
        """The block's bytes (in `encoding`) if cached and matching `manifest`'s checksum for
        that encoding, else None.

        The returned buffer is shared with the cache: copy it, never modify it.
        """
        key = block_key(manifest, level, node, encoding)
        # the signed digest when the manifest lists digests, else the xxh3 checksum
        algo, want = manifest.block_check(level, node, encoding)
        with self._lock:
            st = self._level(level)
            entry = self._mem.levels.get(level, {}).get(key)
            if entry is not None and entry.checksum == want:
                self._mem.touch(key)
                st.hits += 1
                return entry.data
            on_disk = self._disk is not None and key in self._disk.levels.get(level, {})
        if on_disk:
            data = self._read_verified(key, manifest.block_nbytes(level, encoding), algo, want)
            if data is not None:
                with self._lock:
                    self._level(level).disk_hits += 1
                    if key in self._disk.levels.get(level, {}):
                        self._disk.touch(key)
                    self._insert_mem(key, _Entry(data, want))
                return data
        with self._lock:
            self._level(level).misses += 1
        return None

    def put(self, manifest: Manifest, level: int, node: int, data, *, verified: bool = False,
            encoding: str = "") -> bool:
        """Keep a block (its bytes in `encoding`). `verified=True` says the caller already
        matched its bytes against `manifest` (the fetcher does); otherwise they are hashed here,
        and a block that does not match raises ValueError. Returns False when the block is
        larger than the budget."""
        key = block_key(manifest, level, node, encoding)
        algo, want = manifest.block_check(level, node, encoding)
        nbytes = manifest.block_nbytes(level, encoding)
        if len(data) != nbytes or (not verified and digest(data, algo) != want):
            raise ValueError(f"block ({level}, {node}) of {manifest.bank}/{manifest.version} does "
                             f"not match its manifest; not cached")
        with self._lock:
            kept = self._insert_mem(key, _Entry(data, want))
            to_disk = self._disk is not None and key not in self._disk.levels.get(level, {}) \
                and nbytes <= self._disk.budget
        if to_disk:
            self._write_disk(key, data)
            kept = True
        return kept

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._mem.levels.get(key[2], {}) or (
                self._disk is not None and key in self._disk.levels.get(key[2], {}))

    def keys(self, tier: str = "memory") -> list[Key]:
        """Resident keys of a tier ("memory" or "disk"), per level in LRU order (oldest first)."""
        with self._lock:
            t = self._mem if tier == "memory" else self._disk
            if t is None:
                return []
            return [k for level in sorted(t.levels) for k in t.levels[level]]

    @property
    def used_bytes(self) -> int:
        return self._mem.used

    @property
    def budget_bytes(self) -> int:
        return self._mem.budget

    def level_stats(self) -> dict[int, LevelStats]:
        with self._lock:
            return {lv: LevelStats(**vars(s)) for lv, s in sorted(self._stats.items())}

    def stats(self) -> dict:
        """Plain dict (JSON-ready): totals and per level hits, misses, bytes, hit ratio."""
        per = self.level_stats()
        return {
            "budget_bytes": self._mem.budget, "used_bytes": self._mem.used,
            "disk_budget_bytes": self._disk.budget if self._disk else 0,
            "disk_used_bytes": self._disk.used if self._disk else 0,
            "levels": {lv: {**vars(s), "hit_ratio": round(s.hit_ratio, 4)}
                       for lv, s in per.items()},
        }

    # -- memory tier (lock held) --------------------------------------------------------------
    def _level(self, level: int) -> LevelStats:
        return self._stats.setdefault(level, LevelStats())

    def _insert_mem(self, key: Key, entry: _Entry) -> bool:
        n = len(entry.data)
        if n > self._mem.budget:
            return False
        level = key[2]
        old = self._mem.levels.get(level, {}).get(key)
        if old is not None:        # same key again (e.g. a concurrent fetch): replace in place
            self._mem.pop(key)
            self._mem.used -= len(old.data)
            self._level(level).bytes -= len(old.data)
            self._level(level).blocks -= 1
        while self._mem.used + n > self._mem.budget:
            victim = self._mem.victim()
            gone = self._mem.pop(victim)
            self._mem.used -= len(gone.data)
            st = self._level(victim[2])
            st.bytes -= len(gone.data)
            st.blocks -= 1
            st.evictions += 1
        self._mem.add(key, entry, n)
        st = self._level(level)
        st.bytes += n
        st.blocks += 1
        return True

    # -- disk tier ----------------------------------------------------------------------------
    def _path(self, key: Key) -> Path:
        return self.directory / file_name(key)

    def _index_disk(self) -> None:
        """Index the files a previous process left, oldest modification first (LRU order)."""
        found = []
        for entry in os.scandir(self.directory):
            key = parse_file_name(entry.name)
            if key is None and _OLD_FILE.fullmatch(entry.name):
                _unlink(Path(entry.path))       # keyed by version: never hit again
                continue
            if key is None or not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            found.append((st.st_mtime_ns, key, st.st_size))
        for _, key, size in sorted(found):
            self._disk.add(key, size, size)
            self._level(key[2]).disk_bytes += size
        for path in self._shrink_disk():    # a smaller budget than last time
            _unlink(path)

    def _read_verified(self, key: Key, nbytes: int, algo: str, want: str) -> bytearray | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                data = bytearray(nbytes)
                got = f.readinto(data)
                extra = f.read(1)
        except OSError:
            got, extra, data = -1, b"", None
        if got == nbytes and not extra and digest(data, algo) == want:
            return data
        log.warning("device cache: dropping %s (%s)", path.name,
                    "unreadable" if data is None else "wrong size" if got != nbytes or extra
                    else "checksum mismatch")
        with self._lock:
            self._level(key[2]).corrupt += 1
            self._forget_disk(key)
        _unlink(path)
        return None

    def _write_disk(self, key: Key, data) -> None:
        # a unique temporary name in the same directory, then one rename: concurrent writers of
        # one key never see each other's half-written file
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.directory)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(key))
        except OSError as e:   # a full or read-only disk costs the persistent tier, not the fetch
            log.warning("device cache: cannot write %s: %s", file_name(key), e)
            if tmp is not None:
                _unlink(Path(tmp))
            return
        with self._lock:
            if key not in self._disk.levels.get(key[2], {}):
                self._disk.add(key, len(data), len(data))
                self._level(key[2]).disk_bytes += len(data)
            removed = self._shrink_disk(keep=key)
        for path in removed:     # outside the lock: unlinks are I/O
            _unlink(path)

    def _shrink_disk(self, keep: Key | None = None) -> list[Path]:
        """Forget disk files, deepest level first and LRU within a level, until the tier is
        within budget (lock held); returns their paths for the caller to unlink."""
        removed = []
        while self._disk.used > self._disk.budget:
            victim = self._disk.victim(keep)
            if victim is None:
                break
            self._forget_disk(victim)
            removed.append(self._path(victim))
        return removed

    def _forget_disk(self, key: Key) -> None:
        size = self._disk.levels.get(key[2], {}).pop(key, None)
        if size is not None:
            self._disk.used -= size
            self._level(key[2]).disk_bytes -= size


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
