"""`membank`: the one command-line entry point.

    membank train    --config demo --out runs/demo          train anchor + bank, export
    membank ingest   runs/demo/export --lmdb runs/demo/lmdb  load blocks into a bank store
    membank serve    --lmdb runs/demo/lmdb --port 50051      run a bank shard (gRPC)
    membank generate "The atomic number of Ruthenium is" --bank localhost:50051
    membank demo                                             all of the above, end to end

This module is the top of the import graph: it may import training/ and services/; nothing
imports it. Heavy imports happen inside each command so `membank --help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def cmd_train(args) -> None:
    from training.train import TrainConfig, run

    tc = TrainConfig(preset=args.config)
    for item in args.set or []:  # --set anchor_steps=100
        key, _, value = item.partition("=")
        fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
        if key not in fields:
            raise SystemExit(f"error: unknown training option {key!r}; known: {', '.join(fields)}")
        setattr(tc, key, type(getattr(tc, key))(value))
    run(args.out, tc, reuse=not args.force)


def cmd_ingest(args) -> None:
    from services.bank_server.ingest import ingest

    ingest(args.export, args.lmdb)


def cmd_serve(args) -> None:
    from services.bank_server.server import main as serve_main

    serve_main(args.server_args)


def print_result(label: str, r) -> None:
    t = r.timings_ms
    steps = "  ".join(f"{k} {t.get(k, 0.0):7.2f} ms" for k in ("embed", "route", "fetch", "attach", "decode"))
    print(f"  {label:<15} {r.text!r}")
    extra = f"path {r.path}, fetched {len(r.fetched_blocks)} blocks / {r.fetched_bytes:,} B" if r.memory \
        else f"anchor only ({r.anchor_only_reason})"
    print(f"  {'':<15} {steps}  [{extra}]")


def cmd_generate(args) -> None:
    from services.model_client.bank_client import BankClient
    from services.model_client.memory_model import MemoryModel

    model = MemoryModel.from_pretrained(args.model)
    bank = BankClient(args.bank, timeout_s=args.timeout) if args.bank else None
    try:
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
        result = model.generate(args.prompt, bank=bank, use_memory=not args.no_memory, **kw)
    finally:
        if bank is not None:
            bank.close()
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(args.prompt)
        print_result("with memory" if result.memory else "anchor only", result)


def cmd_demo(args) -> None:
    from membank.demo import run_demo

    run_demo(out_dir=args.out, force=args.force)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="membank", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("train", help="train anchor + bank and export")
    s.add_argument("--config", default="demo", help="model preset: tiny, demo, paper-160m")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a TrainConfig field")
    s.add_argument("--force", action="store_true", help="retrain even if a cached run matches")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("ingest", help="ingest an export's blocks into an LMDB bank store")
    s.add_argument("export")
    s.add_argument("--lmdb", required=True)
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("serve", help="run a bank shard; flags are the bank server's own",
                       add_help=False)
    s.add_argument("server_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("generate", help="route, fetch, attach and decode one prompt")
    s.add_argument("prompt")
    s.add_argument("--model", default="runs/demo/export", help="export directory")
    s.add_argument("--bank", default=None, help="bank server address host:port (none: anchor only)")
    s.add_argument("--no-memory", action="store_true")
    s.add_argument("--max-new-tokens", type=int, default=16)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--timeout", type=float, default=5.0, help="bank deadline in seconds")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("demo", help="train (or reuse), export, serve, and answer prompts")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback wall
        print(f"membank {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
