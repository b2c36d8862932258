"""Signed manifests, the contract (membank/signing.py, membank/manifest.py): canonical bytes, key
files, sign / verify, and what a device's Trust refuses (no sockets: the served path is
tests/integration/test_signed_manifests.py).

Run: .venv/bin/python -m pytest -q tests/unit/test_signing.py
"""
import stat

import pytest

from membank.blocks import digest
from membank.manifest import Manifest, canonical_json
from membank.signing import (
    SignatureError,
    Trust,
    TrustedKeys,
    generate_key,
    key_id,
    load_public_key,
    load_signing_key,
    sign_manifest,
    verify_manifest,
    write_key_pair,
)
from testkit.keys import signing_key


def manifest(**extra) -> Manifest:
    blocks = {(1, 0): b"a" * 64, (1, 1): b"b" * 64, **{(2, n): bytes([n]) * 32 for n in range(4)}}
    table = [[digest(blocks[(1, n)]) for n in range(2)], [digest(blocks[(2, n)]) for n in range(4)]]
    return Manifest(bank="b", version="v1", dtype="float32", d_model=4, mem_layers=[0],
                    branching=2, ranks=[2, 1], checksums=[["0" * 16] * 2, ["0" * 16] * 4],
                    digests={"native": table}, **extra)


def test_canonical_json_is_sorted_compact_ascii_and_refuses_floats():
    assert canonical_json({"b": [1, "é"], "a": None}) == b'{"a":null,"b":[1,"\\u00e9"]}'
    with pytest.raises(ValueError, match="floats"):
        canonical_json({"x": 1.5})
    with pytest.raises(ValueError, match="keys"):
        canonical_json({1: "x"})


def test_signed_bytes_leave_out_the_signature_and_defaults_but_name_format_and_digest_algo():
    m = manifest()
    raw = m.signed_bytes()
    assert b'"format":"membank.manifest/1"' in raw and b'"digest_algo":"blake3"' in raw
    assert b"signature" not in raw and b'"kind"' not in raw        # kind is at its default
    signed = sign_manifest(m, signing_key())
    assert signed.signed_bytes() == raw                            # the signature is left out
    assert Manifest.from_json(signed.to_json()) == signed          # and survives the wire


def test_a_signature_verifies_under_its_pinned_key_only():
    key = signing_key()
    signed = sign_manifest(manifest(), key)
    assert signed.signature.key_id == key_id(key.public_key())
    assert sign_manifest(manifest(), key) == signed                # deterministic (Ed25519)
    assert verify_manifest(signed, TrustedKeys.of([key.public_key()]), allow_unsigned=False)
    other = generate_key()
    with pytest.raises(SignatureError, match=f"key {signed.signature.key_id}, which is not pinned"):
        verify_manifest(signed, TrustedKeys.of([other.public_key()]), allow_unsigned=True)
    # rotation: old and new pinned together, either signature verifies
    both = TrustedKeys.of([other.public_key(), key.public_key()])
    assert Trust(both).check(signed) and Trust(both).check(sign_manifest(manifest(), other))


@pytest.mark.parametrize("change", [
    {"ranks": [2, 0], "checksums": [["0" * 16] * 2, []]},           # shape
    {"shards": ["evil"]},                                           # placement
    {"version": "v2"},                                              # another version's name
])
def test_any_change_to_a_signed_manifest_breaks_its_signature(change):
    key = signing_key()
    signed = sign_manifest(manifest(), key)
    fields = {**signed.model_dump(), **change}
    if "ranks" in change:
        fields["digests"] = {"native": [signed.digests["native"][0], []]}
    forged = Manifest.model_validate(fields)
    with pytest.raises(SignatureError, match="does not verify"):
        Trust(TrustedKeys.of([key.public_key()])).check(forged)


def test_a_changed_block_digest_breaks_the_signature():
    key = signing_key()
    signed = sign_manifest(manifest(), key)
    table = [list(level) for level in signed.digests["native"]]
    table[1][2] = digest(b"the attacker's weights")
    forged = Manifest.model_validate({**signed.model_dump(), "digests": {"native": table}})
    with pytest.raises(SignatureError, match="does not verify"):
        Trust(TrustedKeys.of([key.public_key()])).check(forged)


def test_unsigned_is_refused_unless_allowed_and_nothing_pinned_refuses_everything():
    m = manifest()
    with pytest.raises(SignatureError, match="is not signed"):
        Trust().check(m)
    assert Trust(allow_unsigned=True).check(m) is False
    with pytest.raises(SignatureError, match="pinned: none"):
        Trust(allow_unsigned=True).check(sign_manifest(m, signing_key()))


def test_a_signed_manifest_must_list_digests_for_every_encoding():
    m = manifest()
    with pytest.raises(ValueError, match="needs digests"):
        Manifest.model_validate({**m.model_dump(), "digests": {},
                                 "signature": sign_manifest(m, signing_key()).signature})


def test_block_check_names_the_digest_when_listed_else_xxh3():
    m = manifest()
    assert m.block_check(2, 3) == ("blake3", digest(bytes([3]) * 32))
    bare = m.model_copy(update={"digests": {}})
    assert bare.block_check(2, 3) == ("xxh3_64", "0" * 16)


def test_key_files_private_0600_never_overwritten_and_loadable(tmp_path):
    private, public = write_key_pair(tmp_path / "keys", "op")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_signing_key(private)
    assert key_id(load_public_key(public)) == key_id(key.public_key())
    assert public.name == f"op-{key_id(key.public_key())}.pub"
    with pytest.raises(FileExistsError):
        write_key_pair(tmp_path / "keys", "op", key=key)
    second = write_key_pair(tmp_path / "keys", "op")[1]
    pinned = TrustedKeys.load([tmp_path / "keys"])                # a directory: every *.pub
    assert set(pinned.keys) == {key_id(load_public_key(p)) for p in (public, second)}
    with pytest.raises(SignatureError, match="not an Ed25519 public key|cannot read"):
        TrustedKeys.load([private])
    with pytest.raises(SignatureError, match="cannot read"):
        load_signing_key(tmp_path / "missing.key")
