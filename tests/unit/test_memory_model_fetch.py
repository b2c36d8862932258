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
    assert r.fetched_blocks == m.path_blocks([1, 0]) and bank.manifest_reads == 2
    assert set(model.attached.values()) == {("test", "v2", n, "") for _, n in m.path_blocks([1, 0])}


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
    assert model.attached[2] == ("test", "v1", m.path_blocks([1, 1])[1][1], "")   # untouched


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
