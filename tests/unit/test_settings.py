"""services/bank_server/settings.py: environment, then flags on top.

Run: .venv/bin/python -m pytest -q tests/unit/test_settings.py
"""
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.bank_server.settings import BankServerSettings


def test_defaults(monkeypatch):
    for var in ("HOST", "PORT", "LMDB_PATH", "REDIS_URL"):
        monkeypatch.delenv(f"MEMBANK_SERVER_{var}", raising=False)
    s = BankServerSettings.from_args([])
    assert (s.host, s.port, s.redis_url) == ("127.0.0.1", 50051, None)
    assert s.map_size == 64 << 30


def test_env_then_flags(monkeypatch):
    monkeypatch.setenv("MEMBANK_SERVER_PORT", "6000")
    monkeypatch.setenv("MEMBANK_SERVER_LMDB_PATH", "/env/db")
    monkeypatch.setenv("MEMBANK_SERVER_REDIS_URL", "redis://env:6379/0")
    s = BankServerSettings.from_args(["--port", "0", "--log-level", "debug"])
    assert s.port == 0                                   # flag wins
    assert s.lmdb_path == Path("/env/db")                # env kept where no flag is given
    assert s.redis_url == "redis://env:6379/0"
    assert s.log_level == "DEBUG"


def test_invalid(monkeypatch):
    monkeypatch.delenv("MEMBANK_SERVER_PORT", raising=False)
    with pytest.raises(ValidationError):
        BankServerSettings.from_args(["--port", "70000"])


def test_caps_must_leave_lmdb_reader_slots():
    """Each in-flight FetchBlocks stream and data plane send holds one of LMDB's 512 reader
    slots (shared with ingest and gc): caps that could take them all are refused at start."""
    BankServerSettings.from_args(["--max-concurrent-rpcs", "300"])
    with pytest.raises(ValidationError, match="reader slots"):
        BankServerSettings.from_args(["--max-concurrent-rpcs", "400"])
    with pytest.raises(ValidationError, match="reader slots"):
        BankServerSettings.from_args(["--dataplane-max-connections", "380"])


def test_per_client_caps_follow_the_server_wide_caps():
    s = BankServerSettings.from_args([])
    assert (s.max_rpcs_per_peer, s.dataplane_max_connections_per_peer) == (64, 8)
    s = BankServerSettings.from_args(["--max-concurrent-rpcs", "8",
                                      "--dataplane-max-connections", "4"])
    assert (s.max_rpcs_per_peer, s.dataplane_max_connections_per_peer) == (2, 1)
    s = BankServerSettings.from_args(["--max-concurrent-rpcs", "8", "--max-rpcs-per-peer", "8"])
    assert s.max_rpcs_per_peer == 8
