"""MemoryModel.fetch_path (its CachedBank, services/model_client/cached_bank.py): manifest read
once per TTL, re-read when the version is gone, kept when the bank is down (cached blocks still
used), and only missing levels fetched; without a device cache blocks land in the room in place
(bank.Scatter), a block failing verification there is never attached, and a room of another
dtype gets them converted.

A fake bank (no sockets); the model is the random-weight `tiny` export (tests/conftest.py).
Run: .venv/bin/python -m pytest -q tests/unit/test_memory_model_fetch.py
"""
import pytest
import torch

from membank.artifacts import iter_blocks, load_manifest
from services.model_client.bank_client import BankError, BlockIntegrityError
from services.model_client.device_cache import DeviceCache
from services.model_client.memory_model import GenerateResult, MemoryModel
from testkit.keys import trust
from tests.conftest import ConstantEmbedder


class FakeBank:
    """Serves `manifest` (the published version) and the export's blocks for it only."""

    def __init__(self, manifest, blocks):
        self.manifest, self.blocks = manifest, blocks
        self.down = False
        self.manifest_reads, self.fetches = 0, []

    def get_manifest(self, bank, version=""):
        self.manifest_reads += 1
        if self.down:
            raise BankError("UNAVAILABLE", "down")
        return self.manifest

    def fetch(self, bank, version, blocks, manifest):
        if self.down:
            raise BankError("UNAVAILABLE", "down")
        if version != self.manifest.version:
            raise BankError("NOT_FOUND", f"unknown version {version!r}")
        self.fetches.append(list(blocks))
        return {b: bytearray(self.blocks[b]) for b in blocks}


@pytest.fixture
def setup(tiny_model_export):
    m = load_manifest(tiny_model_export)
    blocks = {(l, n): d for l, n, d in iter_blocks(tiny_model_export, m)}
    # the fake bank serves the export's unsigned manifest: trust is tests/unit/test_signing.py's
    model = MemoryModel.from_pretrained(tiny_model_export, embedder=ConstantEmbedder(),
                                        cache=DeviceCache(1 << 20), manifest_ttl_s=3600,
                                        trust=trust(allow_unsigned=True))
    return model, FakeBank(m, blocks), m


def fetch(model, bank, path):
    r = GenerateResult(prompt="p", text="", memory=False)
    model.fetch_path(bank, path, r)
    return r


def test_manifest_read_once_per_ttl_and_only_changed_levels_fetched(setup):
    model, bank, m = setup
    assert fetch(model, bank, [0, 1]).fetched_blocks == m.path_blocks([0, 1])
    r = fetch(model, bank, [0, 0])              # same level-1 node: only level 2 changes
    assert r.fetched_blocks == [m.path_blocks([0, 0])[1]] and r.cached_blocks == []
    r = fetch(model, bank, [0, 1])              # level 2 back to a block the cache holds
    assert r.fetched_blocks == [] and r.cached_blocks == [m.path_blocks([0, 1])[1]]
    assert bank.manifest_reads == 1
    model.bank_view(bank).manifest_ttl_s = 0    # expired: re-read before the next prompt
    fetch(model, bank, [0, 1])
    assert bank.manifest_reads == 2


def test_a_version_gone_from_the_bank_makes_the_model_reread_the_manifest(setup):
    model, bank, m = setup
    fetch(model, bank, [1, 1])
    bank.manifest = m.model_copy(update={"version": "v2"})   # published; v1 collected
    r = fetch(model, bank, [1, 0])              # v1 fetch -> NOT_FOUND -> re-read -> v2
    # level 1's block is v2's too (same content): it stays attached; level 2 is fetched
    assert r.fetched_blocks == m.path_blocks([1, 0])[1:] and bank.manifest_reads == 2
    assert r.version == "v2" and r.level_versions == ["v2", "v2"]
    assert set(model.attached.values()) == {("test", m.content_id(*b))
                                            for b in m.path_blocks([1, 0])}


def test_a_publish_that_changed_one_block_costs_that_block_only(tiny_model_export, setup):
    """Delta publishing on the device: blocks are attached and cached by content, so after a
    publish only the blocks whose bytes changed are fetched again."""
    model, bank, m = setup
    for path in ([1, 1], [0, 2]):               # warm: the cache holds both paths
        fetch(model, bank, path)
    changed = m.path_blocks([1, 1])[1]          # continued training touched one block
    new = bytearray(bank.blocks[changed])
    new[:4] = bytes(4)
    from membank.blocks import checksum
    sums = [list(level) for level in m.checksums]
    sums[changed[0] - 1][changed[1]] = checksum(new)
    bank.manifest = m.model_copy(update={"version": "v2", "checksums": sums})
    bank.blocks = {**bank.blocks, changed: bytes(new)}
    model.bank_view(bank).manifest_ttl_s = 0
    r = fetch(model, bank, [0, 2])              # nothing of this path changed
    assert (r.version, r.fetched_blocks, r.fetched_bytes) == ("v2", [], 0)
    r = fetch(model, bank, [1, 1])
    assert r.fetched_blocks == [changed] and r.fetched_bytes == len(new)
    assert r.cached_blocks == [m.path_blocks([1, 1])[0]] and r.level_versions == ["v2", "v2"]


def test_a_down_bank_keeps_the_manifest_and_the_cached_blocks(setup):
    model, bank, m = setup
    fetch(model, bank, [1, 1])
    fetch(model, bank, [0, 0])
    bank.down = True
    model.bank_view(bank).manifest_ttl_s = 0
    r = fetch(model, bank, [1, 1])              # all from the device cache, manifest kept
    assert r.fetched_blocks == [] and r.cached_blocks == m.path_blocks([1, 1])
    with pytest.raises(BankError):              # a block it never saw: the fetch fails
        fetch(model, bank, [1, 0])
    assert model.attached[2] == ("test", m.content_id(*m.path_blocks([1, 1])[1]))   # untouched


class InPlaceBank(FakeBank):
    """FakeBank that receives into the caller's `out` destinations, as the real clients do;
    `corrupt`: write garbage there, then fail verification."""

    def __init__(self, manifest, blocks):
        super().__init__(manifest, blocks)
        self.corrupt, self.outs = False, []

    def fetch(self, bank, version, blocks, manifest, *, out=None):
        got = super().fetch(bank, version, blocks, manifest)
        self.outs.append(dict(out or {}))
        for b, dest in (out or {}).items():
            dest.write(0, bytes(len(got[b])) if self.corrupt else got[b])
            got[b] = dest
        if self.corrupt:
            raise BlockIntegrityError(f"block {blocks[0]} fails its manifest hash")
        return got


def room_of(model, m, path):
    """The room's slices of `path`'s levels, as the blocks' bytes."""
    parts = []
    for level, _ in m.path_blocks(path):
        off, r = model.offsets[level - 1], m.ranks[level - 1]
        parts.append(model.mem[0, :, :, off:off + r].contiguous().view(torch.uint8).numpy()
                     .tobytes())
    return parts


def plain_model(export, **kw):
    return MemoryModel.from_pretrained(export, embedder=ConstantEmbedder(), manifest_ttl_s=3600,
                                       trust=trust(allow_unsigned=True), **kw)


def test_without_a_cache_blocks_are_received_into_the_room_in_place(tiny_model_export, setup):
    copied, _, m = setup                          # with a device cache: received, then copied
    blocks = {(l, n): d for l, n, d in iter_blocks(tiny_model_export, m)}
    bank = InPlaceBank(m, blocks)
    model = plain_model(tiny_model_export)
    for path in ([1, 1], [1, 0], [0, 2]):
        r = fetch(model, bank, path)
        fetch(copied, FakeBank(m, blocks), path)
        assert r.fetched_blocks and set(bank.outs[-1]) == set(r.fetched_blocks)
        assert room_of(model, m, path) == [blocks[b] for b in m.path_blocks(path)]
        assert torch.equal(model.mem, copied.mem)
    assert model.attached == copied.attached


def test_a_block_that_fails_verification_in_place_is_never_attached(tiny_model_export):
    m = load_manifest(tiny_model_export)
    blocks = {(l, n): d for l, n, d in iter_blocks(tiny_model_export, m)}
    bank = InPlaceBank(m, blocks)
    model = plain_model(tiny_model_export, bank=bank)
    fetch(model, bank, [1, 1])
    bank.corrupt = True
    r = model.generate("p", max_new_tokens=1)          # ConstantEmbedder: routes to one path
    assert not r.memory and r.anchor_only_reason.startswith("block failed verification")
    changed = bank.outs[-1]
    assert changed and not {lv for lv, _ in changed} & set(model.attached)   # detached
    bank.corrupt = False
    r = model.generate("p", max_new_tokens=1)
    assert r.memory and set(r.fetched_blocks) == set(changed)              # fetched again
    assert room_of(model, m, r.path) == [blocks[b] for b in m.path_blocks(r.path)]


def test_a_room_of_another_dtype_gets_blocks_converted_not_in_place(tiny_model_export):
    m = load_manifest(tiny_model_export)
    assert m.dtype == "float32"
    blocks = {(l, n): d for l, n, d in iter_blocks(tiny_model_export, m)}
    bank = InPlaceBank(m, blocks)
    model = plain_model(tiny_model_export, dtype="bfloat16")
    assert model.mem.dtype == torch.bfloat16
    fetch(model, bank, [1, 1])
    assert bank.outs[-1] == {}                          # no destination offered
    for level, node in m.path_blocks([1, 1]):
        off, r = model.offsets[level - 1], m.ranks[level - 1]
        want = torch.frombuffer(bytearray(blocks[(level, node)]), dtype=torch.float32)
        assert torch.equal(model.mem[0, :, :, off:off + r].reshape(-1),
                           want.to(torch.bfloat16))
    r = model.generate("The atomic number of", bank=bank, max_new_tokens=3)
    assert r.memory and r.new_tokens > 0               # a bfloat16 model decodes


def test_an_unknown_dtype_is_one_clear_error(tiny_model_export):
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, not 'float16'"):
        plain_model(tiny_model_export, dtype="float16")


def test_a_bank_trained_with_another_anchor_is_refused(tiny_model_export, setup):
    """The manifest names the anchor its blocks were trained with (export writes it); a device
    running another anchor decodes anchor-only, saying why, and keeps a compatible manifest it
    read before."""
    from membank import artifacts
    model, bank, m = setup
    assert m.anchor == artifacts.anchor_id(tiny_model_export) == model.anchor
    fetch(model, bank, [1, 1])
    other = "blake3-" + "0" * 64
    bank.manifest = m.model_copy(update={"version": "v2", "anchor": other})
    model.bank_view(bank).manifest_ttl_s = 0
    r = fetch(model, bank, [1, 1])             # v2 refused, v1 kept: its blocks still attached
    assert r.version == "v1" and r.fetched_blocks == []
    fresh = MemoryModel.from_pretrained(tiny_model_export, embedder=ConstantEmbedder(),
                                        bank=bank, trust=trust(allow_unsigned=True))
    r = fresh.generate("p", max_new_tokens=1)
    assert not r.memory and r.anchor_only_reason.startswith("bank does not fit this model")
    assert "trained with anchor blake3-0000" in r.anchor_only_reason


# -- deadline-aware attach and prefetch (issue 18) ---------------------------------------------
class SlowBank(FakeBank):
    """FakeBank whose blocks take `delay_s[level]` to arrive (each request, per block)."""

    def __init__(self, manifest, blocks, delay_s):
        super().__init__(manifest, blocks)
        self.delay_s = delay_s

    def fetch(self, bank, version, blocks, manifest):
        import time
        time.sleep(max(self.delay_s.get(level, 0.0) for level, _ in blocks))
        return super().fetch(bank, version, blocks, manifest)


def wait_idle(model, bank, timeout_s=10.0):
    import time
    view, end = model.bank_view(bank), time.monotonic() + timeout_s
    while view.inflight._running and time.monotonic() < end:
        time.sleep(0.01)
    assert not view.inflight._running


def test_a_ttft_budget_attaches_the_levels_verified_in_time(tiny_model_export):
    m = load_manifest(tiny_model_export)
    blocks = {(l, n): d for l, n, d in iter_blocks(tiny_model_export, m)}
    bank = SlowBank(m, blocks, {1: 0.0, 2: 0.8})
    model = plain_model(tiny_model_export, bank=bank)     # no device cache
    r = model.generate("p", max_new_tokens=2, ttft_budget_ms=300)
    (l1, n1), (l2, n2) = m.path_blocks(r.path)
    assert r.memory and r.levels_attached == [1] and r.levels_pending == [2]
    assert r.fetched_blocks == [(l1, n1)] and r.level_versions == ["v1"]
    assert r.timings_ms["ttft"] < 700                     # did not wait for level 2
    # the answer was decoded with level 1's neurons only: the evaluation's partial path
    part = model.partial_memory([1])
    assert part.shape[3] == m.ranks[0] and part.data_ptr() == model.mem.data_ptr()
    anchor_l1 = model.decode("p", part, 2)
    assert model.tokenizer.decode(anchor_l1) == r.text
    wait_idle(model, bank)
    r2 = model.generate("p", max_new_tokens=2, ttft_budget_ms=300)   # level 2 arrived meanwhile
    assert r2.levels_attached == [1, 2] and r2.levels_pending == []
    assert r2.prefetched_blocks == [(l2, n2)] and r2.fetched_blocks == []
    assert len(bank.fetches) == 2                         # level 2 was fetched once


def test_a_budget_no_level_meets_decodes_anchor_only_and_says_so(tiny_model_export):
    m = load_manifest(tiny_model_export)
    blocks = {(l, n): d for l, n, d in iter_blocks(tiny_model_export, m)}
    bank = SlowBank(m, blocks, {1: 0.5, 2: 0.5})
    model = plain_model(tiny_model_export, bank=bank)
    r = model.generate("p", max_new_tokens=1, ttft_budget_ms=0)
    assert not r.memory and r.levels_pending == [1, 2]
    assert r.anchor_only_reason.startswith("no level verified within the TTFT budget")
    for bad in (-1, float("inf"), float("nan"), 1e13):      # 1e13 ms overflows a wait
        with pytest.raises(ValueError, match="ttft_budget_ms"):
            model.generate("p", ttft_budget_ms=bad)


def test_partial_memory_of_any_levels():
    import types
    model = types.SimpleNamespace(mem=torch.arange(2 * 7, dtype=torch.float32)
                                  .reshape(1, 1, 1, 7, 2), offsets=[0, 4],
                                  config=types.SimpleNamespace(
                                      memory=types.SimpleNamespace(ranks=(4, 3))))
    full = MemoryModel.partial_memory(model, [1, 2])
    assert torch.equal(full, model.mem)
    assert torch.equal(MemoryModel.partial_memory(model, [2]), model.mem[:, :, :, 4:7])
    assert MemoryModel.partial_memory(model, [1]).shape[3] == 4


@pytest.mark.parametrize("with_cache", [False, True])
def test_prefetch_warms_the_path_within_its_byte_budget(tiny_model_export, with_cache):
    m = load_manifest(tiny_model_export)
    blocks = {(l, n): d for l, n, d in iter_blocks(tiny_model_export, m)}
    bank = FakeBank(m, blocks)
    kw = {"cache": DeviceCache(1 << 20)} if with_cache else {}
    model = plain_model(tiny_model_export, bank=bank, **kw)
    p = model.prefetch("p", max_bytes=m.block_nbytes(1))          # room for level 1 only
    (b1, b2) = m.path_blocks(p.path)
    assert (p.started, p.over_budget, p.started_bytes) == ([b1], [b2], m.block_nbytes(1))
    wait_idle(model, bank)
    again = model.prefetch("p")                                   # the rest: level 2
    assert again.ready == [b1] and again.started == [b2]
    wait_idle(model, bank)
    r = model.generate("p", max_new_tokens=1)
    assert r.memory and r.fetched_blocks == [] and r.fetched_bytes == 0
    got = r.cached_blocks if with_cache else r.prefetched_blocks
    assert got == [b1, b2] and len(bank.fetches) == 2
    assert model.prefetch("p").attached == [b1, b2]               # nothing left to fetch
    with pytest.raises(ValueError, match="empty prompt"):
        model.prefetch("  ")


def test_a_prompt_drops_queued_prefetches_of_other_blocks(tiny_model_export):
    m = load_manifest(tiny_model_export)
    blocks = {(l, n): d for l, n, d in iter_blocks(tiny_model_export, m)}
    bank = SlowBank(m, blocks, {1: 0.3, 2: 0.3})
    model = plain_model(tiny_model_export, bank=bank)
    view = model.bank_view(bank)
    for path in ([0, 0], [0, 1], [1, 0], [1, 1]):          # 6 blocks, 4 workers: 2 wait
        view.prefetch(path)
    got = view.fetch_path([0, 0])                         # needs (1, 0) and (2, 0): running
    assert sorted(got.prefetched) == [(1, 0), (2, 0)]
    wait_idle(model, bank)
    fetched = sorted(b for call in bank.fetches for b in call)
    assert len(fetched) == 4 and (2, 2) not in fetched and (2, 3) not in fetched
