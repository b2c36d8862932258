"""Settings of the device process: environment variables `MEMBANK_CLIENT_*`, overridden by flags.

    MEMBANK_CLIENT_BANK=127.0.0.1:50051 python -m services.model_client.http_server --port 8000

`DeviceSettings.from_args(argv)` is called once, in `http_server.main()` (and by `membank chat`
/ `membank device-serve`); everything below it gets the settings object and never reads the
environment itself.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from membank.secrets import read_secret
from membank.signing import Trust
from services.model_client.bank import Bank
from services.model_client.targets import check_target, open_bank


class DeviceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MEMBANK_CLIENT_", extra="forbid")

    export_dir: Path = Path("runs/demo/export")         # anchor + tokenizer + router + manifest
    # bank: one target serving every block, or "shard-id=TARGET" per shard (hedging and
    # failover over replicas: services/model_client/fetcher.py); empty: anchor only.
    # A TARGET is "host:port" (everything over gRPC) or "host:port+DATAPLANE_PORT" (manifest
    # and health over gRPC on port, block bodies over the bank server's raw-TCP data plane on
    # DATAPLANE_PORT, its --dataplane-port): services/model_client/targets.py. Token, TLS CA
    # and timeout apply to both transports. E.g. MEMBANK_CLIENT_BANK=10.0.0.1:50051+50052 or
    # shard-0=a:50051+50052,shard-1=b:50051+50052
    bank: Annotated[list[str], NoDecode] = Field(default_factory=list)
    bank_timeout_s: float = Field(default=5.0, gt=0)    # deadline of each bank RPC
    token: SecretStr | None = None                      # the bank's read token
    tls_ca: Path | None = None                          # CA (PEM) that signed the bank's cert
    # block encoding to fetch (membank/quant.py): int8 = about 1/2 the bytes of bfloat16 blocks
    # (1/4 of float32), dequantized on the device; a bank version without int8 blocks is
    # fetched native (logged)
    encoding: Literal["native", "int8"] = "native"
    # the anchor's weights and the memory room: bfloat16 halves both, and blocks of a bfloat16
    # bank are then received straight into the room (no copy at attach)
    dtype: Literal["float32", "bfloat16"] = "float32"
    host: str = "127.0.0.1"                             # a device API: loopback by default
    port: int = Field(default=8000, ge=0, le=65535)     # 0: a free port (printed at start-up)
    # request limits: beyond them the HTTP API answers 422 (the model's context still caps
    # prompt + new tokens)
    max_prompt_chars: int = Field(default=8192, ge=1)
    max_tokens: int = Field(default=256, ge=1)          # most new tokens one request may ask for
    default_max_tokens: int = Field(default=32, ge=1)   # when a request names none
    # an HTTP cache in front of the bank (nginx, a CDN; edge.py): blocks are asked of it first
    # by content address and verified; manifests and misses go to the bank
    edge_cache: str | None = None
    # the device block cache (device_cache.py): memory budget (0: none, only the attached
    # levels are reused), and an optional directory that keeps blocks across restarts
    cache_mb: int = Field(default=0, ge=0)
    cache_dir: Path | None = None
    # time to first token a generation allows when its request names none: levels not
    # verified by then are left out of that answer and fetched for the next (None: wait)
    ttft_budget_ms: float | None = Field(default=None, ge=0, le=600_000)
    # bytes a /v1/prefetch may start fetching when its request names no max_bytes (None: the
    # whole path)
    prefetch_max_bytes: int | None = Field(default=None, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # -- HTTP server limits (issue 16, point 6; http_server.py, generation_gate.py,
    # membank/http_limits.py): no single client (IP) may hold the model or the server
    max_queued: int = Field(default=32, ge=1)           # requests waiting in all; more: 503
    max_per_client: int = Field(default=8, ge=1)        # one IP's waiting + running; more: 429
    queue_timeout_s: float = Field(default=30, gt=0)    # no turn by then: 503 + Retry-After
    generation_timeout_s: float = Field(default=60, gt=0)  # then stopped (finish_reason "time")
    max_connections: int = Field(default=256, ge=1)     # in all; more: 503 at once
    max_connections_per_client: int = Field(default=32, ge=1)  # one IP; more: 503 at once
    request_timeout_s: float = Field(default=10, gt=0)  # head + body by then, else 408
    send_timeout_s: float = Field(default=30, gt=0)     # a reader taking no bytes: cut off
    max_body_bytes: int = Field(default=256 << 10, ge=1024)  # more: 413 (a max prompt, escaped,
    #                                                          fits many times)

    # -- trust (issue 16: signed manifests, tokens never in the clear) -------------------------
    # the operator's public keys (PEM files, or directories of *.pub), comma separated: a
    # manifest is used only when one of them signed it (membank/signing.py); pin new + old
    # while rotating. None pinned and allow_unsigned off: every answer is anchor-only
    trusted_keys: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    # development only: use unsigned manifests (a signed one must still verify)
    allow_unsigned: bool = False
    # send the token over a plaintext channel; off: a token without tls_ca means TLS with the
    # system roots (services/model_client/bank_client.py tls_for_token)
    allow_insecure_token: bool = False

    @field_validator("trusted_keys", mode="before")
    @classmethod
    def _split_keys(cls, v):
        return [p.strip() for p in v.split(",") if p.strip()] if isinstance(v, str) else v

    def trust(self) -> Trust:
        """The manifest trust policy (reads the pinned key files; SignatureError, a ValueError
        with one line, when one cannot be read)."""
        return Trust.load(self.trusted_keys, allow_unsigned=self.allow_unsigned)

    @field_validator("bank", mode="before")
    @classmethod
    def _split_targets(cls, v):
        # MEMBANK_CLIENT_BANK=a:1,b:2 and --bank a:1,b:2
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v

    @field_validator("bank")
    @classmethod
    def _targets_are_one_address_or_named_shards(cls, v: list[str]) -> list[str]:
        named = ["=" in t for t in v]
        if len(v) > 1 and not all(named):
            raise ValueError("several bank targets need shard ids: "
                             "shard-0=host:port,shard-1=host:port")
        for t in v:
            address = t.rpartition("=")[2]
            grpc_address, _, dataplane = address.partition("+")
            if not grpc_address.rpartition(":")[2].isdigit():
                raise ValueError(f"bank target {t!r} is not [shard=]host:port[+dataplane_port]")
            if dataplane:
                check_target(address)      # the data plane form, exactly (one-line ValueError)
        return v

    @model_validator(mode="after")
    def _default_within_limit(self) -> "DeviceSettings":
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens {self.default_max_tokens} is over max_tokens "
                             f"{self.max_tokens}")
        return self

    def bank_targets(self) -> str | dict[str, str] | None:
        """None (no bank), one target, or {shard id: target}; a target is "host:port" or
        "host:port+DATAPLANE_PORT" (services/model_client/targets.py)."""
        if not self.bank:
            return None
        if "=" not in self.bank[0]:
            return self.bank[0]
        return dict(t.split("=", 1) for t in self.bank)

    def device_cache(self):
        """The device cache these settings ask for, or None (cache_mb 0)."""
        from services.model_client.device_cache import DeviceCache
        return (DeviceCache(self.cache_mb << 20, self.cache_dir) if self.cache_mb else None)

    def open_bank(self) -> Bank | None:
        """The bank these settings name (targets.open_bank), None without a target: one
        target's client, or a ShardedFetcher for "shard=TARGET" targets; token, TLS CA and
        timeout go to either."""
        return open_bank(self.bank_targets(), timeout_s=self.bank_timeout_s, tls_ca=self.tls_ca,
                         token=self.token.get_secret_value() if self.token else None,
                         allow_insecure_token=self.allow_insecure_token,
                         edge=self.edge_cache)

    def connection_limits(self):
        """The HTTP server's per-connection limits (membank/http_limits.py)."""
        from membank.http_limits import ConnectionLimits
        return ConnectionLimits(max_connections=self.max_connections,
                                max_per_peer=self.max_connections_per_client,
                                request_timeout_s=self.request_timeout_s,
                                send_timeout_s=self.send_timeout_s)

    @classmethod
    def from_args(cls, argv: list[str] | None = None, prog: str = "python -m "
                  "services.model_client.http_server") -> "DeviceSettings":
        """Settings from the environment, with any flag given on the command line on top."""
        p = argparse.ArgumentParser(prog=prog, description="Serve a membank model on the device.")
        add_arguments(p)
        return cls.from_namespace(p.parse_args(argv))

    @classmethod
    def from_namespace(cls, args: argparse.Namespace) -> "DeviceSettings":
        """Settings from parsed `add_arguments` flags (None: not given) over the environment."""
        names = set(cls.model_fields)
        return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})


# the --bank help of every device command (membank generate / chat / device-serve)
BANK_HELP = ("bank server target: host:port (gRPC), or host:port+DATAPLANE_PORT to fetch block "
             "bodies over the server's raw-TCP data plane (its --dataplane-port; manifest and "
             "health stay on gRPC); several shards: shard-0=TARGET,shard-1=TARGET; none: "
             "anchor only")


def add_arguments(p: argparse.ArgumentParser, serve: bool = True) -> None:
    """The device flags (`serve`: the HTTP server's too); defaults are None so only flags
    actually given override the environment."""
    p.add_argument("--model", dest="export_dir", help="export directory")
    p.add_argument("--bank", help=BANK_HELP)
    p.add_argument("--timeout", dest="bank_timeout_s", type=float, help="bank deadline in seconds")
    # the token from a file, so it never shows on a command line (MEMBANK_CLIENT_TOKEN works too)
    p.add_argument("--token-file", dest="token", type=read_secret,
                   help="file holding the bank's read token")
    p.add_argument("--tls-ca", help="CA certificate (PEM) to verify a TLS bank")
    p.add_argument("--encoding", choices=["native", "int8"],
                   help="block encoding to fetch: native (the bank dtype, default) or int8 "
                        "(per-row scales, dequantized here; the bank must be ingested with "
                        "--encodings int8, else native blocks are fetched)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"],
                   help="the model's and the memory room's dtype (default float32; bfloat16 "
                        "halves them, and a bfloat16 bank's blocks land in the room uncopied)")
    p.add_argument("--edge-cache", help="URL of an HTTP cache in front of the bank (e.g. "
                   "http://cache.lan:8080): blocks are asked of it first by content address "
                   "and verified; manifests and misses go to the bank")
    p.add_argument("--cache-mb", type=int,
                   help="device block cache in MB (default 0: none); blocks are kept by "
                        "content, so a publish costs only the blocks it changed")
    p.add_argument("--cache-dir", help="keep cached blocks in this directory across restarts "
                                       "(re-verified when read back)")
    p.add_argument("--ttft-budget-ms", type=float,
                   help="time to first token allowed: the path's levels verified by then are "
                        "attached, the rest fetched in the background for the next prompt "
                        "(default: wait for the whole path)")
    p.add_argument("--log-level", type=str.upper)
    p.add_argument("--trusted-keys", help="the operator's public key files or directories "
                   "(comma separated; `membank keygen`): only manifests they signed are used")
    p.add_argument("--allow-unsigned", action="store_true", default=None,
                   help="development only: use unsigned manifests")
    p.add_argument("--allow-insecure-token", action="store_true", default=None,
                   help="send the token without TLS (default: a token without --tls-ca uses "
                        "TLS with the system roots)")
    if not serve:
        return
    p.add_argument("--host")
    p.add_argument("--port", type=int, help="HTTP port; 0 picks a free port")
    p.add_argument("--max-prompt-chars", type=int)
    p.add_argument("--prefetch-max-bytes", type=int,
                   help="bytes a /v1/prefetch may start fetching when it names none (default: "
                        "the whole path)")
    p.add_argument("--max-tokens", type=int, help="most new tokens a request may ask for")
    p.add_argument("--default-max-tokens", type=int)
    # limits (issue 16, point 6)
    p.add_argument("--max-queued", type=int, help="requests waiting in all (more: 503)")
    p.add_argument("--max-per-client", type=int,
                   help="one client's requests waiting or running (more: 429)")
    p.add_argument("--queue-timeout-s", type=float)
    p.add_argument("--generation-timeout-s", type=float)
    p.add_argument("--max-connections", type=int)
    p.add_argument("--max-connections-per-client", type=int)
    p.add_argument("--request-timeout-s", type=float)
    p.add_argument("--send-timeout-s", type=float)
    p.add_argument("--max-body-bytes", type=int)
