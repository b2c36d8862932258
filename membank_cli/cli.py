"""`membank`: the one command-line entry point.

    membank train    --config demo --out runs/demo          train anchor + bank, export
    membank merge    --out runs/merged runs/sub0 runs/sub1   merge frozen-anchor subtree jobs
    membank keygen   --out keys/                             the operator's signing key pair
    membank dev-secrets --out tls/ --names shard-0,localhost  TLS cert + tokens, one-host stacks
    membank ingest   runs/demo/export --lmdb runs/demo/lmdb --signing-key keys/K.key
                                                             load blocks into a bank store
    membank serve    --lmdb runs/demo/lmdb --port 50051      run a bank shard (gRPC)
    membank generate "The atomic number of Ruthenium is" --bank localhost:50051
    membank chat     --bank localhost:50051                  a REPL: one prompt per line, streamed
    membank device-serve --bank localhost:50051 --port 8000  the device's HTTP API (SSE streaming)
        (every --bank also takes HOST:PORT+DATAPLANE_PORT: block bodies over the bank server's
         raw-TCP data plane; or shard=TARGET,... for a sharded bank: services/model_client/
         targets.py)
    membank demo                                             all of the above, end to end
    membank config paper-160m [--kind lora-ffn]              anchor params, bank and fetch sizes
    membank eval --preset small [--domain C:P]               long-tail evaluation
                                                             (training/evaluate.py)
    membank eval-scaling --preset small                      accuracy against bank and fetch size

Run as `membank ...`, `python -m membank_cli ...` or `python -m membank.cli ...` (a shim).
This package is the top floor: it may import training/ and services/; nothing imports it.
Heavy imports happen inside each command so `membank --help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from membank_cli.results import print_result


def cmd_train(args) -> None:
    from training.config import load_train_config
    from training.train import run

    overrides = list(args.set or [])
    if args.corpus:
        overrides.append(f"corpus={args.corpus}")
    tc = load_train_config(args.config, overrides)
    run(args.out, tc, reuse=not args.force, resume=args.resume)


def cmd_merge(args) -> None:
    from training.merge import merge

    export_dir = merge(args.jobs, args.out, base=args.base)
    print(f"merged export: {export_dir}")


def cmd_ingest(args) -> None:
    from membank.signing import load_signing_key
    from services.bank_server.ingest import ingest

    key = load_signing_key(args.signing_key) if args.signing_key else None
    ingest(args.export, args.lmdb, signing_key=key)


def cmd_keygen(args) -> None:
    from membank.signing import key_id, load_public_key, write_key_pair

    private, public = write_key_pair(args.out, args.name)
    print(f"key id {key_id(load_public_key(public))}\n  private (0600, keep it with the "
          f"operator; ingest --signing-key): {private}\n  public (pin it on devices: "
          f"--trusted-keys / MEMBANK_CLIENT_TRUSTED_KEYS): {public}")


def cmd_dev_secrets(args) -> None:
    from membank.secrets import write_dev_secrets

    names = [n.strip() for n in args.names.split(",") if n.strip()]
    paths = write_dev_secrets(args.out, names)
    print(f"TLS certificate (self-signed; devices pass it as --tls-ca) {paths['tls.crt']}, key "
          f"{paths['tls.key']}; tokens {paths['read-token']}, {paths['admin-token']}")


def cmd_serve(args) -> None:
    from services.bank_server.server import main as serve_main

    serve_main(args.server_args)


def cmd_generate(args) -> None:
    from pydantic import ValidationError

    from services.model_client.memory_model import MemoryModel
    from services.model_client.settings import DeviceSettings

    token = Path(args.token_file).read_text().strip() if args.token_file else None  # never on argv
    # the device's one bank builder (as chat and device-serve; targets.open_bank): BankClient /
    # DataPlaneClient for one target, a ShardedFetcher (hedging, failover) for
    # shard=TARGET,...; bad syntax is a one-line ValueError before the model loads
    try:
        settings = DeviceSettings(bank=args.bank or [], bank_timeout_s=args.timeout, token=token,
                                  tls_ca=args.tls_ca, trusted_keys=args.trusted_keys or [],
                                  allow_unsigned=args.allow_unsigned,
                                  allow_insecure_token=args.allow_insecure_token,
                                  edge_cache=args.edge_cache)
    except ValidationError as e:
        err = e.errors()[0]
        flag = {"bank_timeout_s": "--timeout", "tls_ca": "--tls-ca", "token": "--token-file"}.get(
            str(err["loc"][0]) if err["loc"] else "", "--bank")
        raise ValueError(f"{flag}: {err['msg'].removeprefix('Value error, ')}") from None
    bank = settings.open_bank()
    try:
        model = MemoryModel.from_pretrained(args.model, encoding=args.encoding,
                                            trust=settings.trust(), dtype=args.dtype)
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, stop=tuple(args.stop or ()), seed=args.seed)
        result = model.generate(args.prompt, bank=bank, use_memory=not args.no_memory,
                                ttft_budget_ms=args.ttft_budget_ms, **kw)
    finally:
        if bank is not None:
            bank.close()
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(args.prompt)
        print_result("with memory" if result.memory else "anchor only", result)


def cmd_chat(args) -> None:
    from services.model_client.chat import main as chat_main

    chat_main(args.chat_args)


def cmd_device_serve(args) -> None:
    from services.model_client.http_server import main as device_main

    device_main(args.device_args)


def cmd_demo(args) -> None:
    from membank_cli.demo import run_demo

    run_demo(out_dir=args.out, force=args.force)


def cmd_eval(args) -> None:
    from training.config import TrainConfig, apply_override
    from training.domains import BUILTIN
    from training.evaluate import DomainFiles, corpus_override, eval_preset, run_eval

    ec = eval_preset(args.preset)
    if args.set:  # key=value overrides of the training fields, as for `membank train`;
        # corpus.KEY=VALUE sets a long-tail corpus field (training/longtail.py LongTailConfig)
        tc = TrainConfig(**ec.train)
        for item in args.set:
            if item.startswith("corpus."):
                ec.corpus = corpus_override(ec.corpus, item)
            else:
                apply_override(tc, item)
        ec.train = {k: v for k, v in tc.to_dict().items() if k != "corpus"}
    if args.seeds:
        try:
            ec.seeds = tuple(int(x) for x in args.seeds.split(","))
        except ValueError:
            raise ValueError(f"--seeds takes comma-separated integers, "
                             f"not {args.seeds!r}") from None
    if args.builtin_domains is not None:
        names = (() if args.builtin_domains in ("", "none")
                 else tuple(args.builtin_domains.split(",")))
        unknown = [n for n in names if n not in BUILTIN]
        if unknown:
            raise ValueError(f"unknown built-in domain {unknown[0]!r}; "
                             f"built-in: {', '.join(BUILTIN)} (or none)")
        ec.corpus = {**ec.corpus, "domains": names}
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        ec.threads = args.threads
    if args.jobs is not None:
        if args.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
        ec.jobs = args.jobs
    domains = [DomainFiles.parse(spec) for spec in args.domain or []]
    run_eval(args.out or f"runs/eval-{args.preset}", ec, domains=domains, results=args.results,
             preset=args.preset)


def cmd_eval_scaling(args) -> None:
    from training.evaluate import DomainFiles
    from training.scaling import run_scaling

    try:
        seeds = tuple(int(x) for x in args.seeds.split(","))
        grid = (tuple(tuple(int(r) for r in point.split(",")) for point in args.grid)
                if args.grid else None)
    except ValueError:
        raise ValueError("--seeds takes comma-separated integers, "
                         "--grid comma-separated ranks") from None
    run_scaling(args.out or f"runs/scaling-{args.preset}", args.preset, grid=grid, seeds=seeds,
                domains=[DomainFiles.parse(spec) for spec in args.domain or []],
                results=args.results)


def cmd_config(args) -> None:
    import torch

    from membank.config import DTYPES, get_preset
    from membank.nn.model import Transformer

    cfg = get_preset(args.name)
    if args.kind:
        cfg.memory.kind = args.kind
        cfg.validate()
    m, mc = cfg.model, cfg.memory
    with torch.device("meta"):  # shapes only: nothing is allocated
        n_params = Transformer(cfg).num_params()
    sizes, nbytes = mc.sizes(m), DTYPES[mc.dtype]
    layers = mc.mem_layers(m.n_layer)
    print(f"{args.name}: anchor {n_params:,} params  (layers {m.n_layer}, d {m.d_model}, "
          f"heads {m.n_head} x {m.head_dim}, ffn {m.d_ff}, vocab {m.vocab_size}, "
          f"tied {m.tie_embeddings})")
    print(f"memory: {mc.kind}, {len(layers)} of {m.n_layer} layers ({mc.placement}), "
          f"k {mc.branching}, ranks {tuple(mc.ranks)}, {mc.dtype}")
    print(f"  {'level':>5} {'nodes':>10} {'block shape':>22} {'block params':>15} "
          f"{'level params':>17}")
    for level, block in enumerate(sizes["block_params_per_level"], start=1):
        shape = "x".join(map(str, mc.block_shape(m, level)))
        print(f"  {level:>5} {mc.n_nodes(level):>10,} {shape:>22} {block:>15,} "
              f"{block * mc.n_nodes(level):>17,}")
    for name in ("bank", "fetch"):
        n = sizes[f"{name}_params"]
        print(f"  {name:<5} {n:>15,} params  {n * nbytes / 1e6:>12,.2f} MB in {mc.dtype}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="membank", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("train",
                       help="train anchor + bank and export (torchrun for data parallelism)")
    s.add_argument("--config", default="demo",
                   help="training preset (tiny, demo, paper-160m, ...) "
                        "or a JSON file of TrainConfig fields")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a TrainConfig field (model.FIELD / memory.FIELD for shapes)")
    s.add_argument("--corpus", default=None, metavar="FILE.jsonl",
                   help='train on this corpus, one {"text": ...} per line (default: the elements)')
    s.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --out")
    s.add_argument("--force", action="store_true", help="retrain even if a cached run matches")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("merge", help="merge frozen-anchor subtree jobs into one bank and export it")
    s.add_argument("jobs", nargs="+", help="subtree job run directories (or checkpoints)")
    s.add_argument("--out", required=True)
    s.add_argument("--base", default=None,
                   help="checkpoint the jobs started from (default: their init_from)")
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("ingest", help="ingest an export's blocks into an LMDB bank store")
    s.add_argument("export")
    s.add_argument("--lmdb", required=True)
    s.add_argument("--signing-key", default=None,
                   help="the operator's Ed25519 private key (membank keygen): sign the manifest")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser("keygen", help="write a new Ed25519 signing key pair (private key 0600)")
    s.add_argument("--out", required=True, help="directory (created)")
    s.add_argument("--name", default="membank", help="file name prefix (then the key id)")
    s.set_defaults(func=cmd_keygen)

    s = sub.add_parser("dev-secrets", help="a self-signed TLS certificate and read/admin "
                       "tokens for a one-host stack (docker-compose.yml); kept if present")
    s.add_argument("--out", required=True, help="directory (created)")
    s.add_argument("--names", default="localhost,127.0.0.1",
                   help="comma-separated DNS names and IP addresses the certificate names")
    s.set_defaults(func=cmd_dev_secrets)

    s = sub.add_parser("serve", help="run a bank shard; flags are the bank server's own",
                       add_help=False)
    s.add_argument("server_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("generate", help="route, fetch, attach and decode one prompt")
    s.add_argument("prompt")
    s.add_argument("--model", default="runs/demo/export", help="export directory")
    s.add_argument("--bank", default=None,
                   help="bank server target: host:port (gRPC), or host:port+DATAPLANE_PORT to "
                        "fetch block bodies over the server's raw-TCP data plane (its "
                        "--dataplane-port); several shards: shard-0=TARGET,shard-1=TARGET; "
                        "none: anchor only")
    s.add_argument("--no-memory", action="store_true")
    s.add_argument("--max-new-tokens", type=int, default=16)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--timeout", type=float, default=5.0, help="bank deadline in seconds")
    s.add_argument("--token-file", default=None, help="file holding the bank's read token")
    s.add_argument("--tls-ca", default=None, help="CA certificate (PEM) to verify a TLS bank")
    s.add_argument("--trusted-keys", default=None,
                   help="the operator's public keys (files or directories, comma separated): "
                        "only manifests they signed are used")
    s.add_argument("--allow-unsigned", action="store_true",
                   help="development only: use unsigned manifests")
    s.add_argument("--allow-insecure-token", action="store_true",
                   help="send the token without TLS (default: a token without --tls-ca uses "
                        "TLS with the system roots)")
    s.add_argument("--encoding", choices=["native", "int8"], default="native",
                   help="block encoding to fetch: int8 = per-row scales, dequantized here (the "
                        "bank must be ingested with --encodings int8, else native is fetched)")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the model's and the memory room's dtype (bfloat16 halves them, and a "
                        "bfloat16 bank's blocks land in the room uncopied)")
    s.add_argument("--edge-cache", default=None,
                   help="URL of an HTTP cache in front of the bank: blocks are asked of it "
                        "first by content address and verified")
    s.add_argument("--ttft-budget-ms", type=float, default=None,
                   help="time to first token allowed: the path's levels verified by then are "
                        "attached, the rest left out of this answer (default: the whole path)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("chat", add_help=False,
                       help="a REPL on stdin: each line a prompt, the reply streamed "
                            "(membank chat --help)")
    s.add_argument("chat_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("device-serve", add_help=False,
                       help="the device's HTTP API (FastAPI, SSE streaming) "
                            "(membank device-serve --help)")
    s.add_argument("device_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_device_serve)

    s = sub.add_parser("config", help="print a preset's anchor params and bank / fetch sizes")
    s.add_argument("name", help="preset: tiny, demo, paper-160m, paper-410m, paper-1.4b")
    s.add_argument("--kind", default=None, help="memory kind: ffn, lora-qk, lora-ov, lora-ffn, kv")
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("eval", help="long-tail evaluation: "
                                    "anchor vs generic vs fetched vs dense vs blocked")
    s.add_argument("--preset", default="small",
                   help="smoke (pipeline check) or small (the published run)")
    s.add_argument("--out", default=None,
                   help="run directory (default runs/eval-PRESET); reruns resume")
    s.add_argument("--results", default=None,
                   help="results JSON (default OUT/longtail.json; .md, .png beside)")
    s.add_argument("--domain", action="append", metavar="CORPUS:PROBE[:HELDOUT]",
                   help='a domain of your own, added to the mix (repeatable): a JSONL corpus '
                        '({"text"[, "subject"]} per line), a probe JSON (training/probes.py) and '
                        'optionally held-out JSONL for perplexity')
    s.add_argument("--builtin-domains", default=None, metavar="NAMES",
                   help="comma-separated built-in domains to mix in (default: the preset's; none: "
                        "only --domain ones)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a training field, or a corpus field as corpus.KEY=VALUE")
    s.add_argument("--seeds", default=None, help="comma-separated seeds, one whole run each, "
                   "pooled (default: the preset's)")
    s.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: the preset's, 2); a run reproduces bit for bit at "
                        "the same thread count")
    s.add_argument("--jobs", type=int, default=None,
                   help="seeds trained at once, each in its own process with threads/jobs "
                        "threads (default 1: one after the other, in this process)")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("eval-scaling",
                       help="probe accuracy and perplexity against bank and fetch size")
    s.add_argument("--preset", default="small",
                   help="the evaluation preset whose corpus and schedule it uses")
    s.add_argument("--out", default=None,
                   help="run directory (default runs/scaling-PRESET); reruns resume")
    s.add_argument("--results", default=None,
                   help="results JSON (default OUT/scaling.json; .md, .png beside)")
    s.add_argument("--grid", action="append", metavar="R1,R2",
                   help="ranks per level of one bank (repeatable; default: the preset's grid)")
    s.add_argument("--domain", action="append", metavar="CORPUS:PROBE[:HELDOUT]",
                   help="as for eval")
    s.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    s.set_defaults(func=cmd_eval_scaling)

    s = sub.add_parser("demo", help="train (or reuse), export, serve, and answer prompts")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--force", action="store_true")
    s.set_defaults(func=cmd_demo)
    return p


# commands whose own parser reads every flag (argparse's REMAINDER refuses a leading --flag,
# so `membank serve --lmdb X` would fail): the rest of argv is handed over untouched
_FORWARDED = {"serve": "server_args", "chat": "chat_args", "device-serve": "device_args"}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _FORWARDED:
        args = build_parser().parse_args(argv[:1])
        setattr(args, _FORWARDED[argv[0]], argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, no traceback wall
        print(f"membank {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
