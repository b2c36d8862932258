"""EdgeBank: blocks by content address from an HTTP cache in front of the bank, verified like
any transport; everything else from the bank itself.

    bank = EdgeBank(open_bank("10.0.0.1:50051"), "http://cache.site.lan:8080")
    blocks = bank.fetch("demo", version, manifest.path_blocks(path), manifest)
    bank.stats       # {"edge_blocks", "edge_bytes", "fallback_blocks"}

A bank server serves every block at `GET /v1/blocks/{bank}/{content id}` (admin.py): immutable,
`ETag` = the address, so any standard HTTP cache (nginx, a CDN) in front of it can serve a site
full of devices from one copy (deploy/edge/nginx.conf). The device asks the cache for each block
of a fetch by the content id its signed manifest lists (`Manifest.content_id`: a BLAKE3 digest),
receives it straight into its destination (a buffer or the room's Scatter) while hashing it, and
takes it only if size and digest match: the cache is trusted for nothing. A block the cache
cannot give (a miss it cannot fill, an error, a bad digest, a manifest without digests) is
fetched from the bank as before, in one request for all of them; a bad block from the cache is
logged. A cache that cannot be reached or times out is skipped for `retry_after_s` (every block
straight to the bank), so a dead or hung cache costs one timeout, not one per block. Versions
stored before content addressing (`block_store` "version") are not asked of the cache. Manifests,
routing and health always go to the bank (`inner`).

Read tokens: the address is a 256-bit digest that only a reader of the token-protected manifest
learns, so the bank marks blocks `public` and a site cache holding the site's token (it adds the
Authorization header upstream) serves them to its devices without one. A device's own token
(`token`) goes to the cache only over https (`tls_ca`: the CA that signed it) unless
`allow_insecure_token`, as to the bank. Thread-safe: one keep-alive connection per thread.
"""
from __future__ import annotations

import http.client
import logging
import ssl
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from membank.blocks import hasher
from membank.manifest import Manifest
from services.model_client.bank import Bank, Block, BlockIntegrityError, destination

log = logging.getLogger("membank.client")


class EdgeMiss(Exception):
    """The cache did not give the block (status, connection, or no content address)."""


class EdgeBank:
    def __init__(self, inner: Bank, url: str, *, timeout_s: float = 10.0,
                 token: str | None = None, tls_ca: str | Path | bytes | bool | None = None,
                 allow_insecure_token: bool = False, retry_after_s: float = 30.0):
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"edge cache {url!r}: expected http://HOST[:PORT][/PREFIX]")
        self.inner, self.url, self.timeout_s = inner, url, timeout_s
        self._https = u.scheme == "https"
        self._host, self._port = u.hostname, u.port or (443 if self._https else 80)
        self._prefix = u.path.rstrip("/")
        self._ssl = None
        if self._https:      # the system roots, plus the CA given (a file, or PEM bytes)
            self._ssl = ssl.create_default_context()
            if isinstance(tls_ca, (str, Path)):
                self._ssl.load_verify_locations(cafile=str(tls_ca))
            elif isinstance(tls_ca, bytes):
                self._ssl.load_verify_locations(cadata=tls_ca.decode())
        # the token never crosses a plaintext link unless the caller says so (targets.py)
        send_token = token and (self._https or allow_insecure_token)
        self._headers = {"Authorization": f"Bearer {token}"} if send_token else {}
        self.retry_after_s = retry_after_s
        self._skip_until = 0.0            # the cache failed to answer: bank only until then
        self._local = threading.local()
        self._lock = threading.Lock()
        self.stats = {"edge_blocks": 0, "edge_bytes": 0, "fallback_blocks": 0}

    # -- the Bank interface ----------------------------------------------------------------
    def get_manifest(self, bank: str, version: str = "") -> Manifest:
        return self.inner.get_manifest(bank, version)

    def health(self, timeout_s: float = 1.0) -> bool:
        return self.inner.health(timeout_s)

    @property
    def placement_mismatch(self) -> bool:          # the inner ShardedFetcher's flag
        return bool(getattr(self.inner, "placement_mismatch", False))

    @placement_mismatch.setter
    def placement_mismatch(self, value: bool) -> None:
        if hasattr(self.inner, "placement_mismatch"):
            self.inner.placement_mismatch = value

    def fetch(self, bank: str, version: str, blocks: list[Block], manifest: Manifest, *,
              encoding: str = "", out: dict | None = None) -> dict[Block, bytearray]:
        """Each block from the cache, verified; the rest from the bank in one fetch."""
        out = out or {}
        got, rest = {}, []
        use_edge = manifest.block_store == "content" and time.monotonic() >= self._skip_until
        for b in blocks:
            b = (int(b[0]), int(b[1]))
            if not use_edge:
                rest.append(b)
                continue
            try:
                got[b] = self._get(manifest, b, encoding, out.get(b))
            except (EdgeMiss, OSError, http.client.HTTPException, BlockIntegrityError,
                    ValueError) as e:
                if isinstance(e, BlockIntegrityError):
                    log.warning("edge cache %s: %s; fetching it from the bank", self.url, e)
                if isinstance(e, (OSError, http.client.HTTPException)):
                    # unreachable, hung or broken: the rest of this fetch, and the next
                    # `retry_after_s` of fetches, go straight to the bank
                    log.warning("edge cache %s: %s; skipping it for %.0f s", self.url, e,
                                self.retry_after_s)
                    self._skip_until = time.monotonic() + self.retry_after_s
                    use_edge = False
                self._drop_connection()
                rest.append(b)
        if rest:
            extra: dict = {"encoding": encoding} if encoding else {}
            into = {b: out[b] for b in rest if b in out}
            if into:
                extra["out"] = into
            got.update(self.inner.fetch(bank, version, rest, manifest, **extra))
            with self._lock:
                self.stats["fallback_blocks"] += len(rest)
        return got

    def close(self) -> None:
        self._drop_connection()
        self.inner.close()

    # -- one block over HTTP -----------------------------------------------------------------
    def _get(self, manifest: Manifest, block: Block, encoding: str, dest) -> object:
        algo, want = manifest.block_check(*block, encoding)
        if algo == "xxh3_64":          # not a content address a cache can be asked for
            raise EdgeMiss("the manifest lists no digest")
        nbytes = manifest.block_nbytes(block[0], encoding)
        into = destination(dest, nbytes, block)       # ValueError for a wrong-size `dest`
        conn = self._connection()
        conn.request("GET", f"{self._prefix}/v1/blocks/{manifest.bank}/{algo}-{want}",
                      headers=self._headers)
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            raise EdgeMiss(f"HTTP {resp.status}")
        length = resp.getheader("Content-Length")
        if length is None or not length.isdigit() or int(length) != nbytes:
            raise BlockIntegrityError(f"block {block} from the edge cache has "
                                      f"{length} bytes, the manifest says {nbytes}")
        h = hasher(algo)
        for piece in into.pieces:
            filled = 0
            while filled < piece.nbytes:
                n = resp.readinto(piece[filled:])
                if not n:
                    raise EdgeMiss("connection closed inside a block")
                filled += n
            h.update(piece)
        if h.hexdigest() != want:
            raise BlockIntegrityError(f"block {block} from the edge cache fails its manifest "
                                      f"{algo} digest")
        with self._lock:
            self.stats["edge_blocks"] += 1
            self.stats["edge_bytes"] += nbytes
        return into.result

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._https:
                conn = http.client.HTTPSConnection(self._host, self._port,
                                                   timeout=self.timeout_s, context=self._ssl)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
            self._local.conn = conn
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

