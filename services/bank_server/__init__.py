"""The bank server: one shard serving a bank's manifest and blocks from an LMDB store, over gRPC
and optionally a raw-TCP data plane, with optional in-process LRU and Redis tiers. No torch.

    python -m services.bank_server.ingest EXPORT --lmdb PATH           # load an export
    python -m services.bank_server.server --lmdb PATH --port 0         # serve (--help: flags)
    python -m services.bank_server.cluster --export EXPORT --shards 2  # a local cluster

Its modules: ARCHITECTURE.md ("Layout"); RPCs, limits and status codes: README.md ("Bank
server").
"""
