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
