"""Settings of the bank server: environment variables `MEMBANK_SERVER_*`, overridden by flags.

    MEMBANK_SERVER_LMDB_PATH=/data/bank.lmdb python -m services.bank_server.server --port 0

`BankServerSettings.from_args(argv)` is called once, in `server.main()`; everything below it
receives the settings object and never reads the environment itself.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class BankServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEMBANK_SERVER_", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)   # 0: let the OS pick a free port
    lmdb_path: Path = Path("data/bank.lmdb")
    map_size_gb: float = Field(default=64, gt=0)        # LMDB address space, not disk usage
    redis_url: str | None = None                        # None: no Redis tier (the default)
    redis_ttl_s: int = Field(default=3600, gt=0)
    max_workers: int = Field(default=4, ge=1)           # threads for blocking LMDB/Redis reads
    max_concurrent_rpcs: int | None = Field(default=256, ge=1)  # beyond this: RESOURCE_EXHAUSTED
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def map_size(self) -> int:
        return int(self.map_size_gb * (1 << 30))

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "BankServerSettings":
        """Settings from the environment, with any flag given on the command line on top."""
        p = argparse.ArgumentParser(prog="python -m services.bank_server.server",
                                    description="Serve a membank bank over gRPC from LMDB.")
        # defaults are None so that only flags actually given override the environment
        p.add_argument("--host")
        p.add_argument("--port", type=int, help="0 picks a free port (printed at start-up)")
        p.add_argument("--lmdb", dest="lmdb_path", help="LMDB directory written by ingest")
        p.add_argument("--map-size-gb", type=float)
        p.add_argument("--redis-url", help="e.g. redis://127.0.0.1:6379/0 (off when not given)")
        p.add_argument("--redis-ttl-s", type=int)
        p.add_argument("--max-workers", type=int)
        p.add_argument("--max-concurrent-rpcs", type=int)
        p.add_argument("--log-level", type=str.upper)
        args = p.parse_args(argv)
        return cls(**{k: v for k, v in vars(args).items() if v is not None})
