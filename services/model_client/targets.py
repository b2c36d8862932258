"""Bank targets: the one place a target string becomes a bank client.

    client = make_client("10.0.0.1:50051", timeout_s=5, token=T)          # BankClient (gRPC)
    client = make_client("10.0.0.1:50051+50052", timeout_s=5, token=T)    # DataPlaneClient
    ShardedFetcher(targets, policy, client_factory=client_factory(timeout_s=5, token=T))

Target syntax (every device entry point: `--bank` / MEMBANK_CLIENT_BANK, ShardedFetcher's
targets, `membank generate`, the local cluster's `targets`, the load loop):

    HOST:PORT                   gRPC only: manifest, route, health AND block bodies
                                (FetchBlocks) on the bank server's gRPC port
    HOST:PORT+DATAPLANE_PORT    gRPC on PORT for manifest / route / health, block bodies over
                                the server's raw-TCP data plane on DATAPLANE_PORT (the server's
                                `--dataplane-port`; services/bank_server/dataplane.py)
    [IPV6]:PORT[+DATAPLANE_PORT]

Both clients have the same face (`get_manifest`, `fetch(..., encoding=)`, `route`, `health`,
`close`) and the same guarantees (every block verified against the manifest), and both take the
same `timeout_s`, `token`, `tls_ca` and `tls_server_name`: a data plane target changes the
transport of block bodies, nothing else. With TLS on, the data plane is TLS too (the server uses
one certificate for both ports).

This module only chooses; it never connects (channels and sockets open on first use), so bad
syntax is a ValueError at configuration time and an unreachable server a BankError later.
Run its tests: .venv/bin/python -m pytest -q tests/unit/test_targets.py
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Union

from services.model_client.bank_client import BankClient
from services.model_client.dataplane_client import DataPlaneClient, parse_target

Client = Union[BankClient, DataPlaneClient]
TLSCA = Union[str, Path, bytes, bool, None]

SYNTAX = "HOST:PORT or HOST:PORT+DATAPLANE_PORT (e.g. 10.0.0.1:50051+50052)"


def is_dataplane(target: str) -> bool:
    """True for "HOST:PORT+DATAPLANE_PORT" (block bodies over the data plane)."""
    return "+" in target


def check_target(target: str) -> str:
    """`target` unchanged when it is usable; ValueError (one line) otherwise. A data plane target
    must be exactly HOST:PORT+DATAPLANE_PORT; a plain one is left to gRPC (which also takes
    "dns:///name:port", "unix:/path", ...), only empty or blank-containing strings are refused."""
    if not isinstance(target, str) or not target or any(c.isspace() for c in target):
        raise ValueError(f"bank target {target!r} is not {SYNTAX}")
    if is_dataplane(target):
        grpc_target = parse_target(target)[0]       # ValueError naming the syntax
        port = grpc_target.rpartition(":")[2]
        if not 0 < int(port) < 65536:
            raise ValueError(f"bank target {target!r} is not {SYNTAX}")
    return target


def make_client(target: str, timeout_s: float = 10.0, *, token: str | None = None,
                tls_ca: TLSCA = None, tls_server_name: str | None = None) -> Client:
    """A DataPlaneClient for "HOST:PORT+DATAPLANE_PORT", a BankClient for "HOST:PORT", with the
    same deadline, token and TLS settings either way."""
    check_target(target)
    if is_dataplane(target):
        return DataPlaneClient(target, timeout_s, token=token, tls_ca=tls_ca,
                               tls_server_name=tls_server_name)
    return BankClient(target, timeout_s, token=token, tls_ca=tls_ca,
                      tls_server_name=tls_server_name)


def client_factory(*, timeout_s: float = 10.0, token: str | None = None, tls_ca: TLSCA = None,
                   tls_server_name: str | None = None) -> Callable[[str], Client]:
    """`target -> client` with these settings (ShardedFetcher's `client_factory`): shards may
    mix both forms."""
    def make(target: str) -> Client:
        return make_client(target, timeout_s, token=token, tls_ca=tls_ca,
                           tls_server_name=tls_server_name)
    return make
