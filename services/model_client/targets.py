"""Bank targets: the one place a target string becomes the device's bank.

    bank = open_bank("10.0.0.1:50051+50052", timeout_s=5, token=T)   # one server: its client
    bank = open_bank({"s0": "10.0.0.1:50051", "s1": "10.0.0.2:50051+50052"}, timeout_s=5)
    # shards: a ShardedFetcher (placement, hedging, failover), each shard's client as below
    client = make_client("10.0.0.1:50051", timeout_s=5, token=T)          # BankClient (gRPC)
    client = make_client("10.0.0.1:50051+50052", timeout_s=5, token=T)    # DataPlaneClient

`open_bank` is what every device entry point calls (`membank generate` / `chat` /
`device-serve` through DeviceSettings.open_bank, MemoryModel.from_pretrained(bank=...), the
demo, benchmarks); each result is a Bank (services/model_client/bank.py).

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
from typing import Callable, Mapping, Union

from services.model_client.bank import Bank
from services.model_client.bank_client import BankClient
from services.model_client.dataplane_client import DataPlaneClient, parse_target
from services.model_client.fetcher import FetchPolicy, ShardedFetcher

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
                tls_ca: TLSCA = None, tls_server_name: str | None = None,
                allow_insecure_token: bool = False) -> Client:
    """A DataPlaneClient for "HOST:PORT+DATAPLANE_PORT", a BankClient for "HOST:PORT", with the
    same deadline, token and TLS settings either way (a token without a CA: TLS with the
    system roots unless `allow_insecure_token`; bank_client.tls_for_token)."""
    check_target(target)
    kw = dict(token=token, tls_ca=tls_ca, tls_server_name=tls_server_name,
              allow_insecure_token=allow_insecure_token)
    if is_dataplane(target):
        return DataPlaneClient(target, timeout_s, **kw)
    return BankClient(target, timeout_s, **kw)


def client_factory(*, timeout_s: float = 10.0, token: str | None = None, tls_ca: TLSCA = None,
                   tls_server_name: str | None = None,
                   allow_insecure_token: bool = False) -> Callable[[str], Client]:
    """`target -> client` with these settings (ShardedFetcher's `client_factory`): shards may
    mix both forms."""
    def make(target: str) -> Client:
        return make_client(target, timeout_s, token=token, tls_ca=tls_ca,
                           tls_server_name=tls_server_name,
                           allow_insecure_token=allow_insecure_token)
    return make


def open_bank(targets: str | Mapping[str, str] | None, *, timeout_s: float = 10.0,
              token: str | None = None, tls_ca: TLSCA = None,
              tls_server_name: str | None = None,
              policy: FetchPolicy | None = None, allow_insecure_token: bool = False,
              edge: str | None = None) -> Bank | None:
    """The device's bank: None (anchor only) for no target; for one target the client
    `make_client` picks; for {shard id: target} a ShardedFetcher whose shards' clients come
    from `client_factory` with these settings. `timeout_s` is a single client's deadline per
    call, and a sharded fetch's whole deadline (each RPC: at most FetchPolicy's attempt
    timeout); `policy` replaces that policy. `edge`: an HTTP cache's URL (edge.py) asked for
    every block first. Bad syntax: ValueError now, never at a fetch."""
    if targets is None:
        return None
    if edge:
        from services.model_client.edge import EdgeBank
        inner = open_bank(targets, timeout_s=timeout_s, token=token, tls_ca=tls_ca,
                          tls_server_name=tls_server_name, policy=policy,
                          allow_insecure_token=allow_insecure_token)
        return EdgeBank(inner, edge, timeout_s=timeout_s, token=token, tls_ca=tls_ca,
                        allow_insecure_token=allow_insecure_token)
    if isinstance(targets, str):
        return make_client(targets, timeout_s, token=token, tls_ca=tls_ca,
                           tls_server_name=tls_server_name,
                           allow_insecure_token=allow_insecure_token)
    for target in targets.values():
        check_target(target)
    policy = policy or FetchPolicy(deadline_s=timeout_s,
                                   attempt_timeout_s=min(timeout_s, FetchPolicy.attempt_timeout_s))
    return ShardedFetcher(targets, policy, client_factory=client_factory(
        timeout_s=policy.attempt_timeout_s, token=token, tls_ca=tls_ca,
        tls_server_name=tls_server_name, allow_insecure_token=allow_insecure_token))
