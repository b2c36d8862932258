"""CachedBank: a Bank plus what the device remembers about it: the manifest and the blocks.

    view = CachedBank(bank, "demo", cache=DeviceCache(256 << 20), manifest_ttl_s=5,
                      encoding="int8", check=model.check_compatible)
    got = view.fetch_path([3, 1], attached={1: ("demo", "blake3-9f2c...")})
    got.blocks          # {(level, node): verified bytes} of the levels not attached already
    got.cached, got.fetched, got.fetched_bytes, got.encoding, got.manifest

MemoryModel keeps one per bank it is given and asks it for a path's blocks; everything between
"these levels" and "these verified bytes" is here:

- The manifest is read at most once per `manifest_ttl_s`: it changes only when a version is
  published, and a GetManifest per prompt is a round trip (80 ms on a slow link) before any
  block can be asked for. Staleness is bounded two ways: the TTL, and a re-read at once when a
  fetch says the version is gone (NOT_FOUND, e.g. garbage-collected) or a shard says it does
  not own a block (FAILED_PRECONDITION, or a ShardedFetcher's `placement_mismatch` after it
  failed over: re-placed). When the re-read itself fails, the last manifest is kept (its blocks
  may be in the device cache: an offline device keeps its memory) and the next re-read waits
  another TTL, so a down bank costs one failed call per TTL.
- Trust (issue 16, membank/signing.py): every manifest read is checked against the device's
  `Trust` (pinned public keys, `allow_unsigned`) before anything of it is used; an unsigned,
  mis-signed or unpinned manifest raises UntrustedManifestError (UNAUTHENTICATED, with the
  reason), or, when a trusted manifest was read before, is logged and the trusted one kept.
  The transports then check every block against the digests of that trusted manifest.
- The device cache (device_cache.py) is asked before the bank, and holds what the bank sent.
- In place: without a device cache, `fetch_path(..., dest=)` lets the caller name where each
  fetched block goes (MemoryModel: its slice of the room, a bank.Scatter), so the bank receives
  it there and nothing is copied afterwards (`PathBlocks.in_place`). With a cache the bytes go
  to the cache and are copied into the room, as the cache must own them.
- The encoding: the one asked for, or native when the version was ingested without it (logged
  once per version; a fleet keeps its memory, at full precision, rather than decoding
  anchor-only because a publish forgot int8).
One prompt at a time, as MemoryModel; a `prefetch` may run beside it (the manifest is read
under a lock, background fetches are InFlight's, which is thread-safe, and so is the cache).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import wait
from dataclasses import dataclass, field
from typing import Callable, Mapping

from membank import quant
from membank.manifest import Manifest
from membank.signing import SignatureError, Trust
from services.model_client.bank import (
    Bank,
    BankError,
    Block,
    IncompatibleBankError,
    UntrustedManifestError,
)
from services.model_client.device_cache import DeviceCache, block_key
from services.model_client.inflight import InFlight

log = logging.getLogger("membank.client")

# what a level's room holds: (bank, content id of the block in the encoding attached,
# Manifest.content_id). By content, not by version: a new version (or a re-placed one) that
# leaves a level's block unchanged keeps it attached, nothing fetched or copied
Attached = tuple[str, str]
# where the caller wants a block received: (manifest, block, encoding) -> buffer / Scatter / None
Dest = Callable[[Manifest, Block, str], object]
STALE = ("NOT_FOUND", "FAILED_PRECONDITION")      # the manifest may be older than the bank's


@dataclass
class PathBlocks:
    """The verified blocks of one path that were not attached, and where each came from."""
    manifest: Manifest                 # the version they belong to
    encoding: str                      # "" (native) or "int8": what the bytes are
    blocks: dict[Block, bytearray] = field(default_factory=dict)
    cached: list[Block] = field(default_factory=list)     # from the device cache
    fetched: list[Block] = field(default_factory=list)    # from the bank
    # fetched in the background (a prefetch, or a deadline's leftovers), joined by this prompt
    prefetched: list[Block] = field(default_factory=list)
    # not verified by the deadline (deadline mode only): still fetching, for the next prompt
    pending: list[Block] = field(default_factory=list)
    in_place: set[Block] = field(default_factory=set)     # received into the caller's `dest`
    fetched_bytes: int = 0


class CachedBank:
    def __init__(self, bank: Bank, bank_id: str, *, cache: DeviceCache | None = None,
                 manifest_ttl_s: float = 5.0, encoding: str = "",
                 check: Callable[[Manifest], None] | None = None, trust: Trust | None = None,
                 hold_bytes: int = 64 << 20):
        """`bank_id`: the bank's name in its manifests. `cache`: None, none (only the attached
        levels are reused). `encoding`: "" / "native" or "int8" (membank/quant.py).
        `check(manifest)` is called for every manifest that differs from the last one (a
        ValueError there: the bank does not fit the model, IncompatibleBankError; a compatible
        manifest read before is kept, as for an untrusted one). `trust`: the pinned keys and
        whether unsigned manifests are allowed (None: no key pinned, nothing trusted)."""
        self.bank, self.bank_id, self.cache = bank, bank_id, cache
        self.trust = trust if trust is not None else Trust()
        self.manifest_ttl_s = manifest_ttl_s
        self.encoding = quant.normalize(encoding)
        self.check = check
        self._manifest: tuple[Manifest, float] | None = None     # (manifest, monotonic time)
        self._manifest_lock = threading.Lock()    # a prefetch may read it beside a prompt
        # background fetches (prefetch, deadlines); without a device cache they hold at most
        # `hold_bytes` of verified blocks until a prompt takes them
        self.inflight = InFlight(bank, cache=cache, hold_bytes=hold_bytes)
        self._fallback_warned: set[tuple[str, str]] = set()     # (bank, version) logged once
        self._unsigned_warned: set[tuple[str, str]] = set()     # the same, allow_unsigned

    def manifest(self, *, refresh: bool = False) -> Manifest:
        """The bank's current manifest, read at most once per `manifest_ttl_s` (see the module
        docstring); `refresh`: read it now."""
        with self._manifest_lock:
            return self._read_manifest(refresh)

    def _read_manifest(self, refresh: bool) -> Manifest:
        now = time.monotonic()
        cached = self._manifest
        if cached is not None and not refresh and now - cached[1] < self.manifest_ttl_s:
            return cached[0]
        try:
            manifest = self.bank.get_manifest(self.bank_id, version="")
            if cached is None or manifest != cached[0]:    # an equal one verified already
                self._verify(manifest)
                if self.check is not None:
                    try:
                        self.check(manifest)
                    except ValueError as e:
                        raise IncompatibleBankError(str(e)) from None
        except BankError as e:
            if cached is None:
                raise
            log.warning("keeping manifest %s/%s: re-reading it failed: %s",
                        cached[0].bank, cached[0].version, e)
            self._manifest = (cached[0], now)
            return cached[0]
        self._manifest = (manifest, now)
        return manifest

    def _verify(self, manifest: Manifest) -> None:
        try:
            signed = self.trust.check(manifest)
        except SignatureError as e:
            raise UntrustedManifestError(str(e)) from None
        if not signed and (manifest.bank, manifest.version) not in self._unsigned_warned:
            self._unsigned_warned.add((manifest.bank, manifest.version))
            log.warning("using the UNSIGNED manifest %s/%s (allow_unsigned is on)",
                        manifest.bank, manifest.version)

    def fetch_path(self, path: list[int], attached: Mapping[int, Attached] | None = None,
                   dest: Dest | None = None, deadline: float | None = None) -> PathBlocks:
        """The blocks of `path` whose level does not hold them already (`attached`: level ->
        what its room holds): the device cache's, those a background fetch brought, then one
        fetch for the rest; BankError when the bank cannot give them, after one re-read of a
        stale manifest. `dest(manifest, block, encoding)`: where to receive a block to be
        fetched (a buffer or Scatter), or None; asked only without a device cache, right before
        the fetch.

        `deadline` (time.monotonic()): the rest is fetched in the background, one block per
        request, and what is verified by the deadline is returned; the others are `pending`
        and keep coming, for the next prompt (a block that failed raises its BankError)."""
        attached = attached or {}
        refresh = bool(getattr(self.bank, "placement_mismatch", False))
        if refresh:
            self.bank.placement_mismatch = False
        manifest = self.manifest(refresh=refresh)
        try:
            return self._gather(manifest, path, attached, dest, deadline)
        except BankError as e:
            if e.code not in STALE:
                raise
            fresh = self.manifest(refresh=True)      # the version moved on: once more
            if fresh == manifest:
                raise
            return self._gather(fresh, path, attached, dest, deadline)

    def prefetch(self, path: list[int], attached: Mapping[int, Attached] | None = None,
                 max_bytes: int | None = None) -> "Prefetch":
        """Start fetching `path`'s blocks that are neither attached nor cached nor on their
        way, shallow levels first, within `max_bytes` (None: all); returns at once."""
        manifest = self.manifest()
        enc = self.encoding_for(manifest)
        out = Prefetch(manifest.version, quant.label(enc))
        budget = max_bytes if max_bytes is not None else float("inf")
        for lv, n in manifest.path_blocks(path):
            if (attached or {}).get(lv) == (manifest.bank, manifest.content_id(lv, n, enc)):
                out.attached.append((lv, n))
            elif self.cache is not None and block_key(manifest, lv, n, enc) in self.cache \
                    or self.inflight.has(manifest, (lv, n), enc):
                out.ready.append((lv, n))          # cached, held, or fetching already
            elif manifest.block_nbytes(lv, enc) <= budget:
                budget -= manifest.block_nbytes(lv, enc)
                out.started.append((lv, n))
                out.started_bytes += manifest.block_nbytes(lv, enc)
            else:
                out.over_budget.append((lv, n))
        self.inflight.start(manifest, out.started, enc, speculative=True)
        return out

    def encoding_for(self, manifest: Manifest) -> str:
        """The encoding to fetch from this version: ours, or native when it lacks it."""
        if manifest.has_encoding(self.encoding):
            return self.encoding
        if (manifest.bank, manifest.version) not in self._fallback_warned:
            self._fallback_warned.add((manifest.bank, manifest.version))
            log.warning("fetching native blocks instead: %s",
                        manifest.missing_encoding(self.encoding))
        return quant.NATIVE

    def close(self) -> None:
        self.inflight.close()
        self.bank.close()

    def _gather(self, manifest: Manifest, path: list[int], attached: Mapping[int, Attached],
                dest: Dest | None = None, deadline: float | None = None) -> PathBlocks:
        enc = self.encoding_for(manifest)
        out = PathBlocks(manifest, enc)
        need = [(lv, n) for lv, n in manifest.path_blocks(path)
                if attached.get(lv) != (manifest.bank, manifest.content_id(lv, n, enc))]
        self.inflight.prefer(manifest, need, enc)    # stale guesses give way to this prompt
        if self.cache is not None:
            for lv, n in need:
                buf = self.cache.get(manifest, lv, n, encoding=enc)
                if buf is not None:
                    out.blocks[(lv, n)] = buf
        out.cached = [b for b in need if b in out.blocks]
        for b in need:                 # brought by a background fetch, held for a prompt
            if b not in out.blocks and (buf := self.inflight.take(manifest, b, enc)) is not None:
                out.blocks[b] = buf
                out.prefetched.append(b)
        rest = [b for b in need if b not in out.blocks]
        # on their way already: join them rather than ask again (or, with a deadline, start
        # every missing block so and wait for what arrives in time)
        if deadline is not None:
            joining = self.inflight.start(manifest, rest, enc)
        else:
            joining = {b: f for b in rest if (f := self.inflight.running(manifest, b, enc))}
            for b in rest:            # finished between `take` and `running`: held now
                if b not in joining and (buf := self.inflight.take(manifest, b, enc)) is not None:
                    out.blocks[b] = buf
                    out.prefetched.append(b)
            rest = [b for b in rest if b not in out.blocks]
        out.fetched = [b for b in rest if b not in joining]
        # `encoding` only when not native, so banks without encodings (fakes, other transports)
        # keep working for native blocks
        extra: dict = {"encoding": enc} if enc else {}
        if dest is not None and self.cache is None and out.fetched:
            into = {b: d for b in out.fetched if (d := dest(manifest, b, enc)) is not None}
            if into:
                extra["out"] = into
                out.in_place = set(into)
        fetched = self.bank.fetch(manifest.bank, manifest.version, out.fetched, manifest,
                                  **extra) if out.fetched else {}
        if self.cache is not None:
            for (lv, n), buf in fetched.items():
                # the client verified it (against the checksum of that encoding)
                self.cache.put(manifest, lv, n, buf, verified=True, encoding=enc)
        out.fetched_bytes = sum(len(b) for b in fetched.values())
        out.blocks.update(fetched)
        if joining:
            timeout = (None if deadline is None else
                       min(max(0.0, deadline - time.monotonic()), threading.TIMEOUT_MAX))
            done, _ = wait(list(joining.values()), timeout=timeout)
            for b, fut in joining.items():
                if fut not in done:
                    out.pending.append(b)
                    continue
                out.blocks[b] = fut.result()          # raises the BankError it met
                self.inflight.take(manifest, b, enc)  # its held copy, if any: used now
                (out.prefetched if deadline is None else out.fetched).append(b)
                if deadline is not None:
                    out.fetched_bytes += len(out.blocks[b])
        return out


@dataclass
class Prefetch:
    """What `CachedBank.prefetch` found and started for a path."""
    version: str
    encoding: str
    attached: list[Block] = field(default_factory=list)     # in the room already
    ready: list[Block] = field(default_factory=list)        # cached, or already on their way
    started: list[Block] = field(default_factory=list)      # fetching now, in the background
    over_budget: list[Block] = field(default_factory=list)  # left out: beyond max_bytes
    started_bytes: int = 0
