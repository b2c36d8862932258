"""One generation result printed for people: the text, then the time of every step.

Used by `membank generate` and `membank demo`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the device stack (torch) loads only when a command needs it
    from services.model_client.memory_model import GenerateResult

STEPS = ("embed", "route", "fetch", "attach", "prefill", "decode", "ttft")


def print_result(label: str, r: GenerateResult) -> None:
    t = r.timings_ms
    steps = "  ".join(f"{k} {t.get(k, 0.0):7.2f} ms" for k in STEPS)
    print(f"  {label:<15} {r.text!r}")
    extra = f"path {r.path}, fetched {len(r.fetched_blocks)} blocks / {r.fetched_bytes:,} B" \
        if r.memory else f"anchor only ({r.anchor_only_reason})"
    if r.memory and r.levels_pending:
        extra += f"; levels {r.levels_attached} attached, {r.levels_pending} still fetching"
    print(f"  {'':<15} {steps}  [{extra}]")
