"""Signed manifests end to end (issue 16): real bank server subprocesses over real LMDBs, a
device (MemoryModel) pinning the test operator's key (testkit/keys.py), and the attacks the
signature is for: a rogue shard that chooses the weights, an attacker re-signing with its own
key, an unsigned bank, and a relay that tampers with block bodies on the way.

  signed bank, key pinned                  -> memory, every block checked against its digest
  unsigned bank                            -> anchor-only "untrusted manifest: ... not signed"
                                              (memory with allow_unsigned)
  rogue shard: other weights + matching    -> anchor-only "... does not verify"
    checksums and digests, old signature
  rogue shard re-signing with its own key  -> anchor-only "... which is not pinned"
  relay flipping a byte of a block body    -> anchor-only "block failed verification: ...
                                              blake3" (the trusted manifest is kept)
  a digest that is not the bytes' (an xxh3 -> BlockIntegrityError from both transports,
    collision), xxh3 checksum right           never the bytes

Run: .venv/bin/python -m pytest -q tests/integration/test_signed_manifests.py
"""
from __future__ import annotations

import json
import shutil
import socket
import threading

import lmdb
import pytest

from membank.artifacts import iter_blocks, load_manifest
from membank.blocks import checksum, digest
from membank.keys import manifest_key
from membank.manifest import Manifest
from membank.signing import generate_key, sign_manifest
from services.bank_server.ingest import ingest
from services.model_client.bank import BlockIntegrityError
from services.model_client.bank_client import BankClient
from services.model_client.dataplane_client import DataPlaneClient, dataplane_target
from services.model_client.memory_model import MemoryModel
from services.model_client.targets import open_bank
from testkit.keys import signing_key, trust
from tests.conftest import FakeEmbedder, run_bank_server

pytestmark = pytest.mark.integration
PROMPT = "The atomic number of Ruthenium is"
MAP = 1 << 30


@pytest.fixture(scope="module")
def signed_db(tiny_model_export, tmp_path_factory):
    """The tiny model's bank, native + int8, signed with the test key."""
    db = tmp_path_factory.mktemp("signed") / "bank.lmdb"
    ingest(tiny_model_export, db, encodings=("int8",), progress=False, map_size=MAP,
           signing_key=signing_key())
    return db


@pytest.fixture(scope="module")
def blocks(tiny_model_export):
    return {(l, n): bytes(d)
            for l, n, d in iter_blocks(tiny_model_export, load_manifest(tiny_model_export))}


def device(tiny_model_export, **trust_kw):
    return MemoryModel.from_pretrained(tiny_model_export, embedder=FakeEmbedder(),
                                       trust=trust(**trust_kw))


def generate(model, address):
    with open_bank(address) as bank:
        return model.generate(PROMPT, bank=bank, max_new_tokens=2)


def rogue_copy(src, dst, mutate):
    """A copy of the LMDB at `src` whose test/v1 manifest (and blocks) `mutate(fields, txn)`
    rewrites: what a rogue shard (or whoever holds its disk) serves."""
    shutil.copytree(src, dst)
    env = lmdb.open(str(dst), map_size=MAP, subdir=True)
    with env.begin(write=True) as txn:
        fields = json.loads(txn.get(manifest_key("test", "v1")))
        mutate(fields, txn)
        txn.put(manifest_key("test", "v1"), Manifest.model_validate(fields).to_json().encode())
    env.close()
    return dst


def swap_in_other_weights(fields, txn, level, node):
    """Replace block (level, node) by other bytes and list their checksum and digest, as a
    shard choosing the weights would (the server's own xxh3 check then passes)."""
    old = txn.get(Manifest.model_validate(fields).storage_key(level, node))
    new = bytes(b ^ 0x5A for b in old)
    fields["checksums"][level - 1][node] = checksum(new)
    fields["digests"]["native"][level - 1][node] = digest(new)
    txn.put(Manifest.model_validate(fields).storage_key(level, node), new)   # its content key


def test_a_signed_bank_is_used_and_its_digests_are_the_blocks(signed_db, tiny_model_export,
                                                               blocks, tmp_path):
    with run_bank_server(signed_db, log_path=tmp_path / "log") as (address, _):
        with BankClient(address) as c:
            m = c.get_manifest("test")
        result = generate(device(tiny_model_export), address)
    assert result.memory and result.anchor_only_reason is None and result.fetched_blocks
    assert trust().check(m) is True and m.digest_algo == "blake3"
    assert all(m.digests["native"][l - 1][n] == digest(d) for (l, n), d in blocks.items())
    assert set(m.digests) == {"native", "int8"}


def test_an_unsigned_bank_is_refused_unless_unsigned_is_allowed(tiny_model_export, tmp_path):
    db = tmp_path / "unsigned.lmdb"
    ingest(tiny_model_export, db, progress=False, map_size=MAP)          # no signing key
    with run_bank_server(db, log_path=tmp_path / "log") as (address, _):
        refused = generate(device(tiny_model_export), address)
        allowed = generate(device(tiny_model_export, allow_unsigned=True), address)
    assert refused.memory is False and refused.new_tokens >= 1
    assert refused.anchor_only_reason.startswith("untrusted manifest: UNAUTHENTICATED")
    assert "manifest test/v1 is not signed" in refused.anchor_only_reason
    assert allowed.memory is True


def test_a_rogue_shard_choosing_the_weights_is_refused(signed_db, tiny_model_export, tmp_path):
    model = device(tiny_model_export)
    m = load_manifest(tiny_model_export)
    path = model.router.route(FakeEmbedder().encode([PROMPT]))[0].tolist()
    level, node = m.path_blocks(path)[-1]
    db = rogue_copy(signed_db, tmp_path / "rogue.lmdb",
                    lambda f, txn: swap_in_other_weights(f, txn, level, node))
    with run_bank_server(db, log_path=tmp_path / "log") as (address, _):
        with BankClient(address) as c:        # the rogue shard serves its blocks happily
            served = c.get_manifest("test")
            assert len(c.fetch("test", "v1", [(level, node)], served)) == 1
        result = generate(model, address)
    assert result.memory is False and not model.attached
    assert result.anchor_only_reason.startswith("untrusted manifest: ")
    assert "the signature of key" in result.anchor_only_reason
    assert "does not verify" in result.anchor_only_reason


def test_a_rogue_shard_re_signing_with_its_own_key_is_refused(signed_db, tiny_model_export,
                                                              tmp_path):
    rogue_key = generate_key()

    def resign(fields, txn):
        swap_in_other_weights(fields, txn, 1, 0)
        fields.update(sign_manifest(Manifest.model_validate(fields), rogue_key).model_dump())

    db = rogue_copy(signed_db, tmp_path / "rogue.lmdb", resign)
    with run_bank_server(db, log_path=tmp_path / "log") as (address, _):
        result = generate(device(tiny_model_export), address)
    assert result.memory is False and "which is not pinned" in result.anchor_only_reason


class TamperingRelay:
    """A TCP relay to `upstream` that flips one byte of the server -> client stream at
    `offset` (counted per connection): an on-path attacker, or a cache that went bad."""

    def __init__(self, upstream: str, offset: int):
        host, port = upstream.rsplit(":", 1)
        self.upstream, self.offset = (host, int(port)), offset
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.tampered = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src, dst, tamper):
        seen = 0
        try:
            while data := src.recv(1 << 16):
                if tamper and seen <= self.offset < seen + len(data):
                    data = bytearray(data)
                    data[self.offset - seen] ^= 0xFF
                    self.tampered += 1
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.listener.close()


def test_a_relay_tampering_with_a_block_body_gets_anchor_only(signed_db, tiny_model_export,
                                                              tmp_path):
    with run_bank_server(signed_db, "--dataplane-port", "0",
                         log_path=tmp_path / "log") as (address, proc):
        # block bodies over the data plane, through the relay: the first block's header frame
        # is a few hundred bytes, its body 6 KiB, so byte 2000 is inside a body
        relay = TamperingRelay(proc.dataplane_address, offset=2000)
        try:
            model = device(tiny_model_export)
            result = generate(model, dataplane_target(address, relay.address))
        finally:
            relay.close()
    assert relay.tampered >= 1
    assert result.memory is False and not model.attached
    assert result.anchor_only_reason.startswith("block failed verification: DATA_LOSS")
    assert "fails its manifest blake3 hash" in result.anchor_only_reason


def test_the_digest_not_the_checksum_decides(signed_db, tiny_model_export, blocks, tmp_path):
    """A block whose xxh3 matches but whose bytes are not the signed digest's (what an xxh3
    collision, easy to make for a non-cryptographic hash, would look like) is refused by both
    transports."""
    with run_bank_server(signed_db, "--dataplane-port", "0",
                         log_path=tmp_path / "log") as (address, proc):
        with BankClient(address) as c:
            m = c.get_manifest("test")
        table = [list(level) for level in m.digests["native"]]
        table[1][2] = digest(b"other weights with the same xxh3")
        lying = m.model_copy(update={"digests": {**m.digests, "native": table}})
        assert lying.checksum(2, 2) == checksum(blocks[(2, 2)])      # xxh3 alone would pass
        clients = [BankClient(address), DataPlaneClient(dataplane_target(
            address, proc.dataplane_address))]
        for client in clients:
            with client, pytest.raises(BlockIntegrityError, match="blake3"):
                client.fetch("test", "v1", [(2, 2)], lying)
        for client in (BankClient(address),        # against the true digest: taken
                       DataPlaneClient(dataplane_target(address, proc.dataplane_address))):
            with client:
                got = client.fetch("test", "v1", [(2, 2)], m)
                assert bytes(got[(2, 2)]) == blocks[(2, 2)]
