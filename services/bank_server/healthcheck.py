"""A container health probe for a bank server: exit 0 iff grpc.health.v1 answers SERVING.

    python -m services.bank_server.healthcheck [--addr HOST:PORT] [--service NAME] [--timeout 2]
        [--tls-ca PEM] [--tls-server-name NAME] [--no-tls]

Used by the Dockerfile's HEALTHCHECK and docker-compose.yml (Kubernetes uses its native gRPC
probes instead, deploy/base/statefulset.yaml). It probes the server in the same container, so
its defaults come from that server's own settings (`BankServerSettings`, the same
MEMBANK_SERVER_* environment): the port `port`, the host `host` (127.0.0.1 when it listens on
every address), and TLS when `tls_cert` is set, trusting that certificate (self-signed) or
`--tls-ca` (the CA that signed it). The server's certificate rarely names 127.0.0.1: pass
`--tls-server-name` (e.g. the name in its SAN) to check that name instead.
The default service is the bank service itself, which the server marks SERVING only once it
can answer fetches and NOT_SERVING as soon as it starts a graceful shutdown.

Exit codes: 0 SERVING; 1 anything else (NOT_SERVING, UNKNOWN, unreachable, deadline, TLS
handshake refused, bad settings). One line on stderr says why when it is not 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from services.bank_server.settings import BankServerSettings

BANK_SERVICE = "membank.v1.BankService"
_ANY = ("", "0.0.0.0", "::", "[::]")


def check(addr: str, service: str = BANK_SERVICE, timeout_s: float = 2.0, *,
          tls_ca: bytes | None = None, tls_server_name: str | None = None) -> tuple[bool, str]:
    """(serving, reason): one Health/Check call on a fresh channel, bounded by `timeout_s`.
    `tls_ca` (PEM bytes): connect over TLS trusting it; None: plaintext."""
    if tls_ca is None:
        channel = grpc.insecure_channel(addr)
    else:
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        channel = grpc.secure_channel(addr, grpc.ssl_channel_credentials(root_certificates=tls_ca),
                                      options=options)
    with channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s,
                wait_for_ready=False)
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") else "UNKNOWN"
            return False, f"{code}: {e.details() if hasattr(e, 'details') else e}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.bank_server.healthcheck",
                                description="Exit 0 iff the bank server's health service says "
                                            "SERVING (defaults: the server's MEMBANK_SERVER_* "
                                            "settings).")
    p.add_argument("--addr", help="host:port (default: the server's host and port)")
    p.add_argument("--service", default=BANK_SERVICE,
                   help='health service name; "" is the whole server (default: %(default)s)')
    p.add_argument("--timeout", type=float, default=2.0, help="seconds (default: %(default)s)")
    p.add_argument("--tls-ca", type=Path, help="PEM roots to trust (default with TLS on: the "
                   "server's own certificate, MEMBANK_SERVER_TLS_CERT)")
    p.add_argument("--tls-server-name", help="name to check in the server certificate")
    p.add_argument("--no-tls", action="store_true", help="plaintext even if the server has TLS")
    args = p.parse_args(argv)
    try:
        settings = BankServerSettings()     # the environment only: the server's own settings
    except ValidationError as e:
        print(f"healthcheck: bad MEMBANK_SERVER_* settings: {e.errors()[0]['loc']} "
              f"{e.errors()[0]['msg']}", file=sys.stderr)
        return 1
    host = "127.0.0.1" if settings.host in _ANY else settings.host
    addr = args.addr or f"{host}:{settings.port}"
    ca = None
    if not args.no_tls and (args.tls_ca or settings.tls_cert):
        path = args.tls_ca or settings.tls_cert
        try:
            ca = path.read_bytes()
        except OSError as e:
            print(f"healthcheck: cannot read {path}: {e.strerror}", file=sys.stderr)
            return 1
    ok, reason = check(addr, args.service, args.timeout, tls_ca=ca,
                       tls_server_name=args.tls_server_name)
    if not ok:
        print(f"healthcheck {addr} {args.service or '(server)'}"
              f"{' (tls)' if ca else ''}: {reason}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
