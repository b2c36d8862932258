"""Block fetches that run in the background: a prefetch started while the user types, and the
levels a time-to-first-token budget left behind. A later prompt joins them instead of asking
the bank again.

    inflight = InFlight(bank, cache=DeviceCache(256 << 20), hold_bytes=64 << 20)
    futures = inflight.start(manifest, [(1, 3), (2, 13)], encoding="")   # {block: Future}
    inflight.take(manifest, (1, 3), "")      # its verified bytes once done (None before), or
    inflight.running(manifest, (2, 13), "")  # the Future still moving them

One fetch per block, on `workers` threads (a path's levels at once), shallow blocks first (the
order `start` is given):
a block arrives whole and verified (the Bank checks it against the manifest), or its Future
raises the BankError. Verified bytes go to the device cache when there is one (keyed by content,
so any prompt of any version listing the same hash finds them); without one they are held here,
at most `hold_bytes` (oldest dropped first), until a prompt takes them. Nothing unverified is
ever held, and a block held here is used only by a manifest listing the same content id.
Blocks are keyed as the device cache keys them (device_cache.block_key): by bank and content.
Thread-safe: the HTTP server's prefetch requests run beside its generations.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from membank.manifest import Manifest
from services.model_client.bank import Bank, Block
from services.model_client.device_cache import DeviceCache, Key, block_key

log = logging.getLogger("membank.client")


class InFlight:
    def __init__(self, bank: Bank, *, cache: DeviceCache | None = None,
                 hold_bytes: int = 64 << 20, workers: int = 4):
        self.bank, self.cache, self.hold_bytes = bank, cache, hold_bytes
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="membank-fetch")
        self._lock = threading.Lock()
        self._running: dict[Key, Future] = {}
        self._speculative: set[Key] = set()     # started by a prefetch: may be dropped
        self._held: OrderedDict[Key, bytearray] = OrderedDict()   # oldest first
        self._held_bytes = 0
        self.started = self.joined = 0        # blocks fetched in the background / taken later

    def start(self, manifest: Manifest, blocks: list[Block], encoding: str, *,
              speculative: bool = False) -> dict[Block, Future]:
        """A Future per block, fetching it unless it is running already (then that one) or
        held here (then a done Future with it, taken). `speculative` (a prefetch): a prompt
        that needs other blocks drops these while they still wait for a worker (`prefer`)."""
        out = {}
        with self._lock:
            for b in blocks:
                key = block_key(manifest, *b, encoding)
                held = self._held.pop(key, None)
                if held is not None:          # finished since the caller last looked
                    self._held_bytes -= len(held)
                    self.joined += 1
                    out[b] = fut = Future()
                    fut.set_result(held)
                    continue
                fut = self._running.get(key)
                if fut is None:
                    fut = self._pool.submit(self._fetch, manifest, b, encoding, key)
                    self._running[key] = fut
                    self.started += 1
                    if speculative:
                        self._speculative.add(key)
                else:
                    self._speculative.discard(key)    # wanted for sure now
                if not speculative:
                    self._speculative.discard(key)
                out[b] = fut
        return out

    def prefer(self, manifest: Manifest, blocks: list[Block], encoding: str) -> int:
        """A prompt needs `blocks` now: drop the prefetches of other blocks that have not
        started (a guess the typing overtook must not hold the workers); returns how many."""
        keep = {block_key(manifest, *b, encoding) for b in blocks}
        dropped = 0
        with self._lock:
            for key in list(self._speculative - keep):
                fut = self._running.get(key)
                if fut is not None and fut.cancel():
                    self._running.pop(key, None)
                    dropped += 1
                self._speculative.discard(key)
        return dropped

    def running(self, manifest: Manifest, block: Block, encoding: str) -> Future | None:
        with self._lock:
            return self._running.get(block_key(manifest, *block, encoding))

    def has(self, manifest: Manifest, block: Block, encoding: str) -> bool:
        """Whether the block is on its way or held here."""
        key = block_key(manifest, *block, encoding)
        with self._lock:
            return key in self._running or key in self._held

    def take(self, manifest: Manifest, block: Block, encoding: str) -> bytearray | None:
        """A block fetched in the background and held here (no device cache), removed."""
        key = block_key(manifest, *block, encoding)
        with self._lock:
            buf = self._held.pop(key, None)
            if buf is not None:
                self._held_bytes -= len(buf)
                self.joined += 1
            return buf

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _fetch(self, manifest: Manifest, block: Block, encoding: str, key: Key) -> bytearray:
        try:
            extra = {"encoding": encoding} if encoding else {}
            buf = self.bank.fetch(manifest.bank, manifest.version, [block], manifest,
                                  **extra)[block]
            if self.cache is not None:
                self.cache.put(manifest, *block, buf, verified=True, encoding=encoding)
            else:
                self._hold(key, buf)
            return buf
        except Exception as e:       # the Future carries it; a prompt that joins sees it
            log.info("background fetch of block %s failed: %s", block, e)
            raise
        finally:
            with self._lock:
                self._running.pop(key, None)
                self._speculative.discard(key)

    def _hold(self, key: Key, buf: bytearray) -> None:
        if len(buf) > self.hold_bytes:
            return
        with self._lock:
            old = self._held.pop(key, None)
            if old is not None:
                self._held_bytes -= len(old)
            self._held[key] = buf
            self._held_bytes += len(buf)
            while self._held_bytes > self.hold_bytes:
                _, gone = self._held.popitem(last=False)
                self._held_bytes -= len(gone)
