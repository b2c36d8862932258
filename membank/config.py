"""Typed model configs: the anchor's shape and the memory hierarchy's shape.

Named presets live in PRESETS; `get_preset("demo")` returns a fresh copy. Sizes follow
PAPER.md section 3: a level-l block holds 3 * n_mem_layers * d_model * r_l parameters.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


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


@dataclass
class MemoryConfig:
    branching: int = 4                     # k: children per tree node
    ranks: tuple[int, ...] = (64, 32)      # r_l: FFN neurons a level-l block adds; len = depth p
    layers: tuple[int, ...] | None = None  # anchor layers that carry memory; None = all
    dtype: str = "float32"                 # bank dtype on disk / on the wire

    @property
    def depth(self) -> int:
        return len(self.ranks)

    @property
    def fetch_rank(self) -> int:
        """Neurons per memory layer when a whole path is attached."""
        return sum(self.ranks)

    def mem_layers(self, n_layer: int) -> list[int]:
        return list(range(n_layer)) if self.layers is None else sorted(self.layers)

    def n_nodes(self, level: int) -> int:
        return self.branching ** level

    def validate(self, model: ModelConfig) -> None:
        if self.branching < 2:
            raise ValueError(f"branching must be >= 2, got {self.branching}")
        if not self.ranks or any(r < 0 for r in self.ranks):
            raise ValueError(f"ranks must be non-negative and non-empty, got {self.ranks}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        bad = [i for i in self.mem_layers(model.n_layer) if not 0 <= i < model.n_layer]
        if bad:
            raise ValueError(f"memory layers {bad} are outside 0..{model.n_layer - 1}")

    def sizes(self, model: ModelConfig) -> dict[str, int]:
        """Parameter counts: per-level block, whole bank, one fetched path."""
        c0 = 3 * len(self.mem_layers(model.n_layer)) * model.d_model
        block = [c0 * r for r in self.ranks]
        return {
            "block_params_per_level": block,
            "bank_params": sum(self.n_nodes(l + 1) * s for l, s in enumerate(block)),
            "fetch_params": sum(block),
        }


# bytes per element of the bank dtypes a block may be stored in
DTYPES = {"float32": 4, "bfloat16": 2}


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
    # the paper's 160M anchor with its (256, 64, 16, 0) hierarchy, k=16 (PAPER.md sections 3, 5)
    "paper-160m": Config(
        ModelConfig(vocab_size=50432, n_layer=35, n_head=12, head_dim_=32, d_model=512, d_ff=2048,
                    max_seq_len=2048),
        MemoryConfig(branching=16, ranks=(256, 64, 16, 0), dtype="bfloat16"),
    ),
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(sorted(PRESETS))}")
    return Config.from_dict(PRESETS[name].to_dict())
