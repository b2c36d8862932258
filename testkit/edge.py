"""A real nginx as the HTTP cache in front of bank servers (deploy/edge/nginx.conf), started as
a local process for tests and benchmarks.

    with run_nginx(["127.0.0.1:8081"], tmp_path) as edge:     # bank servers' admin ports
        bank = EdgeBank(open_bank(grpc_target), edge.url)
        edge.access_log()     # [(status, cache status, bytes)] per request: HIT / MISS / ...

Needs the `nginx` binary (Debian's nginx-light: `make install` installs it when missing).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from testkit.net import free_port

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "edge" / "nginx.conf"


@dataclass
class Edge:
    url: str
    prefix: Path
    cache_dir: Path
    proc: subprocess.Popen

    def access_log(self) -> list[tuple[int, str, int]]:
        """(status, upstream cache status, body bytes) of every request so far."""
        out = []
        path = self.prefix / "access.log"
        for line in path.read_text().splitlines() if path.exists() else []:
            status, cache, nbytes = line.rsplit(" ", 3)[-3:]
            out.append((int(status), cache, int(nbytes)))
        return out


def render(*, prefix: Path, cache_dir: Path, listen: str, upstreams: list[str],
           token: str | None = None, cache_max: str = "4g") -> str:
    # the file's own comments name the placeholders: left out of the rendered file
    text = "\n".join(line for line in TEMPLATE.read_text().splitlines()
                     if not line.startswith("#")) + "\n"
    values = {"USER_LINE": "user root;" if os.geteuid() == 0 else "", "PREFIX": str(prefix),
              "CACHE_DIR": str(cache_dir), "CACHE_MAX": cache_max, "LISTEN": listen,
              "UPSTREAMS": "\n        ".join(f"server {u};" for u in upstreams),
              "AUTH_LINE": f'proxy_set_header Authorization "Bearer {token}";' if token else ""}
    for k, v in values.items():
        text = text.replace(f"@{k}@", v)
    return text


@contextmanager
def run_nginx(upstreams: list[str], directory: Path, *, token: str | None = None,
              timeout: float = 20.0):
    """nginx caching `upstreams` (bank servers' admin host:port), listening on a free loopback
    port; stopped (and its files left in `directory`) on exit."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                       else None)
    if binary is None:
        raise RuntimeError("nginx is not installed (make install installs Debian's nginx-light)")
    prefix, cache = Path(directory) / "nginx", Path(directory) / "nginx-cache"
    prefix.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(render(prefix=prefix, cache_dir=cache, listen=f"127.0.0.1:{port}",
                           upstreams=upstreams, token=token))
    err = open(prefix / "stderr.log", "wb")
    proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(prefix)], stdout=err,
                            stderr=err)
    edge = Edge(f"http://127.0.0.1:{port}", prefix, cache, proc)
    try:
        deadline = time.monotonic() + timeout
        while True:                 # up once it answers (404 for anything but a block)
            if proc.poll() is not None:
                logs = [p.read_text()[-2000:] for p in (prefix / "stderr.log",
                                                        prefix / "error.log") if p.exists()]
                raise RuntimeError("nginx exited: " + " ".join(logs))
            try:
                urllib.request.urlopen(f"{edge.url}/", timeout=1)
            except urllib.error.HTTPError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start listening") from None
                time.sleep(0.05)
        yield edge
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.close()
