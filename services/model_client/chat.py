"""`membank chat`: a REPL over stdin. Each line is a prompt; the reply streams as it is decoded,
then one line of timings and memory info. Works with a bank (memory fetched per prompt; levels
shared with the previous prompt are not fetched again) or without one (anchor only).

    membank chat --model runs/demo/export --bank 127.0.0.1:50051 --max-new-tokens 32
    printf 'The atomic number of Ruthenium is\\nGold is\\n' | membank chat --model runs/demo/export

Empty lines are skipped; EOF or `/quit` ends it. A prompt the model cannot take (too long) gets a
one-line error on stderr and the REPL goes on. Device flags (--model, --bank, --token-file,
--tls-ca, ...) are `MEMBANK_CLIENT_*` settings (services/model_client/settings.py); run
`python -m services.model_client.chat --help` (or `membank chat --help`) for all of them.
"""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

from pydantic import ValidationError

from services.model_client.bank import Bank
from services.model_client.memory_model import GenerateResult, MemoryModel
from services.model_client.sampling import SamplingParams
from services.model_client.settings import DeviceSettings, add_arguments

STEPS = ("embed", "route", "fetch", "attach", "prefill", "decode")


def timings_line(r: GenerateResult) -> str:
    t = r.timings_ms
    steps = " ".join(f"{k} {t.get(k, 0.0):.1f}" for k in STEPS)
    rate = f", {r.new_tokens / t['decode'] * 1e3:.0f} tok/s" if t.get("decode") else ""
    memory = (f"memory: path {r.path}, fetched {len(r.fetched_blocks)} blocks "
              f"/ {r.fetched_bytes:,} B"
              + (f", levels {r.levels_attached} attached, {r.levels_pending} still fetching"
                 if r.levels_pending else "")
              if r.memory else f"anchor only ({r.anchor_only_reason})")
    return (f"[ttft {t.get('ttft', 0.0):.1f} ms | {steps} ms | {r.new_tokens} tokens{rate}, "
            f"{r.finish_reason} | {memory}]")


def run_chat(model: MemoryModel, bank: Bank | None, params: SamplingParams, *,
             use_memory: bool = True, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout,
             stderr: TextIO = sys.stderr, ttft_budget_ms: float | None = None) -> int:
    """Answer every line of `stdin`; returns the number of prompts answered.
    `ttft_budget_ms`: MemoryModel.generate_stream's."""
    interactive = stdin.isatty()
    answered = 0
    while True:
        if interactive:
            stderr.write("> ")
            stderr.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return answered
        prompt = line.rstrip("\r\n")
        if not prompt.strip():
            continue
        try:
            stream = model.generate_stream(prompt, bank, use_memory=use_memory, params=params,
                                           ttft_budget_ms=ttft_budget_ms)
        except ValueError as e:
            stderr.write(f"membank chat: error: {e}\n")
            continue
        for piece in stream:
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n" + timings_line(stream.result) + "\n")
        stdout.flush()
        answered += 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="membank chat", description="Chat with a membank model: one "
                                "prompt per line on stdin, the reply streamed, then its timings.")
    add_arguments(p, serve=False)
    p.add_argument("--no-memory", action="store_true", help="the anchor alone, no bank fetch")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    args = p.parse_args(argv)
    try:
        settings = DeviceSettings.from_namespace(args)  # MEMBANK_CLIENT_* under the flags
        params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, top_p=args.top_p, stop=tuple(args.stop or ()),
                                seed=args.seed)
        model = MemoryModel.from_pretrained(settings.export_dir, encoding=settings.encoding,
                                            trust=settings.trust(), dtype=settings.dtype,
                                            cache=settings.device_cache())
    except ValidationError as e:  # one line: the first bad setting and why
        err = e.errors()[0]
        p.exit(2, f"membank chat: error: {'.'.join(map(str, err['loc']))}: {err['msg']}\n")
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"membank chat: error: {e}\n")
    bank = settings.open_bank()
    try:
        run_chat(model, bank, params, use_memory=not args.no_memory,
                 ttft_budget_ms=settings.ttft_budget_ms)
    finally:
        if bank is not None:
            bank.close()


if __name__ == "__main__":
    main()
