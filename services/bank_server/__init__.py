"""The bank server: serves a bank's blocks and manifest over gRPC from an LMDB store.

    settings.py   BankServerSettings (env MEMBANK_SERVER_*, CLI flags override)
    store.py      LMDBStore: block bytes, manifests, the `current` pointer
    cache.py      RedisCachedStore: optional shared hot-block tier in front of LMDB
    ingest.py     export directory -> LMDB (versioned keys, one atomic publish)
    gc.py         delete a bank's old versions from an LMDB
    servicer.py   the BankService implementation (grpc.aio): GetManifest, FetchBlocks
    control.py    BankService.Route (server-side routing) and BankAdmin.Publish
    router_store.py  the router in LMDB (`r/{bank}/{version}`), parsed and routed with numpy
    publish.py    switch a bank's current version (ingest, the CLI, and the server's Publish
                  in a child process: the server's LMDB is read-only)
    security.py   one interceptor: token auth, per-client rate limit, per-RPC metrics
    metrics.py    Prometheus families and the same numbers as JSON
    readiness.py  warm the hot set (level 1) at start; ready / not ready and why
    admin.py      the admin HTTP API (FastAPI on uvicorn, same event loop as gRPC)
    server.py     start-up: `python -m services.bank_server.server --lmdb PATH --port 0`
"""
