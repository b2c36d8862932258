"""DeviceSettings (services/model_client/settings.py): environment, flags on top, one-line errors.

Run: .venv/bin/pytest -q tests/unit/test_device_settings.py
"""
import pytest
from pydantic import ValidationError

from services.model_client.settings import DeviceSettings


def test_environment_then_flags(monkeypatch):
    monkeypatch.setenv("MEMBANK_CLIENT_BANK", "127.0.0.1:50051")
    monkeypatch.setenv("MEMBANK_CLIENT_MAX_TOKENS", "64")
    s = DeviceSettings.from_args(["--port", "0"])
    assert (s.bank, s.max_tokens, s.port) == (["127.0.0.1:50051"], 64, 0)
    assert s.bank_targets() == "127.0.0.1:50051"
    assert DeviceSettings.from_args(["--max-tokens", "8",
                                     "--default-max-tokens", "8"]).max_tokens == 8


def test_named_shards_become_a_mapping():
    s = DeviceSettings.from_args(["--bank", "s0=10.0.0.1:50051, s1=10.0.0.2:50051"])
    assert s.bank_targets() == {"s0": "10.0.0.1:50051", "s1": "10.0.0.2:50051"}
    assert DeviceSettings.from_args([]).bank_targets() is None


def test_token_comes_from_a_file_and_stays_secret(tmp_path):
    f = tmp_path / "token"
    f.write_text("s3cret\n")
    s = DeviceSettings.from_args(["--token-file", str(f)])
    assert s.token.get_secret_value() == "s3cret" and "s3cret" not in repr(s)


@pytest.mark.parametrize("argv, field", [
    (["--bank", "a:1,b:2"], "shard ids"), (["--bank", "nohost"], "host:port"),
    (["--max-tokens", "0"], "max_tokens"), (["--port", "70000"], "port"),
    (["--max-tokens", "8"], "default_max_tokens"),
])
def test_bad_settings_are_refused(argv, field):
    with pytest.raises(ValidationError, match=field):
        DeviceSettings.from_args(argv)


def test_block_encoding_from_environment_or_flag(monkeypatch):
    assert DeviceSettings.from_args([]).encoding == "native"
    monkeypatch.setenv("MEMBANK_CLIENT_ENCODING", "int8")
    assert DeviceSettings.from_args([]).encoding == "int8"
    assert DeviceSettings.from_args(["--encoding", "native"]).encoding == "native"
    monkeypatch.setenv("MEMBANK_CLIENT_ENCODING", "fp8")
    with pytest.raises(ValidationError, match="encoding"):
        DeviceSettings.from_args([])
    with pytest.raises(SystemExit):        # argparse: not one of the choices
        DeviceSettings.from_args(["--encoding", "int4"])


# -- issue 16: pinned keys, unsigned manifests, tokens without TLS ----------------------------
def test_trust_settings_from_environment_and_flags(monkeypatch, tmp_path):
    from membank.signing import SignatureError, key_id
    from testkit.keys import signing_key, write_public_key
    pub = write_public_key(tmp_path / "op.pub")
    monkeypatch.setenv("MEMBANK_CLIENT_TRUSTED_KEYS", f"{pub}, {tmp_path}")
    s = DeviceSettings.from_args([])
    assert s.trusted_keys == [pub, tmp_path] and not s.allow_unsigned
    assert not s.allow_insecure_token
    trust = s.trust()
    assert set(trust.keys.keys) == {key_id(signing_key().public_key())}
    assert not trust.allow_unsigned
    flags = DeviceSettings.from_args(["--allow-unsigned", "--allow-insecure-token",
                                      "--trusted-keys", str(pub)])
    assert flags.allow_unsigned and flags.allow_insecure_token and flags.trust().allow_unsigned
    # a key file that is not one: a one-line error when the device starts, not at a prompt
    (tmp_path / "bad.pub").write_text("not a key")
    with pytest.raises(SignatureError, match="cannot read public key"):
        DeviceSettings(trusted_keys=[tmp_path / "bad.pub"]).trust()


def test_device_server_refuses_a_bad_pinned_key_in_one_line(tmp_path, tiny_model_export):
    from services.model_client.http_server import main
    (tmp_path / "bad.pub").write_text("not a key")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tiny_model_export), "--trusted-keys", str(tmp_path / "bad.pub")])
    assert str(e.value).startswith("membank device: error: cannot read public key")
