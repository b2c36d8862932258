"""Readiness: the current manifest of every bank loads, and the hot set is warm.

At start the server pre-reads the shallow levels (`warm_levels`, default 1) of every bank's
current version through the block tiers (so they land in the page cache and any in-process
LRU), checksum-checking each block, up to `warm_max_gb`. Level-1 blocks are shared by every
prompt, so they are the hottest. `/readyz` is 503 until that is done, and again once a
graceful shutdown has begun. A warm-up that found corrupt blocks keeps it 503, naming them
(they would be DATA_LOSS for every prompt routed there: let the replicas serve instead).

    readiness = Readiness(store, blocks, levels=1, max_bytes=4 << 30)
    task = asyncio.create_task(readiness.warm())
    ok, detail = readiness.status()
"""
from __future__ import annotations

import asyncio
import logging
import time

from membank.blocks import checksum

log = logging.getLogger(__name__)


def list_banks(store) -> list[str]:
    """Banks with a published version: `store.banks()` if the store has it, else a scan of the
    `c/` keys of its LMDB environment."""
    fn = getattr(store, "banks", None)
    if callable(fn):
        return sorted(fn())
    env = getattr(store, "env", None)
    if env is None:
        return []
    out = []
    with env.begin() as txn:
        cursor = txn.cursor()
        if cursor.set_range(b"c/"):
            for key in cursor.iternext(keys=True, values=False):
                if not key.startswith(b"c/"):
                    break
                out.append(bytes(key[2:]).decode())
    return out


class Readiness:
    def __init__(self, store, blocks, *, levels: int = 1, max_bytes: int = 4 << 30):
        self.store, self.blocks = store, blocks
        self.levels, self.max_bytes = levels, max_bytes
        self.warmed = False
        self.draining = False
        self.report: dict = {"blocks": 0, "bytes": 0, "seconds": 0.0, "skipped": 0,
                             "corrupt": [], "stopped_at_budget": False}

    def current(self) -> dict[str, str | None]:
        """bank -> current version, for every published bank (blocking: LMDB reads)."""
        return {bank: self.store.current_version(bank) for bank in list_banks(self.store)}

    def status(self) -> tuple[bool, dict]:
        problems = []
        banks = {}
        try:
            for bank, version in self.current().items():
                banks[bank] = version
                if version is None or self.store.manifest(bank, version) is None:
                    problems.append(f"manifest of {bank}/{version} does not load")
        except Exception as e:   # a store that cannot even be read is not ready
            problems.append(f"store unreadable: {type(e).__name__}: {e}")
        if not banks:
            problems.append("no bank is published")
        if not self.warmed:
            problems.append("warming the hot set")
        corrupt = self.report["corrupt"]
        if corrupt:
            problems.append(f"warm-up found {len(corrupt)} corrupt block(s): "
                            f"{', '.join(corrupt[:8])}{' ...' if len(corrupt) > 8 else ''}")
        if self.draining:
            problems.append("shutting down")
        return not problems, {"ready": not problems, "problems": problems, "banks": banks,
                              "warm": self.report}

    async def warm(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            if self.levels > 0:
                for bank, version in (await loop.run_in_executor(None, self.current)).items():
                    if not await self._warm_bank(loop, bank, version):
                        break
        except Exception:   # warming is an optimisation: never keep a server unready over it
            log.exception("warming the hot set failed; serving cold")
        finally:
            self.report["seconds"] = round(time.perf_counter() - t0, 3)
            self.warmed = True
        r = self.report
        log.info("hot set warm: %d blocks, %.1f MB in %.2f s%s", r["blocks"], r["bytes"] / 1e6,
                 r["seconds"], " (budget reached)" if r["stopped_at_budget"] else "")
        if r["corrupt"]:
            log.error("warm-up found %d corrupt block(s): not ready", len(r["corrupt"]))

    async def _warm_bank(self, loop, bank: str, version: str | None) -> bool:
        manifest = None if version is None else self.store.manifest(bank, version)
        if manifest is None:
            return True
        for level in range(1, min(self.levels, manifest.depth) + 1):
            if manifest.ranks[level - 1] == 0:
                continue
            nbytes = manifest.block_nbytes(level)
            for node in range(manifest.n_nodes(level)):
                if self.report["bytes"] + nbytes > self.max_bytes:
                    self.report["stopped_at_budget"] = True
                    return False
                ok = await loop.run_in_executor(None, self._read_one, manifest, level, node)
                if ok is None:
                    self.report["skipped"] += 1   # not held here (another shard's block)
                    continue
                self.report["blocks"] += 1
                self.report["bytes"] += nbytes
                if not ok:
                    where = f"{bank}/{manifest.version} ({level}, {node})"
                    self.report["corrupt"].append(where)
                    log.error("warm: block %s fails its manifest checksum", where)
        return True

    def _read_one(self, manifest, level: int, node: int) -> bool | None:
        """Read one block through the tiers (no copy where the tier allows): None when it is
        not held here, else whether it matches its manifest checksum."""
        key = manifest.storage_key(level, node)
        nbytes, want = manifest.block_nbytes(level), manifest.checksum(level, node)
        try:
            from services.bank_server.store import CorruptBlock, Expect, read_from
        except ImportError:   # a store without tiered reads
            data = self.blocks.get(key)
            return None if data is None else len(data) == nbytes and checksum(data) == want
        try:
            with read_from(self.blocks, key, Expect(nbytes, want)) as buf:
                return None if buf is None else True
        except CorruptBlock:
            return False
