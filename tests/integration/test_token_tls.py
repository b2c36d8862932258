"""Tokens never in the clear (issue 16): a device with a token and no CA speaks TLS (the system
roots) to both transports, never plaintext, whatever the server speaks; only an explicit
`allow_insecure_token` sends a token over a plaintext channel.

A listener stands in for the bank and records the first bytes each connection sends: a TLS
ClientHello starts with the handshake record type 0x16; plaintext gRPC with the HTTP/2 preface
"PRI * HTTP/2.0", the plaintext data plane with its frame magic (and the token in JSON).

Run: .venv/bin/python -m pytest -q tests/integration/test_token_tls.py
"""
from __future__ import annotations

import socket
import threading
import time

import pytest

from membank.artifacts import load_manifest
from services.model_client.bank import BankError
from services.model_client.bank_client import BankClient
from services.model_client.dataplane_client import DataPlaneClient
from services.model_client.settings import DeviceSettings
from tests.conftest import run_bank_server
from tests.integration.test_api import self_signed

pytestmark = pytest.mark.integration
TOKEN = "s3cret-read-token"
TLS_HANDSHAKE = 0x16


class Recorder:
    """Accepts connections on a free loopback port and keeps the first bytes of each."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.first: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                data = b""
                try:
                    while len(data) < 512 and (part := conn.recv(4096)):
                        data += part
                except OSError:
                    pass
                self.first.append(data)

    def wait(self, timeout=5.0) -> bytes:
        deadline = time.monotonic() + timeout
        while not self.first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.first, "no connection reached the listener"
        return self.first[0]

    def close(self):
        self.listener.close()


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.close()


def test_a_grpc_client_with_a_token_and_no_ca_speaks_tls(recorder):
    with BankClient(f"127.0.0.1:{recorder.port}", token=TOKEN, timeout_s=1) as c, \
            pytest.raises(BankError):
        c.get_manifest("test")
    first = recorder.wait()
    assert first[0] == TLS_HANDSHAKE and TOKEN.encode() not in first


def test_a_dataplane_client_with_a_token_and_no_ca_speaks_tls(recorder, tiny_export):
    grpc_side = Recorder()
    try:
        target = f"127.0.0.1:{grpc_side.port}+{recorder.port}"
        with DataPlaneClient(target, token=TOKEN, timeout_s=1) as c, pytest.raises(BankError):
            c.fetch("test", "v1", [(1, 0)], load_manifest(tiny_export))
        first = recorder.wait()
        assert first[0] == TLS_HANDSHAKE and TOKEN.encode() not in first
    finally:
        grpc_side.close()


def test_plaintext_only_when_explicitly_allowed(recorder):
    with BankClient(f"127.0.0.1:{recorder.port}", token=TOKEN, timeout_s=1,
                    allow_insecure_token=True) as c, pytest.raises(BankError):
        c.get_manifest("test")
    assert recorder.wait().startswith(b"PRI * HTTP/2.0")
    # without a token nothing secret travels: plaintext stays the default
    recorder.first.clear()
    with BankClient(f"127.0.0.1:{recorder.port}", timeout_s=1) as c, pytest.raises(BankError):
        c.get_manifest("test")
    assert recorder.wait().startswith(b"PRI * HTTP/2.0")


def test_device_settings_carry_the_choice(recorder):
    s = DeviceSettings(bank=[f"127.0.0.1:{recorder.port}"], token=TOKEN, bank_timeout_s=1)
    bank = s.open_bank()
    with bank, pytest.raises(BankError):
        bank.get_manifest("test")
    assert recorder.wait()[0] == TLS_HANDSHAKE
    assert DeviceSettings.from_args(["--allow-insecure-token"]).allow_insecure_token


def test_a_token_to_a_tls_server_without_a_ca_is_checked_against_the_system_roots(
        lmdb_dir, tmp_path):
    """The server's self-signed certificate is not in the system roots: refused, and the
    token never went out in the clear (UNAVAILABLE, not UNAUTHENTICATED from a plaintext
    exchange); with its CA the same client works."""
    cert, key = self_signed(tmp_path)
    (tmp_path / "read").write_text(TOKEN)
    flags = ["--tls-cert", str(cert), "--tls-key", str(key), "--auth-token-file",
             str(tmp_path / "read"), "--no-admin"]
    with run_bank_server(lmdb_dir, *flags, log_path=tmp_path / "log") as (address, _):
        port = address.rsplit(":", 1)[1]
        with BankClient(f"localhost:{port}", token=TOKEN, timeout_s=3) as c, \
                pytest.raises(BankError) as e:
            c.get_manifest("test")
        assert e.value.code == "UNAVAILABLE"
        with BankClient(f"localhost:{port}", token=TOKEN, tls_ca=cert) as c:
            assert c.get_manifest("test").bank == "test"
