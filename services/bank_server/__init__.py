"""The bank server: serves a bank's blocks and manifest over gRPC from an LMDB store.

    settings.py   BankServerSettings (env MEMBANK_SERVER_*, CLI flags override)
    store.py      LMDBStore: block bytes, manifests, the `current` pointer
    cache.py      RedisCachedStore: optional shared hot-block tier in front of LMDB
    ingest.py     export directory -> LMDB (versioned keys, one atomic publish)
    servicer.py   the BankService implementation (grpc.aio)
    server.py     start-up: `python -m services.bank_server.server --lmdb PATH --port 0`
"""
