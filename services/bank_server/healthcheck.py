"""A container health probe for a bank server: exit 0 iff grpc.health.v1 answers SERVING.

    python -m services.bank_server.healthcheck [--addr 127.0.0.1:50051] [--service NAME] [--timeout 2]

Used by the Dockerfile's HEALTHCHECK and docker-compose.yml (Kubernetes uses its native gRPC
probes instead, deploy/base/statefulset.yaml). The default address is 127.0.0.1 on
$MEMBANK_SERVER_PORT (50051 when unset), i.e. the server in the same container. The default
service is the bank service itself, which the server marks SERVING only once it can answer
fetches and NOT_SERVING as soon as it starts a graceful shutdown.

Exit codes: 0 SERVING; 1 anything else (NOT_SERVING, UNKNOWN, unreachable, deadline, bad
answer). One line on stderr says why when it is not 0.
"""
from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

BANK_SERVICE = "membank.v1.BankService"


def check(addr: str, service: str = BANK_SERVICE, timeout_s: float = 2.0) -> tuple[bool, str]:
    """(serving, reason): one Health/Check call on a fresh channel, bounded by `timeout_s`."""
    with grpc.insecure_channel(addr) as channel:
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
    port = os.environ.get("MEMBANK_SERVER_PORT", "50051")
    p = argparse.ArgumentParser(prog="python -m services.bank_server.healthcheck",
                                description="Exit 0 iff the bank server's health service says SERVING.")
    p.add_argument("--addr", default=f"127.0.0.1:{port}", help="host:port (default: %(default)s)")
    p.add_argument("--service", default=BANK_SERVICE,
                   help='health service name; "" is the whole server (default: %(default)s)')
    p.add_argument("--timeout", type=float, default=2.0, help="seconds (default: %(default)s)")
    args = p.parse_args(argv)
    ok, reason = check(args.addr, args.service, args.timeout)
    if not ok:
        print(f"healthcheck {args.addr} {args.service or '(server)'}: {reason}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
