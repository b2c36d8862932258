"""Typed model configs: the anchor's shape and the memory hierarchy's shape.

Named presets live in PRESETS; `get_preset("demo")` returns a fresh copy. Sizes follow
PAPER.md section 3: a level-l block holds 3 * n_mem_layers * d_model * r_l parameters for FFN
memories, and in general L * n_mats * width * r_l (see `block_layout`).

Memory kinds (PAPER.md section 4) and their block layout, one (L, n_mats, r_l, width) tensor per
tree node, rank r the concatenation axis across levels (d = d_model, a = attn_dim, f = d_ff):

    kind       n_mats  width  rows [0], [1], ... of each (r, width) slice
    ffn        3       d      W1m (gate), W2m (up), W3m^T (down, transposed)
    lora-qk    2       d + a  [A_q | B_q^T], [A_k | B_k^T]
    lora-ov    2       a + d  [A_v | B_v^T], [A_o | B_o^T]
    lora-ffn   3       d + f  [A_1 | B_1^T], [A_2 | B_2^T], [A_3 | B_3^T]
    kv         2       a      memory keys, memory values (head h owns columns h*D .. (h+1)*D)

For LoRA a targeted linear W (d_out x d_in) gets rank-r factors A (r x d_in) and B (d_out x r);
row i of its slice is [A[i, :] | B[:, i]], so the d_in + d_out sum is the same for every linear of
a kind and appending rank rows appends LoRA ranks (B A = sum over rows of B[:, i] A[i, :]).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    head_dim_: int | None = None  # None: d_model // n_head (the paper's 160M uses 12 x 32 at d 512)
    d_ff: int = 512          # SwiGLU inner width of the anchor FFN
    max_seq_len: int = 256
    rope_base: float = 1e5
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.head_dim_ or self.d_model // self.n_head

    @property
    def attn_dim(self) -> int:
        return self.n_head * self.head_dim

    def validate(self) -> None:
        if self.head_dim_ is None and self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")


# memory kinds: FFN memories (the method, the default), LoRA memories, KV memories
MemoryKind = Literal["ffn", "lora-qk", "lora-ov", "lora-ffn", "kv"]
MEMORY_KINDS: tuple[str, ...] = typing.get_args(MemoryKind)
# the anchor linears a LoRA memory patches, in block order (names of membank/nn/model.py modules)
LORA_TARGETS = {"lora-qk": ("wq", "wk"), "lora-ov": ("wv", "wo"), "lora-ffn": ("w1", "w2", "w3")}
LORA_ALPHA = 2.0  # PAPER.md section 4; the update is (alpha / R) B A with R the fetched rank
Placement = Literal["all", "first", "middle", "last"]
PLACEMENTS: tuple[str, ...] = typing.get_args(Placement)
Dtype = Literal["float32", "bfloat16"]    # the bank dtypes, bytes per element in DTYPES
N_MATS = {"ffn": 3, "lora-qk": 2, "lora-ov": 2, "lora-ffn": 3, "kv": 2}  # matrices per memory layer


def linear_dims(name: str, d_model: int, attn_dim: int, d_ff: int) -> tuple[int, int]:
    """(d_in, d_out) of an anchor linear by its module name."""
    return {"wq": (d_model, attn_dim), "wk": (d_model, attn_dim), "wv": (d_model, attn_dim),
            "wo": (attn_dim, d_model), "w1": (d_model, d_ff), "w2": (d_model, d_ff),
            "w3": (d_ff, d_model)}[name]


def block_layout(kind: str, d_model: int, attn_dim: int, d_ff: int) -> tuple[int, int]:
    """(n_mats, width) of one memory layer's (n_mats, r, width) slice; see the module docstring.

    The single definition of the block layout: MemoryConfig and Manifest both derive from it.
    """
    if kind == "ffn":
        return N_MATS[kind], d_model
    if kind == "kv":
        return N_MATS[kind], attn_dim
    if kind in LORA_TARGETS:  # every targeted linear of a kind has the same d_in + d_out
        return N_MATS[kind], sum(linear_dims(LORA_TARGETS[kind][0], d_model, attn_dim, d_ff))
    raise ValueError(f"memory kind must be one of {', '.join(MEMORY_KINDS)}, got {kind!r}")


@dataclass
class MemoryConfig:
    branching: int = 4                     # k: children per tree node
    ranks: tuple[int, ...] = (64, 32)      # r_l: rank a level-l block adds (FFN neurons, LoRA
                                           # rank or KV slots per layer); len = depth p
    layers: tuple[int, ...] | None = None  # anchor layers that carry memory, explicit; None:
                                           # placement
    dtype: Dtype = "float32"               # bank dtype on disk / on the wire
    kind: MemoryKind = "ffn"
    placement: Placement = "all"           # which layers carry memory when `layers` is None
    n_layers: int | None = None            # how many, for placement first / middle / last

    @property
    def depth(self) -> int:
        return len(self.ranks)

    @property
    def fetch_rank(self) -> int:
        """Neurons per memory layer when a whole path is attached."""
        return sum(self.ranks)

    def mem_layers(self, n_layer: int) -> list[int]:
        """The anchor layers that carry memory, ascending: the one source of truth.

        `layers` if given; else all layers, or the first / middle / last `n_layers` of them
        (middle: the n centred ones, rounding down towards the input).
        """
        if self.layers is not None:
            return sorted(self.layers)
        if self.placement == "all":
            return list(range(n_layer))
        n = self.n_layers or 0
        start = {"first": 0, "middle": (n_layer - n) // 2, "last": n_layer - n}[self.placement]
        return list(range(start, start + n))

    def layout(self, model: ModelConfig) -> tuple[int, int]:
        """(n_mats, width) of one memory layer for this kind and anchor."""
        return block_layout(self.kind, model.d_model, model.attn_dim, model.d_ff)

    def block_shape(self, model: ModelConfig, level: int) -> tuple[int, int, int, int]:
        """A level-l block: (L, n_mats, r_l, width)."""
        n_mats, width = self.layout(model)
        return (len(self.mem_layers(model.n_layer)), n_mats, self.ranks[level - 1], width)

    def mem_shape(self, model: ModelConfig, batch: int = 1) -> tuple[int, int, int, int, int]:
        """A fetched path's memory as the model takes it: (B, L, n_mats, R, width)."""
        n_mats, width = self.layout(model)
        return (batch, len(self.mem_layers(model.n_layer)), n_mats, self.fetch_rank, width)

    def manifest_fields(self, model: ModelConfig) -> dict:
        """The Manifest fields that follow from the config (export adds bank, version,
        checksums)."""
        return {"kind": self.kind, "d_model": model.d_model, "block_width": self.layout(model)[1],
                "mem_layers": self.mem_layers(model.n_layer), "branching": self.branching,
                "ranks": list(self.ranks), "dtype": self.dtype}

    def n_nodes(self, level: int) -> int:
        return self.branching ** level

    def validate(self, model: ModelConfig) -> None:
        if self.branching < 2:
            raise ValueError(f"branching must be >= 2, got {self.branching}")
        if not self.ranks or any(r < 0 for r in self.ranks):
            raise ValueError(f"ranks must be non-negative and non-empty, got {self.ranks}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        block_layout(self.kind, model.d_model, model.attn_dim, model.d_ff)  # raises on a bad kind
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, "
                             f"got {self.placement!r}")
        if self.placement != "all":
            if self.layers is not None:
                raise ValueError("give either explicit memory layers or a placement, not both")
            if self.n_layers is None or not 1 <= self.n_layers <= model.n_layer:
                raise ValueError(f"placement {self.placement!r} needs n_layers "
                                 f"in 1..{model.n_layer}, "
                                 f"got {self.n_layers}")
        bad = [i for i in self.mem_layers(model.n_layer) if not 0 <= i < model.n_layer]
        if bad:
            raise ValueError(f"memory layers {bad} are outside 0..{model.n_layer - 1}")

    def sizes(self, model: ModelConfig) -> dict[str, int]:
        """Parameter counts: per-level block, whole bank, one fetched path."""
        n_mats, width = self.layout(model)
        c0 = n_mats * len(self.mem_layers(model.n_layer)) * width  # parameters per unit of rank
        block = [c0 * r for r in self.ranks]
        return {
            "block_params_per_level": block,
            "bank_params": sum(self.n_nodes(l + 1) * s for l, s in enumerate(block)),
            "fetch_params": sum(block),
        }


# bytes per element of the bank dtypes a block may be stored in
DTYPES = {"float32": 4, "bfloat16": 2}
assert set(DTYPES) == set(typing.get_args(Dtype))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def validate(self) -> "Config":
        self.model.validate()
        self.memory.validate(self.model)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        def build(dc, values: dict):
            names = {f.name for f in dataclasses.fields(dc)}
            unknown = set(values) - names
            if unknown:
                raise ValueError(f"unknown {dc.__name__} field(s): {sorted(unknown)}")
            return dc(**values)

        unknown = set(d) - {"model", "memory"}
        if unknown:
            raise ValueError(f"unknown config section(s): {sorted(unknown)}")
        mem = dict(d.get("memory", {}))
        for key in ("ranks", "layers"):
            if mem.get(key) is not None:
                mem[key] = tuple(mem[key])
        return cls(build(ModelConfig, d.get("model", {})), build(MemoryConfig, mem)).validate()


PRESETS: dict[str, Config] = {
    # unit and integration tests: builds and trains in seconds
    "tiny": Config(
        ModelConfig(vocab_size=512, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=64),
        MemoryConfig(branching=2, ranks=(8, 4)),
    ),
    # make demo: a few minutes of training on 2 CPU cores
    "demo": Config(
        ModelConfig(vocab_size=2048, n_layer=4, n_head=4, d_model=128, d_ff=512, max_seq_len=128),
        MemoryConfig(branching=4, ranks=(64, 32)),
    ),
    # the paper's anchors with their hierarchies, k=16, p=4 (PAPER.md sections 3, 5); parameter
    # counts 163,510,016 / 411,665,408 / 1,439,893,504: the 160M ties its embeddings, the 410M and
    # 1.4B do not (tests/unit/test_model.py checks all three on the meta device)
    "paper-160m": Config(
        ModelConfig(vocab_size=50432, n_layer=35, n_head=12, head_dim_=32, d_model=512, d_ff=2048,
                    max_seq_len=2048),
        MemoryConfig(branching=16, ranks=(256, 64, 16, 0), dtype="bfloat16"),
    ),
    "paper-410m": Config(
        ModelConfig(vocab_size=50432, n_layer=24, n_head=16, d_model=1024, d_ff=2816,
                    max_seq_len=2048, tie_embeddings=False),
        MemoryConfig(branching=16, ranks=(512, 128, 32, 0), dtype="bfloat16"),
    ),
    "paper-1.4b": Config(
        ModelConfig(vocab_size=50432, n_layer=24, n_head=16, d_model=2048, d_ff=5632,
                    max_seq_len=2048, tie_embeddings=False),
        MemoryConfig(branching=16, ranks=(768, 256, 16, 0), dtype="bfloat16"),
    ),
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(sorted(PRESETS))}")
    return Config.from_dict(PRESETS[name].to_dict())
