"""CachedBank: a Bank plus what the device remembers about it: the manifest and the blocks.

    view = CachedBank(bank, "demo", cache=DeviceCache(256 << 20), manifest_ttl_s=5,
                      encoding="int8", check=model.check_compatible)
    got = view.fetch_path([3, 1], attached={1: ("demo", "v1", 3, "int8")})
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
Not thread-safe: one prompt at a time, as MemoryModel.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

from membank import quant
from membank.manifest import Manifest
from membank.signing import SignatureError, Trust
from services.model_client.bank import Bank, BankError, Block, UntrustedManifestError
from services.model_client.device_cache import DeviceCache

log = logging.getLogger("membank.client")

# what a level's room holds: (bank, block version, node, encoding); a version re-placed onto
# other shards keeps its block version (Manifest.block_version), so its blocks stay attached,
# and a dequantized int8 block is not the native one, hence the encoding
Attached = tuple[str, str, int, str]
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
    in_place: set[Block] = field(default_factory=set)     # received into the caller's `dest`
    fetched_bytes: int = 0


class CachedBank:
    def __init__(self, bank: Bank, bank_id: str, *, cache: DeviceCache | None = None,
                 manifest_ttl_s: float = 5.0, encoding: str = "",
                 check: Callable[[Manifest], None] | None = None, trust: Trust | None = None):
        """`bank_id`: the bank's name in its manifests. `cache`: None, none (only the attached
        levels are reused). `encoding`: "" / "native" or "int8" (membank/quant.py).
        `check(manifest)` is called for every manifest that differs from the last one (a
        ValueError there: the bank does not fit the model). `trust`: the pinned keys and
        whether unsigned manifests are allowed (None: no key pinned, nothing trusted)."""
        self.bank, self.bank_id, self.cache = bank, bank_id, cache
        self.trust = trust if trust is not None else Trust()
        self.manifest_ttl_s = manifest_ttl_s
        self.encoding = quant.normalize(encoding)
        self.check = check
        self._manifest: tuple[Manifest, float] | None = None     # (manifest, monotonic time)
        self._fallback_warned: set[tuple[str, str]] = set()     # (bank, version) logged once
        self._unsigned_warned: set[tuple[str, str]] = set()     # the same, allow_unsigned

    def manifest(self, *, refresh: bool = False) -> Manifest:
        """The bank's current manifest, read at most once per `manifest_ttl_s` (see the module
        docstring); `refresh`: read it now."""
        now = time.monotonic()
        cached = self._manifest
        if cached is not None and not refresh and now - cached[1] < self.manifest_ttl_s:
            return cached[0]
        try:
            manifest = self.bank.get_manifest(self.bank_id, version="")
            if cached is None or manifest != cached[0]:    # an equal one verified already
                self._verify(manifest)
        except BankError as e:
            if cached is None:
                raise
            log.warning("keeping manifest %s/%s: re-reading it failed: %s",
                        cached[0].bank, cached[0].version, e)
            self._manifest = (cached[0], now)
            return cached[0]
        if self.check is not None and (cached is None or manifest != cached[0]):
            self.check(manifest)
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
                   dest: Dest | None = None) -> PathBlocks:
        """The blocks of `path` whose level does not hold them already (`attached`: level ->
        what its room holds): the device cache's, then one fetch for the rest; BankError when
        the bank cannot give them, after one re-read of a stale manifest. `dest(manifest,
        block, encoding)`: where to receive a block to be fetched (a buffer or Scatter), or
        None; asked only without a device cache, right before the fetch."""
        attached = attached or {}
        refresh = bool(getattr(self.bank, "placement_mismatch", False))
        if refresh:
            self.bank.placement_mismatch = False
        manifest = self.manifest(refresh=refresh)
        try:
            return self._gather(manifest, path, attached, dest)
        except BankError as e:
            if e.code not in STALE:
                raise
            fresh = self.manifest(refresh=True)      # the version moved on: once more
            if fresh == manifest:
                raise
            return self._gather(fresh, path, attached, dest)

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
        self.bank.close()

    def _gather(self, manifest: Manifest, path: list[int], attached: Mapping[int, Attached],
                dest: Dest | None = None) -> PathBlocks:
        enc = self.encoding_for(manifest)
        out = PathBlocks(manifest, enc)
        need = [(lv, n) for lv, n in manifest.path_blocks(path)
                if attached.get(lv) != (manifest.bank, manifest.block_version, n, enc)]
        if self.cache is not None:
            for lv, n in need:
                buf = self.cache.get(manifest, lv, n, encoding=enc)
                if buf is not None:
                    out.blocks[(lv, n)] = buf
        out.cached = [b for b in need if b in out.blocks]
        out.fetched = [b for b in need if b not in out.blocks]
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
        return out
