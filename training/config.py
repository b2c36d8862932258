"""The training config: one dataclass, named presets, JSON files and `key=value` overrides.

    membank train --config demo                          a preset (TRAIN_PRESETS, or any model
                                                         preset)
    membank train --config my.json --set cotrain_steps=50 --set model.n_layer=6

A JSON file holds TrainConfig fields; `"extends": "demo"` starts from a preset instead of the
defaults. `model` and `memory` are overrides of the model preset's ModelConfig / MemoryConfig
fields (`preset` names it), so a file can change shapes; `TrainConfig.model_config()` builds
and validates the result. Every bad name, type or shape is a ValueError that names it.

The defaults are the paper's recipe (PAPER.md section 6): AdamW (0.9, 0.95), clip 1.0, anchor
peak 5e-3 with weight decay 0.05, memory peak 1e-4 decaying to 1e-5 with weight decay 1e-3,
cosine schedules with warmup, a generic memory used with probability 1/17. The `demo` and
`tiny` presets raise the rates so that a few hundred CPU steps learn something.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from membank.config import PRESETS, Config, get_preset
from membank.router import ROUTINGS, Routing

Embedders = Literal["minilm", "static"]
EMBEDDERS: tuple[Embedders, ...] = typing.get_args(Embedders)
PHASES = ("anchor", "cotrain", "frozen")  # run in this order; a phase with 0 steps is skipped


@dataclass
class TrainConfig:
    preset: str = "demo"              # model preset (membank/config.py) the shapes start from
    model: dict = field(default_factory=dict)   # overrides of ModelConfig fields
    memory: dict = field(default_factory=dict)  # overrides of MemoryConfig fields
    corpus: str | None = None         # JSONL file, one {"text": ...} per line; None: the elements
    # how a query finds its path (membank/router.py): "centroid" descent (the paper's rule) or
    # "nearest-document" (the path of its nearest training document; the router indexes them)
    routing: Routing = "centroid"
    # what embeds documents and prompts (membank/nn/embed.py): MiniLM (the paper's), or the
    # static table distilled from it (membank/nn/static_embed.py), built into the run directory
    embedder: Embedders = "minilm"
    seed: int = 0
    batch_size: int = 16              # global batch (split over data-parallel ranks)
    seq_len: int = 128
    # phases (PHASES order): anchor pretraining, co-training anchor + bank (the main recipe),
    # then memory training with the anchor frozen
    anchor_steps: int = 300
    cotrain_steps: int = 300
    frozen_steps: int = 0
    warmup_steps: int = 30            # per phase, for every optimizer group
    # optimizer groups: AdamW (beta1, beta2), cosine from peak to min after warmup
    anchor_lr: float = 5e-3
    anchor_min_lr: float = 5e-4
    anchor_wd: float = 0.05
    cotrain_anchor_lr: float | None = None  # anchor peak while co-training; None: anchor_lr
    memory_lr: float = 1e-4           # bank and generic memory
    memory_min_lr: float = 1e-5
    memory_wd: float = 1e-3           # low decay helps memorisation
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0            # global norm over every trained tensor
    generic_prob: float = 1 / 17      # a sample uses the generic memory instead of its path
    # a sample sees no memory at all (0: the paper's recipe): the co-trained anchor keeps
    # working alone, as it must on a device that cannot reach its bank
    no_memory_prob: float = 0.0
    # frozen-anchor jobs per level-1 subtree: train only sequences routed into `subtree` and only
    # its blocks, starting from `init_from` (a run directory or checkpoint); merge with
    # `membank merge`
    subtree: int | None = None
    init_from: str | None = None
    ckpt_every: int = 0               # periodic checkpoints every n steps (0: phase ends only)
    keep_ckpts: int = 2               # periodic checkpoints kept (phase ends are always kept)
    bank: str = "demo"                # bank id and version written to the manifest
    version: str = "v1"
    threads: int = 0                  # torch threads; 0 = torch's default

    def model_config(self) -> Config:
        """The model preset with the `model` / `memory` overrides, validated."""
        base = get_preset(self.preset).to_dict()
        for section in ("model", "memory"):
            overrides = getattr(self, section)
            if not isinstance(overrides, dict):
                raise ValueError(f"{section} must be an object of field overrides, "
                                 f"got {overrides!r}")
            base[section].update(overrides)
        config = Config.from_dict(base)
        if self.seq_len > config.model.max_seq_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's max_seq_len "
                             f"{config.model.max_seq_len}")
        if self.subtree is not None and not 0 <= self.subtree < config.memory.branching:
            raise ValueError(f"subtree {self.subtree} is outside 0..{config.memory.branching - 1}")
        return config

    def validate(self) -> "TrainConfig":
        positive = ("batch_size", "seq_len", "anchor_lr", "anchor_min_lr", "memory_lr",
                    "memory_min_lr", "grad_clip")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("anchor_steps", "cotrain_steps", "frozen_steps", "warmup_steps", "ckpt_every",
                     "keep_ckpts", "threads", "anchor_wd", "memory_wd"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        if self.embedder not in EMBEDDERS:
            raise ValueError(f"embedder must be one of {', '.join(EMBEDDERS)}, "
                             f"got {self.embedder!r}")
        if not 0 <= self.generic_prob < 1:
            raise ValueError(f"generic_prob must be in [0, 1), got {self.generic_prob}")
        if not (0 <= self.no_memory_prob < 1 and self.generic_prob + self.no_memory_prob < 1):
            raise ValueError(f"no_memory_prob must be in [0, 1 - generic_prob), "
                             f"got {self.no_memory_prob}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.corpus is not None and not Path(self.corpus).is_file():
            raise FileNotFoundError(f"corpus file {self.corpus} does not exist")
        if self.steps == 0:
            raise ValueError("nothing to train: anchor_steps, cotrain_steps and frozen_steps "
                             "are all 0")
        if self.subtree is not None:
            if self.anchor_steps or self.cotrain_steps or not self.frozen_steps:
                raise ValueError("a subtree job trains the frozen-anchor phase only: "
                                 "set frozen_steps, and anchor_steps = cotrain_steps = 0")
            if self.init_from is None:
                raise ValueError("a subtree job needs init_from "
                                 "(the run or checkpoint all jobs start from)")
        self.model_config()
        return self

    @property
    def steps(self) -> int:
        return self.anchor_steps + self.cotrain_steps + self.frozen_steps

    def phase_steps(self) -> list[tuple[str, int]]:
        return [(p, getattr(self, f"{p}_steps")) for p in PHASES if getattr(self, f"{p}_steps") > 0]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Identifies a run's inputs, so a cached run is reused only when nothing changed."""
        corpus = file_sha256(self.corpus) if self.corpus else "elements"
        blob = json.dumps({"train": self.to_dict(), "model": self.model_config().to_dict(),
                           "corpus": corpus, "code": 2}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# presets

TRAIN_PRESETS: dict[str, dict] = {
    # tests: seconds on a CPU
    "tiny": dict(preset="tiny", bank="tiny", batch_size=8, seq_len=32, anchor_steps=20,
                 cotrain_steps=20, warmup_steps=2, anchor_lr=1e-2, anchor_min_lr=1e-3,
                 memory_lr=1e-2, memory_min_lr=1e-3),
    # make demo: about 3 minutes of training on 2 CPU cores. The paper's memory rate (1e-4) is
    # for billions of tokens; a few hundred small steps need a higher one.
    "demo": dict(preset="demo", bank="demo", batch_size=16, seq_len=128, anchor_steps=300,
                 cotrain_steps=300, warmup_steps=30, anchor_lr=3e-3, anchor_min_lr=3e-4,
                 memory_lr=3e-3, memory_min_lr=3e-4),
    # the paper's 160M recipe: 2,048-token sequences, 1M-token batches, 10k warmup
    "paper-160m": dict(preset="paper-160m", bank="paper-160m", batch_size=512, seq_len=2048,
                       warmup_steps=10_000),
}


def known_configs() -> list[str]:
    return sorted(set(TRAIN_PRESETS) | set(PRESETS))


def preset(name: str) -> TrainConfig:
    """A training preset; any model preset without one gets the paper defaults on its shapes."""
    if name in TRAIN_PRESETS:
        return TrainConfig(**TRAIN_PRESETS[name])
    if name in PRESETS:
        return TrainConfig(preset=name, bank=name)
    raise ValueError(f"unknown config {name!r}; known: {', '.join(known_configs())}, "
                     f"or a .json file")


def load_train_config(source: str, overrides: list[str] | None = None) -> TrainConfig:
    """A preset name or a JSON file, then `key=value` overrides; validated."""
    if source.endswith(".json") or Path(source).is_file():
        tc = from_file(source)
    else:
        tc = preset(source)
    for item in overrides or []:
        apply_override(tc, item)
    return tc.validate()


def from_file(path: str | Path) -> TrainConfig:
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"config file {path} is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a JSON object of training fields")
    base = data.pop("extends", None)
    tc = preset(base) if base is not None else TrainConfig()
    for key, value in data.items():
        set_field(tc, key, value, source=str(path))
    return tc


def apply_override(tc: TrainConfig, item: str) -> None:
    """`key=value` (value as JSON when it parses, else a string); `model.x=` / `memory.x=` set
    one shape field."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not key=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    section, dot, name = key.partition(".")
    if dot:
        if section not in ("model", "memory"):
            raise ValueError(f"unknown training option {key!r}: "
                             f"only model.* and memory.* are nested")
        getattr(tc, section)[name] = value  # the name is checked by model_config()
        return
    set_field(tc, key, raw if _field_type(key) is str else value, source="--set")


_TYPES = typing.get_type_hints(TrainConfig)


def _field_type(name: str):
    t = _TYPES.get(name)
    if typing.get_origin(t) is typing.Literal:   # a closed set of strings: checked by validate()
        return str
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


def set_field(tc: TrainConfig, name: str, value, source: str) -> None:
    if name not in _TYPES:
        raise ValueError(f"unknown training option {name!r} in {source}; "
                         f"known: {', '.join(_TYPES)}")
    want, optional = _field_type(name), type(None) in typing.get_args(_TYPES[name])
    if value is None and optional:
        setattr(tc, name, None)
        return
    ok = (isinstance(value, want) and not (want is int and isinstance(value, bool))) or \
         (want is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ValueError(f"training option {name!r} in {source} must be {want.__name__}, "
                         f"got {value!r}")
    setattr(tc, name, float(value) if want is float else value)
