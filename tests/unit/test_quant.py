"""int8 blocks (membank/quant.py) and where they show up: the per-row error bound, zero rows,
non-finite input refused, the payload layout and sizes, keys, the manifest's encodings table,
the device cache keeping native and int8 apart, and MemoryModel attaching dequantized blocks.

Run: .venv/bin/python -m pytest -q tests/unit/test_quant.py
"""
import logging

import numpy as np
import pytest
import torch

from membank import quant
from membank.artifacts import iter_blocks, load_manifest
from membank.blocks import checksum
from membank.keys import block_key, parse_block_key, parse_block_key_encoding
from membank.manifest import Manifest
from membank.nn.tensors import dequantize_into, roundtrip, tensor_from_buffer, tensor_to_bytes
from membank.signing import Trust
from services.model_client.bank_client import BankError
from services.model_client.device_cache import DeviceCache, file_name, parse_file_name
from services.model_client.device_cache import block_key as cache_key
from services.model_client.memory_model import GenerateResult, MemoryModel
from tests.conftest import ConstantEmbedder

SHAPE = (2, 3, 5, 64)          # (L, n_mats, r, W)


def rand_block(seed=0, shape=SHAPE):
    g = np.random.default_rng(seed)
    x = g.standard_normal(shape).astype(np.float32)
    x[0, 1, 2] *= 1e-30        # a row of tiny values: its own scale, not the block's
    x[1, 2, 4] = 0.0           # an all-zero row
    x[1, 0, 0, 7] = 40.0       # an outlier, costing precision only in its own row
    return x


def test_roundtrip_error_is_within_half_a_step_per_row():
    x = rand_block()
    q, scales = quant.quantize(x)
    assert q.dtype == np.int8 and scales.dtype == np.float32 and scales.shape == SHAPE[:-1]
    assert np.abs(q).max() <= 127 and (q != -128).all()
    np.testing.assert_allclose(scales, np.abs(x).max(-1) / 127, rtol=1e-6)
    # every non-zero row uses the full range: its largest value maps to +-127
    nonzero = scales > 0
    assert (np.abs(q).max(-1)[nonzero] == 127).all()
    y = quant.dequantize(quant.encode_int8(x), SHAPE)
    err = np.abs(y - x)
    bound = scales[..., None] / 2 * (1 + 1e-5) + 1e-45
    assert (err <= bound).all()
    # per-row scales: the tiny row keeps its relative precision despite the outlier elsewhere
    tiny = x[0, 1, 2]
    assert np.abs(y[0, 1, 2] - tiny).max() <= np.abs(tiny).max() / 254 * (1 + 1e-5)
    # the outlier's row is coarse, another row of the same matrix is not
    assert err[1, 0, 0].max() > 10 * err[1, 0, 1].max()


def test_zero_rows_get_scale_zero_and_decode_to_exact_zeros():
    x = rand_block()
    q, scales = quant.quantize(x)
    assert scales[1, 2, 4] == 0 and (q[1, 2, 4] == 0).all()
    y = quant.dequantize(quant.encode_int8(x), SHAPE)
    assert (y[1, 2, 4] == 0).all() and not np.signbit(y[1, 2, 4]).any()
    z = np.zeros(SHAPE, np.float32)
    assert (quant.dequantize(quant.encode_int8(z), SHAPE) == 0).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad):
    x = rand_block()
    x[0, 0, 0, 3] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quant.quantize(x)
    with pytest.raises(ValueError, match="NaN or inf"):
        quant.encode_block(x.tobytes(), SHAPE, "float32", "int8")


def test_payload_layout_and_sizes():
    x = rand_block()
    payload = quant.encode_int8(x)
    L, m, r, w = SHAPE
    nq, ns = L * m * r * w, L * m * r * 4
    assert len(payload) == nq + ns == quant.encoded_nbytes(SHAPE, "int8", "float32")
    q, scales = quant.quantize(x)
    # int8 values in C order, then little-endian float32 scales in C order over (L, m, r)
    assert payload[:nq] == q.tobytes(order="C")
    assert np.array_equal(np.frombuffer(payload[nq:], "<f4").reshape(L, m, r), scales)
    assert payload[nq:nq + 4] == np.float32(np.abs(x[0, 0, 0]).max() / 127).astype("<f4").tobytes()
    # native sizes are the bank dtype's; int8 is 1 byte per weight + 4 per row
    assert quant.encoded_nbytes(SHAPE, "", "bfloat16") == 2 * nq
    assert quant.encoded_nbytes(SHAPE, "", "float32") == 4 * nq
    with pytest.raises(ValueError):
        quant.encoded_nbytes(SHAPE, "int4", "float32")


def test_bfloat16_blocks_are_widened_exactly():
    t = torch.from_numpy(rand_block()).to(torch.bfloat16)
    buf = tensor_to_bytes(t, "bfloat16")
    assert np.array_equal(quant.native_to_float32(buf, SHAPE, "bfloat16"), t.float().numpy())
    payload = quant.encode_block(buf, SHAPE, "bfloat16", "int8")
    assert payload == quant.encode_int8(t.float().numpy())
    with pytest.raises(ValueError, match="bytes"):
        quant.native_to_float32(buf[:-2], SHAPE, "bfloat16")


def test_dequantize_into_a_strided_slice_and_roundtrip_agree():
    x = rand_block()
    payload = quant.encode_int8(x)
    room = torch.full((2, 3, 9, 64), 7.0)                 # a level's slice of the memory room
    dequantize_into(payload, SHAPE, room[:, :, 2:7])
    want = torch.from_numpy(quant.dequantize(payload, SHAPE))
    assert torch.equal(room[:, :, 2:7], want)
    assert (room[:, :, :2] == 7).all() and (room[:, :, 7:] == 7).all()   # nothing else touched
    # the evaluation's round trip is the same arithmetic
    assert torch.equal(roundtrip(torch.from_numpy(x)), want)
    # into bfloat16 room: the dequantized values in the model's dtype
    room16 = torch.zeros(SHAPE, dtype=torch.bfloat16)
    dequantize_into(bytearray(payload), SHAPE, room16)
    assert torch.equal(room16, want.to(torch.bfloat16))


def test_a_bad_payload_never_touches_the_room():
    x = rand_block()
    payload = bytearray(quant.encode_int8(x))
    room = torch.full(SHAPE, 3.0)
    with pytest.raises(ValueError, match="bytes"):
        dequantize_into(payload[:-1], SHAPE, room)
    nq = int(np.prod(SHAPE))
    for bad in (np.float32(np.nan), np.float32(-1.0), np.float32(np.inf)):
        corrupt = bytearray(payload)
        corrupt[nq + 8:nq + 12] = bad.astype("<f4").tobytes()
        with pytest.raises(ValueError, match="scale"):
            dequantize_into(corrupt, SHAPE, room)
    with pytest.raises(ValueError, match="shape"):
        dequantize_into(payload, SHAPE, torch.zeros(2, 3, 5, 63))
    assert (room == 3).all()


def test_encoding_names():
    assert quant.normalize("") == quant.normalize("native") == quant.normalize(None) == ""
    assert quant.normalize("int8") == "int8"
    with pytest.raises(ValueError, match="unknown block encoding"):
        quant.normalize("fp8")
    assert quant.label("") == "native" and quant.label("int8") == "int8"


# -- keys and manifest ----------------------------------------------------------------------------
def test_block_keys_carry_the_encoding():
    assert block_key("b", "v1", 2, 3) == b"b/b/v1/2/3"
    assert block_key("b", "v1", 2, 3, "int8") == b"b/b/v1/2/3/int8"
    assert parse_block_key(b"b/b/v1/2/3/int8") == ("b", "v1", 2, 3)
    assert parse_block_key_encoding(b"b/b/v1/2/3/int8") == ("b", "v1", 2, 3, "int8")
    assert parse_block_key_encoding(b"b/b/v1/2/3") == ("b", "v1", 2, 3, "")
    for bad in (b"b/b/v1/2/3/", b"b/b/v1/2", b"m/b/v1/2/3"):
        with pytest.raises(ValueError):
            parse_block_key(bad)


def small_manifest(encodings=None) -> Manifest:
    fields = dict(bank="b", version="v1", dtype="float32", d_model=8, mem_layers=[0],
                  branching=2, ranks=[4, 0], checksums=[["a", "b"], []])
    if encodings is not None:
        fields["encodings"] = encodings
    return Manifest(**fields)


def test_manifest_encodings_table():
    plain = small_manifest()
    assert "encodings" not in plain.to_json()          # byte-identical JSON for old readers
    assert not plain.has_encoding("int8") and plain.has_encoding("")
    assert "has no int8 blocks (available: native)" in plain.missing_encoding("int8")
    m = small_manifest({"int8": [["c", "d"], []]})
    assert Manifest.from_json(m.to_json()) == m
    assert m.checksum(1, 1, "int8") == "d" and m.checksum(1, 1) == "b"
    assert m.block_nbytes(1) == 4 * 3 * 4 * 8 and m.block_nbytes(1, "int8") == 3 * 4 * 8 + 3 * 4 * 4
    assert m.block_dtype("int8") == "int8" and m.block_dtype() == "float32"
    assert m.available_encodings == ["native", "int8"]
    with pytest.raises(ValueError, match="one checksum per block"):
        small_manifest({"int8": [["c"], []]})
    with pytest.raises(ValueError):
        small_manifest({"fp8": [["c", "d"], []]})


# -- device cache ---------------------------------------------------------------------------------
def cache_manifest():
    native = [bytes([n + 1]) * 384 for n in range(2)]
    enc = [bytes([n + 9]) * (96 + 12 * 4) for n in range(2)]
    m = Manifest(bank="b", version="v1", dtype="float32", d_model=8, mem_layers=[0], branching=2,
                 ranks=[4], checksums=[[checksum(b) for b in native]],
                 encodings={"int8": [[checksum(b) for b in enc]]})
    return m, native, enc


def test_device_cache_keeps_native_and_int8_apart(tmp_path):
    m, native, enc = cache_manifest()
    cache = DeviceCache(1 << 20, tmp_path)
    assert cache.put(m, 1, 0, bytearray(native[0]))
    assert cache.get(m, 1, 0, encoding="int8") is None          # never the native bytes
    assert cache.put(m, 1, 0, bytearray(enc[0]), encoding="int8")
    assert bytes(cache.get(m, 1, 0, encoding="int8")) == enc[0]
    assert bytes(cache.get(m, 1, 0)) == native[0]
    with pytest.raises(ValueError, match="does not match"):     # int8 bytes checked as int8
        cache.put(m, 1, 1, bytearray(native[1]), encoding="int8")
    int8_key, native_key = cache_key(m, 1, 0, "int8"), cache_key(m, 1, 0)
    assert int8_key in cache and native_key in cache and int8_key != native_key
    assert int8_key == ("b", m.content_id(1, 0, "int8"), 1, "int8")
    assert file_name(int8_key) == f"b@1@{m.content_id(1, 0, 'int8')}@int8.block"
    assert parse_file_name(file_name(int8_key)) == int8_key
    assert parse_file_name(file_name(native_key)) == native_key
    assert parse_file_name(file_name(native_key)[:-len(".block")] + "@fp8.block") is None
    # a restart: both come back from disk, each re-verified against its own checksum
    again = DeviceCache(1 << 20, tmp_path)
    assert bytes(again.get(m, 1, 0, encoding="int8")) == enc[0]
    assert bytes(again.get(m, 1, 0)) == native[0]
    (tmp_path / file_name(int8_key)).write_bytes(native[0][:144])      # right size, wrong bytes
    third = DeviceCache(1 << 20, tmp_path)
    assert third.get(m, 1, 0, encoding="int8") is None
    assert third.level_stats()[1].corrupt == 1


# -- MemoryModel attaching int8 blocks (fake bank, no sockets) -------------------------------------
# the fake bank's manifests are unsigned (signing: tests/unit/test_signing.py)
UNSIGNED_OK = Trust(allow_unsigned=True)


class Int8Bank:
    """Serves a manifest with (or without) int8 payloads made from the export's blocks."""

    def __init__(self, manifest, blocks, with_int8=True):
        self.blocks = blocks
        self.payloads = {b: quant.encode_block(d, manifest.block_shape(b[0]), manifest.dtype,
                                               "int8")
                         for b, d in blocks.items()}
        enc = {}
        if with_int8:
            enc = {"int8": [[checksum(self.payloads[(l, n)]) for n in range(len(level))]
                            for l, level in enumerate(manifest.checksums, start=1)]}
        self.manifest = Manifest.model_validate({**manifest.model_dump(), "encodings": enc})
        self.calls = []

    def get_manifest(self, bank, version=""):
        return self.manifest

    def fetch(self, bank, version, blocks, manifest, encoding="", out=None):
        self.calls.append((list(blocks), encoding))
        src = self.payloads if encoding == "int8" else self.blocks
        got = {b: bytearray(src[b]) for b in blocks}
        for b, dest in (out or {}).items():      # received in place, as the real clients do
            dest.write(0, got[b])
            got[b] = dest
        return got


@pytest.fixture
def int8_setup(tiny_model_export):
    m = load_manifest(tiny_model_export)
    blocks = {(l, n): bytes(d) for l, n, d in iter_blocks(tiny_model_export, m)}
    return tiny_model_export, m, blocks


def fetch_path(model, bank, path):
    r = GenerateResult(prompt="p", text="", memory=False)
    model.fetch_path(bank, path, r)
    return r


def test_memory_model_dequantizes_int8_blocks_into_its_room(int8_setup):
    export, m, blocks = int8_setup
    bank = Int8Bank(m, blocks)
    cache = DeviceCache(1 << 20)
    model = MemoryModel.from_pretrained(export, embedder=ConstantEmbedder(), cache=cache,
                                        encoding="int8", trust=UNSIGNED_OK)
    r = fetch_path(model, bank, [1, 0])
    assert r.encoding == "int8" and bank.calls == [(m.path_blocks([1, 0]), "int8")]
    assert r.fetched_bytes == sum(m.block_nbytes(l, "int8") for l, _ in m.path_blocks([1, 0]))
    for level, node in m.path_blocks([1, 0]):
        native = tensor_from_buffer(bytearray(blocks[(level, node)]), m.block_shape(level), m.dtype)
        off, rk = model.offsets[level - 1], m.ranks[level - 1]
        assert torch.equal(model.mem[0, :, :, off:off + rk], roundtrip(native))
        assert model.attached[level] == ("test", bank.manifest.content_id(level, node, "int8"))
    # the cache holds the int8 payloads (not native bytes): the next prompt fetches nothing
    assert all(k[3] == "int8" for k in cache.keys())
    model.attached.clear()
    r = fetch_path(model, bank, [1, 0])
    assert r.fetched_blocks == [] and len(r.cached_blocks) == 2 and len(bank.calls) == 1
    # a native model next to it attaches different (full precision) weights for the same path
    native_model = MemoryModel.from_pretrained(export, embedder=ConstantEmbedder(),
                                               trust=UNSIGNED_OK)
    fetch_path(native_model, bank, [1, 0])
    assert bank.calls[-1][1] == "" and not torch.equal(native_model.mem, model.mem)
    assert (native_model.mem - model.mem).abs().max() < 0.02 / 127 * 6


def test_a_version_without_int8_is_fetched_native_and_logged_once(int8_setup, caplog):
    export, m, blocks = int8_setup
    bank = Int8Bank(m, blocks, with_int8=False)
    model = MemoryModel.from_pretrained(export, embedder=ConstantEmbedder(), encoding="int8",
                                        trust=UNSIGNED_OK)
    with caplog.at_level(logging.WARNING, logger="membank.client"):
        r = fetch_path(model, bank, [0, 1])
        fetch_path(model, bank, [1, 1])
    assert r.encoding == "native" and all(enc == "" for _, enc in bank.calls)
    warned = [rec.getMessage() for rec in caplog.records
              if "native blocks instead" in rec.getMessage()]
    assert len(warned) == 1 and "has no int8 blocks (available: native)" in warned[0]
    level2 = m.path_blocks([1, 1])[1]
    native = tensor_from_buffer(bytearray(blocks[level2]), m.block_shape(2), m.dtype)
    off = model.offsets[1]
    assert torch.equal(model.mem[0, :, :, off:off + m.ranks[1]], native)


def test_bank_client_refuses_an_encoding_the_manifest_lacks_before_any_rpc(int8_setup):
    from services.model_client.bank_client import BankClient
    from services.model_client.fetcher import ShardedFetcher
    from services.model_client.targets import client_factory

    _, m, _ = int8_setup
    with BankClient("127.0.0.1:1", timeout_s=0.5) as c:     # nothing listens there
        with pytest.raises(BankError) as e:
            c.fetch("test", "v1", [(1, 0)], m, encoding="int8")
    assert e.value.code == "NOT_FOUND" and "available: native" in e.value.message
    with ShardedFetcher("127.0.0.1:1", client_factory=client_factory()) as f, \
            pytest.raises(BankError) as e:
        f.fetch("test", "v1", [(1, 0)], m, encoding="int8")
    assert e.value.code == "NOT_FOUND"
    with pytest.raises(ValueError, match="unknown block encoding"):
        MemoryModel.from_pretrained(int8_setup[0], embedder=ConstantEmbedder(), encoding="fp8")
