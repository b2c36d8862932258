"""Training checkpoints: one directory per checkpoint, tensors in safetensors, the rest in JSON.

    <run>/ckpt/
      anchor-end/  cotrain-end/  frozen-end/   the state at the end of each phase (always kept)
      step-0000150/                            periodic (TrainConfig.ckpt_every), newest kept
        state.safetensors   model.*, bank.level{l}, generic, opt.dense.*, opt.bank.*
        state.json          {"format", "config", "train", "phase", "phase_step", "global_step",
                             "sampler", "losses", "data", "bank_offsets", "tensors": skeleton}

A checkpoint is written into `<name>.tmp/` and renamed into place, so a crash never leaves a
directory that looks complete. `reader(path)` reads tensors lazily from the memory-mapped file,
one tensor or one row range at a time: a subtree job loads only its rows of a paper-scale bank
(1/16 of 9 GB) and a merge holds one job's level at a time. Nothing is pickled: nested state
(optimizer state dicts) is split into tensors, stored by dotted key, and a JSON skeleton that
says where each tensor goes.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORMAT = "membank.checkpoint/1"
TENSORS = "state.safetensors"
STATE = "state.json"


# -- nested state <-> (JSON skeleton, flat tensors) --------------------------------------------
def flatten(obj, prefix: str, tensors: dict[str, torch.Tensor]):
    """Replace every tensor in obj by {"__tensor__": key}, collecting it in `tensors`."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().contiguous()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        # torch optimizer state is keyed by int parameter index
        return {"__items__": [[k, flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    return obj


def unflatten(skeleton, tensors: dict[str, torch.Tensor]):
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        if set(skeleton) == {"__items__"}:
            return {k: unflatten(v, tensors) for k, v in skeleton["__items__"]}
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


# -- files -------------------------------------------------------------------------------------
def save(path: str | Path, tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write a checkpoint directory atomically (temp name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
    (tmp / STATE).write_text(json.dumps({"format": FORMAT, **state}, indent=1))
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def is_checkpoint(path: Path) -> bool:
    return ((path / STATE).is_file() and (path / TENSORS).is_file()
            and not path.name.endswith((".tmp", ".old")))


def read_state(path: str | Path) -> dict:
    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE} + {TENSORS})")
    try:
        state = json.loads((path / STATE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / STATE} is not valid JSON: {e}") from None
    if state.get("format") != FORMAT:
        raise ValueError(f"{path} has format {state.get('format')!r}, expected {FORMAT!r}")
    return state


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of a checkpoint in memory, and its state (small checkpoints; see `reader`)."""
    state = read_state(path)
    return load_file(str(Path(path) / TENSORS)), state


class TensorReader:
    """A checkpoint's tensors, read on demand from the memory-mapped safetensors file: each call
    copies only the bytes of what it returns."""

    def __init__(self, handle):
        self._f = handle

    def keys(self) -> list[str]:
        return list(self._f.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._f.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._f.get_tensor(key)

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of a tensor (its first axis) without reading the other rows."""
        shape = self.shape(key)
        if not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"rows {start}..{stop} outside {key} of {shape[0]} rows")
        return self._f.get_slice(key)[start:stop]

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose key starts with `prefix`, keyed as in the file."""
        return {k: self.get(k) for k in self.keys() if k.startswith(prefix)}


@contextmanager
def reader(path: str | Path) -> Iterator[TensorReader]:
    """`with reader(ckpt) as r: r.rows("bank.level2", a, b)`: lazy reads (see TensorReader)."""
    read_state(path)   # a complete checkpoint of this format, or a one-line error
    with safe_open(str(Path(path) / TENSORS), framework="pt") as f:
        yield TensorReader(f)


def checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(global step, path) of the complete checkpoints under root, oldest first."""
    root = Path(root)
    found = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if is_checkpoint(p):
            found.append((int(read_state(p)["global_step"]), p))
    return sorted(found, key=lambda x: (x[0], x[1].name.startswith("step-")))


def latest(root: str | Path) -> Path | None:
    found = checkpoints(root)
    return found[-1][1] if found else None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, given it, a `ckpt/` root, or a run directory (-> its latest)."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    for root in (path, path / "ckpt"):
        found = latest(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"no checkpoint at {path}")


def prune(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` periodic (step-*) checkpoints; phase ends are kept."""
    periodic = [p for _, p in checkpoints(root) if p.name.startswith("step-")]
    for p in periodic[:max(0, len(periodic) - keep)]:
        shutil.rmtree(p)


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'key: checkpoint X, this run Y' for every leaf where two config dicts differ."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, name + ".")
        elif (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            out.append(f"{name}: checkpoint {a!r}, this run {b!r}")
    return out


def check_same_config(path: Path, saved: dict, current: dict) -> None:
    diffs = config_differences(saved, current)
    if diffs:
        more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise ValueError(f"checkpoint {path} is from another config: {'; '.join(diffs[:3])}{more}")
