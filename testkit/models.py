"""A whole model export without training, and the device's HTTP server on it, for tests and
benchmarks.

    export = make_model_export(Path("runs/x/export"))          # tiny: loads and decodes in seconds
    with run_device_server(export, "--bank", target, log_path=log) as address:   # "host:port"
        ...

`make_model_export` writes what training's export writes (anchor, tokenizer, router, bank
"test" version "v1") with random weights; tests/conftest.py's `tiny_model_export` fixture and
benchmarks/abuse.py use it. Needs torch (the model and the export writer).
"""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from services.bank_server.launch import stop

REPO = Path(__file__).resolve().parents[1]

# the tokenizer's training texts (and the prompts tests use)
TINY_TEXTS = ["The atomic number of Ruthenium is 44.", "Hydrogen is the lightest element.",
              "Gold (Au) has atomic number 79.", "Ångström, café, naïve, 日本, Zürich."]


def make_model_export(out: Path, seed: int = 0, preset: str = "tiny",
                      max_seq_len: int | None = None) -> Path:
    """A random-weight model exported like training does (bank "test", version "v1"; with
    `tiny`, the same shapes as `tiny_export`): enough to load, route, fetch and decode in
    seconds. `max_seq_len`: a longer context than the preset's (long generations)."""
    import dataclasses

    import torch

    from membank.config import get_preset
    from membank.nn.model import Transformer
    from membank.router import Router
    from training.export import export
    from training.tokenizer import train_tokenizer

    cfg = get_preset(preset)
    if max_seq_len is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                 max_seq_len=max_seq_len))
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    out.mkdir(parents=True, exist_ok=True)
    tok = out.parent / f"{out.name}-tokenizer.json"
    train_tokenizer(TINY_TEXTS * 4, cfg.model.vocab_size, tok)
    mc, k = cfg.memory, cfg.memory.branching
    router = Router(k, mc.depth, 384, [torch.randn(k ** l, k, 384) for l in range(mc.depth)])
    levels = [torch.randn(k ** l, *mc.block_shape(cfg.model, l)) * 0.02
              for l in range(1, mc.depth + 1)]
    export(out, cfg, model, levels, tok, router, bank_id="test", version="v1")
    return out


@contextmanager
def run_device_server(export: Path, *extra: str, log_path: Path, timeout: float = 120.0):
    """`python -m services.model_client.http_server --model EXPORT --port 0 EXTRA` as a
    subprocess; yield (address "host:port", proc) once it listens (with --bank, after MiniLM
    loaded); stopped on exit (SIGTERM, then SIGKILL)."""
    from services.model_client.http_server import LISTENING

    cmd = [sys.executable, "-m", "services.model_client.http_server", "--model", str(export),
           "--port", "0", *extra]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=log, bufsize=0,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline, line = time.monotonic() + timeout, b""
        while not line.startswith(LISTENING.encode()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"device server did not start ({proc.poll()}); log: "
                                   f"{log_path}")
            if select.select([proc.stdout], [], [], 0.5)[0]:
                line = proc.stdout.readline()
        yield line.decode().strip()[len(LISTENING):], proc
    finally:
        stop(proc)
        proc.stdout.close()
        log.close()
