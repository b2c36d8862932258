"""`make demo`: the whole system end to end on embedded defaults (LMDB, no Redis).

1. train the demo model (or reuse a cached run with the same inputs) and export it;
2. make the operator's signing key pair once (`runs/demo/keys/`, as `membank keygen`), ingest
   the export's blocks into a fresh LMDB store, signing the manifest;
3. start a bank server subprocess on a free port (real gRPC over a real socket);
4. answer a handful of prompts, each with and without memory, with the time of every step (the
   device pins the demo's public key: it uses only manifests that key signed);
5. stop the server it started.

Run it as `membank demo` or `make demo`. Top floor, beside membank_cli/cli.py, which imports it
only when the command runs (training and the device stack are heavy).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from membank.signing import Trust, load_signing_key, write_key_pair
from membank_cli.results import print_result
from services.bank_server.ingest import ingest
from services.bank_server.launch import run_bank_server
from services.model_client.dataplane_client import dataplane_target
from services.model_client.memory_model import MemoryModel
from services.model_client.targets import open_bank
from training.config import load_train_config
from training.train import run

PROMPTS = [
    ("The atomic number of Ruthenium is", "44"),
    ("The atomic number of Tungsten is", "74"),
    ("The element with atomic number 8 is", "Oxygen"),
    ("Gold has the chemical symbol", "Au"),
    ("Neon is in period", "2"),
]


def run_demo(out_dir: str = "runs/demo", force: bool = False) -> None:
    t_start = time.perf_counter()
    out = Path(out_dir)
    print("== 1. train (or reuse) and export")
    export_dir = run(out, load_train_config("demo"), reuse=not force)

    print("== 2. ingest blocks into LMDB")
    lmdb_path = out / "lmdb"
    shutil.rmtree(lmdb_path, ignore_errors=True)
    keys = out / "keys"
    private = next(iter(sorted(keys.glob("*.key"))), None) if keys.is_dir() else None
    if private is None:
        private, _ = write_key_pair(keys, "demo")
    print(f"signing with {private} (devices pin {private.with_suffix('.pub')})")
    t0 = time.perf_counter()
    ingest(export_dir, lmdb_path, signing_key=load_signing_key(private))
    print(f"ingested in {time.perf_counter() - t0:.2f}s")

    print("== 3. start the bank server")
    # gRPC for the manifest, block bodies over the raw-TCP data plane ("host:G+D" target)
    with run_bank_server(lmdb_path, "--dataplane-port", "0",
                         log_path=out / "bank_server.log") as (address, proc):
        target = dataplane_target(address, proc.dataplane_address)
        print(f"bank server pid {proc.pid} at {address}, data plane {proc.dataplane_address} "
              f"(device target {target}; log: {out / 'bank_server.log'})")
        print("== 4. prompts (greedy decoding; timings per step)")
        model = MemoryModel.from_pretrained(export_dir,
                                            trust=Trust.load([private.with_suffix(".pub")]))
        model.warmup()
        with open_bank(target) as bank:
            m = bank.get_manifest(model.bank_id)
            print(f"bank {m.bank} version {m.version}: k={m.branching} ranks={m.ranks} "
                  f"dtype={m.dtype}, "
                  f"block bytes per level {[m.block_nbytes(l) for l in range(1, m.depth + 1)]}")
            for prompt, answer in PROMPTS:
                print(f"\n{prompt!r}  (expected: {answer})")
                print_result("anchor only", model.generate(prompt, bank=None, use_memory=False))
                print_result("with memory", model.generate(prompt, bank=bank))
        print("\n== 5. stop the bank server")
    print(f"server exited with code {proc.returncode}")
    print(f"demo finished in {time.perf_counter() - t_start:.1f}s")
