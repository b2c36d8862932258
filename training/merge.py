"""Merge frozen-anchor subtree jobs into one bank (PAPER.md section 6).

With the anchor frozen, the level-1 subtrees share no trainable memory: a sequence routed into
subtree s fetches only blocks under level-1 node s, and those are a contiguous row range per
level (node ids below s at level l are s*k^(l-1) .. (s+1)*k^(l-1) - 1). So training runs as one
independent job per subtree, each holding and saving only its rows:

    membank train --config demo --out runs/base                       # anchor (+ co-training)
    membank train --config demo --out runs/sub0 --set init_from=runs/base \\
        --set anchor_steps=0 --set cotrain_steps=0 --set frozen_steps=300 --set subtree=0
    ...                                                                 # one job per subtree
    membank merge --out runs/merged runs/sub0 runs/sub1 ...

The merge starts from the base checkpoint the jobs started from (their `init_from`, or --base),
copies each job's rows over it, and writes a checkpoint and an export. Subtrees without a job
keep the base's blocks; the generic memory is the base's (subtree jobs do not train it). It
refuses jobs from another config, other data, another base anchor, unfinished jobs, and two
jobs for the same subtree.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from membank import artifacts
from membank.config import Config
from membank.nn.model import Transformer
from membank.router import Router
from training import checkpoint
from training.prepare import DATA_FILES


def merge(jobs: list[str | Path], out: str | Path, base: str | Path | None = None,
          log=print) -> Path:
    """Merge subtree jobs (run directories or checkpoints); returns the export directory.

    Memory: the merged output, plus one job's rows of one level (or one anchor tensor) at a
    time; checkpoints are read lazily (checkpoint.reader), never whole."""
    if not jobs:
        raise ValueError("merge needs at least one subtree job")
    paths = [checkpoint.resolve(p) for p in jobs]
    states = [checkpoint.read_state(p) for p in paths]
    base_path = checkpoint.resolve(base if base is not None else states[0]["train"]["init_from"])
    base_state = checkpoint.read_state(base_path)
    n_levels = len(base_state["config"]["memory"]["ranks"])
    if any(base_state["bank_offsets"][l] != 0 for l in range(n_levels)):
        raise ValueError(f"base {base_path} holds only part of the bank (a subtree job?)")

    with checkpoint.reader(base_path) as base_f:
        merged = {k: base_f.get(k) for k in base_f.keys() if k.startswith(("model.", "generic"))}
        seen: dict[int, Path] = {}
        for path, state in zip(paths, states):
            subtree = state.get("subtree")
            if subtree is None:
                raise ValueError(f"{path} is not a subtree job (no subtree in its state)")
            if subtree in seen:
                raise ValueError(f"subtree {subtree} comes twice: {seen[subtree]} and {path}")
            seen[subtree] = path
            if state["phase_index"] < len(state["phases"]):
                raise ValueError(f"subtree job {path} has not finished "
                                 f"(step {state['global_step']})")
            checkpoint.check_same_config(path, state["config"], base_state["config"])
            if state["data"] != base_state["data"]:
                raise ValueError(f"subtree job {path} was trained on other data than the base "
                                 f"{base_path}")
            with checkpoint.reader(path) as f:
                for key, t in merged.items():
                    if key.startswith("model.") and not torch.equal(f.get(key), t):
                        raise ValueError(f"subtree job {path} has another anchor than the base "
                                         f"{base_path} ({key})")

        for l in range(n_levels):
            key = f"bank.level{l + 1}"
            level = base_f.get(key)              # becomes the output level, job rows copied over it
            for path, state in zip(paths, states):
                with checkpoint.reader(path) as f:
                    rows, offset = f.get(key), state["bank_offsets"][l]
                level[offset:offset + rows.shape[0]] = rows
                del rows
            merged[key] = level
    log(f"merged subtrees {sorted(seen)} over base {base_path}")

    out = Path(out)
    state = {k: base_state[k] for k in ("config", "train", "data")}
    state.update({"phases": [], "phase_index": 0, "phase_step": 0,
                  "global_step": base_state["global_step"],
                  "sampler": {"epoch": 0, "pos": 0}, "bank_offsets": [0] * n_levels,
                  "subtree": None,
                  "losses": {f"subtree{st['subtree']}": sum(st["losses"].values(), [])
                             for st in states},
                  "optimizer": {"dense": None, "bank": None},
                  "merged": {str(s): str(p) for s, p in seen.items()}})
    checkpoint.save(out / "ckpt" / "merged", merged, state)

    base_run = base_path.parent.parent
    for name in DATA_FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(base_run / name, out / name)
    # export from the tensors in hand: reloading the checkpoint would hold the bank twice
    return _export(merged, state, out / "export", out)


def _export(tensors: dict[str, torch.Tensor], state: dict, export_dir: Path, run_dir: Path) -> Path:
    from training.export import export

    config = Config.from_dict(state["config"])
    model = Transformer(config)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items()
                           if k.startswith("model.")},
                          strict=False)
    levels = [tensors[f"bank.level{l + 1}"] for l in range(config.memory.depth)]
    train = state["train"]
    export(export_dir, config, model, levels, run_dir / artifacts.TOKENIZER,
           Router.load(run_dir / artifacts.ROUTER), bank_id=train["bank"], version=train["version"],
           generic=tensors.get("generic"), run_dir=run_dir)
    return export_dir
