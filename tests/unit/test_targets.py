"""Bank targets -> clients (services/model_client/targets.py) and every device entry point using it.

  "host:port"              -> BankClient;  "host:port+DP" -> DataPlaneClient (gRPC on port)
  timeout, token, TLS CA   -> passed to either client the same way
  bad syntax               -> one-line ValueError at configuration (settings, ShardedFetcher,
                              `membank generate`), never at the first fetch
  ShardedFetcher / open_bank (DeviceSettings.open_bank) / LoadLoop's ShardedBank pick per shard
  DataPlaneClient: an encoding the manifest lacks -> NOT_FOUND before any connection

No server runs here: clients connect lazily (tests/integration/test_dataplane_device.py fetches
over real servers).
Run: .venv/bin/python -m pytest -q tests/unit/test_targets.py
"""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from membank.artifacts import load_manifest
from services.model_client import targets
from services.model_client.bank_client import BankClient, BankError
from services.model_client.dataplane_client import DataPlaneClient
from services.model_client.fetcher import FetchPolicy, ShardedFetcher
from services.model_client.settings import DeviceSettings
from services.model_client.targets import (
    check_target,
    client_factory,
    is_dataplane,
    make_client,
    open_bank,
)

GOOD = ["127.0.0.1:50051", "bank.example:443", "[::1]:50051", "dns:///membank-shard.ns.svc:50051",
        "127.0.0.1:50051+50052", "[::1]:50051+50052",
        "membank-shard-0.membank-shard.membank-dev.svc:50051+50052"]
BAD = ["", " 127.0.0.1:50051", "127.0.0.1:50051 ", "127.0.0.1:50051+", "127.0.0.1:50051+x",
       "127.0.0.1+50052", "127.0.0.1:x+50052", "127.0.0.1:50051+0", "127.0.0.1:50051+70000",
       "127.0.0.1:50051+50052+50053", ":50051+50052", "127.0.0.1:0+50052"]


@pytest.mark.parametrize("target", GOOD)
def test_the_form_picks_the_client(target):
    with make_client(target, 2.5) as c:
        if "+" in target:
            assert isinstance(c, DataPlaneClient) and is_dataplane(target)
            grpc_target, dp = target.rsplit("+", 1)
            # gRPC for manifest / route / health on the first port, blocks on the second
            assert (c.grpc.target, c.port, c.timeout_s, c.grpc.timeout_s) == \
                (grpc_target, int(dp), 2.5, 2.5)
        else:
            assert type(c) is BankClient and not is_dataplane(target)
            assert (c.target, c.timeout_s) == (target, 2.5)


@pytest.mark.parametrize("target", BAD)
def test_bad_targets_are_one_line_value_errors(target):
    with pytest.raises(ValueError) as e:
        check_target(target)
    assert "\n" not in str(e.value) and "50052" in str(e.value)     # it shows the syntax
    with pytest.raises(ValueError):
        make_client(target)


class Recorder:
    """Stands in for a client class: records how it was built."""

    def __init__(self, kind, made):
        self.kind, self.made = kind, made

    def __call__(self, target, timeout_s, **kw):
        self.made.append((self.kind, target, timeout_s, kw))
        return self.kind


def test_token_tls_and_timeout_reach_either_client_the_same_way(monkeypatch):
    made = []
    monkeypatch.setattr(targets, "BankClient", Recorder("grpc", made))
    monkeypatch.setattr(targets, "DataPlaneClient", Recorder("dp", made))
    make = client_factory(timeout_s=3.0, token="T", tls_ca="ca.pem", tls_server_name="bank")
    assert [make("a:1"), make("b:1+2")] == ["grpc", "dp"]
    kw = {"token": "T", "tls_ca": "ca.pem", "tls_server_name": "bank",
          "allow_insecure_token": False}
    assert made == [("grpc", "a:1", 3.0, kw), ("dp", "b:1+2", 3.0, kw)]


def test_token_and_tls_are_really_used_by_the_data_plane_client(tmp_path):
    from tests.integration.test_api import self_signed
    cert, _ = self_signed(tmp_path)
    with make_client("127.0.0.1:50051+50052", token="s3cret", tls_ca=cert,
                     tls_server_name="localhost") as c:
        assert c._token == "s3cret" and c._tls is not None
        assert c._server_hostname == "localhost"
        assert c.grpc._metadata == (("authorization", "Bearer s3cret"),)
    with make_client("127.0.0.1:50051+50052") as c:
        assert c._token is None and c._tls is None and c.grpc._metadata is None


# -- entry points ---------------------------------------------------------------------------
def test_device_settings_take_both_forms_and_refuse_bad_ones():
    s = DeviceSettings.from_args(["--bank", "127.0.0.1:50051+50052"])
    assert s.bank_targets() == "127.0.0.1:50051+50052"
    s = DeviceSettings.from_args(["--bank", "s0=10.0.0.1:50051+50052,s1=10.0.0.2:50051"])
    assert s.bank_targets() == {"s0": "10.0.0.1:50051+50052", "s1": "10.0.0.2:50051"}
    for bad in ("127.0.0.1:50051+x", "s0=a:1+2+3", "a:1+2,b:1+2", "a+2"):
        with pytest.raises(ValidationError) as e:
            DeviceSettings.from_args(["--bank", bad])
        assert "bank" in str(e.value)


def test_open_bank_from_settings_picks_per_target(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    one = DeviceSettings.from_args(["--bank", "127.0.0.1:50051+50052", "--timeout", "2",
                                    "--token-file", str(token)]).open_bank()
    with one:
        assert isinstance(one, DataPlaneClient)
        assert (one.timeout_s, one._token, one.grpc_target) == (2.0, "s3cret", "127.0.0.1:50051")
    with DeviceSettings.from_args(["--bank", "127.0.0.1:50051"]).open_bank() as plain:
        assert type(plain) is BankClient
    sharded = DeviceSettings.from_args(
        ["--bank", "s0=127.0.0.1:50051+50052,s1=127.0.0.1:50061",
         "--token-file", str(token)]).open_bank()
    with sharded:
        assert isinstance(sharded, ShardedFetcher)
        s0, s1 = sharded._client("s0"), sharded._client("s1")
        assert isinstance(s0, DataPlaneClient) and type(s1) is BankClient
        assert s0._token == "s3cret" and s1._metadata == (("authorization", "Bearer s3cret"),)
        # each shard's call deadline is the fetcher's attempt timeout, whatever the transport
        assert s0.timeout_s == s1.timeout_s == sharded.policy.attempt_timeout_s


def test_sharded_fetcher_refuses_a_bad_target_at_once():
    with pytest.raises(ValueError, match="DATAPLANE_PORT"):
        open_bank({"s0": "127.0.0.1:50051+x"}, policy=FetchPolicy())
    # a factory of the caller's own takes whatever it understands
    made = []
    with ShardedFetcher({"s0": "fake"}, client_factory=lambda t: made.append(t) or BankClient(
            "127.0.0.1:1")) as f:
        f._client("s0")
    assert made == ["fake"]


def test_load_loop_bank_picks_per_target():
    from loadtests.load_loop import ShardedBank
    bank = ShardedBank({"s0": "127.0.0.1:50051+50052", "s1": "127.0.0.1:50061"}, timeout_s=1.5)
    try:
        assert isinstance(bank.clients["s0"], DataPlaneClient)
        assert type(bank.clients["s1"]) is BankClient
        assert bank.clients["s0"].timeout_s == bank.clients["s1"].timeout_s == 1.5
    finally:
        bank.close()


def test_cli_help_and_settings_document_the_target_syntax(capsys):
    import argparse
    import inspect

    from membank_cli.cli import main
    from services.model_client.settings import add_arguments
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "host:port+DATAPLANE_PORT" in " ".join(capsys.readouterr().out.split())
    p = argparse.ArgumentParser()
    add_arguments(p)          # membank chat / device-serve / the device HTTP server
    assert "host:port+DATAPLANE_PORT" in " ".join(p.format_help().split())
    assert "host:port+DATAPLANE_PORT" in inspect.getsource(DeviceSettings)   # the field docs


def test_cli_generate_refuses_a_bad_target_in_one_line(capsys, tmp_path):
    from membank_cli.cli import main
    # the model directory does not exist: the target is checked first
    with pytest.raises(SystemExit) as e:
        main(["generate", "hi", "--model", str(tmp_path / "none"), "--bank", "h:1+x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("membank generate: error:") and "DATAPLANE_PORT" in err
    assert "\n" not in err


def test_dataplane_client_refuses_a_missing_encoding_before_connecting(tiny_export):
    manifest = load_manifest(tiny_export)         # native only
    # nothing listens on port 1: NOT_FOUND (not UNAVAILABLE) proves no connection was tried
    with make_client("127.0.0.1:1+1", 1.0) as c:
        with pytest.raises(BankError) as e:
            c.fetch(manifest.bank, "", [(1, 0)], manifest, encoding="int8")
        assert e.value.code == "NOT_FOUND" and "int8" in e.value.message
        with pytest.raises(ValueError, match="unknown block encoding"):
            c.fetch(manifest.bank, "", [(1, 0)], manifest, encoding="fp4")
        with pytest.raises(BankError) as e:         # native: it does try, and says so
            c.fetch(manifest.bank, "", [(1, 0)], manifest)
        assert e.value.code == "UNAVAILABLE"
