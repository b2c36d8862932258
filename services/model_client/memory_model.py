"""The device side: an anchor model that routes a prompt, fetches its memory, attaches it, decodes.

    model = MemoryModel.from_pretrained("runs/demo/export")
    with BankClient("localhost:50051") as bank:
        result = model.generate("The atomic number of Ruthenium is", bank=bank)
    print(result.text, result.timings_ms)

The prompt is embedded and routed on the device; the bank only ever sees block ids. Fetched
memory goes into room preallocated once, (1, L, n_mats, R, W), one slice of R per level, so a new
prompt copies only the levels whose node changed and never reallocates. A block is attached only
after its checksum matched the manifest (services/model_client/bank_client.py). When no bank can
be reached the model decodes anchor-only and says so in the result.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from membank import artifacts
from membank.blocks import tensor_from_buffer
from membank.config import Config
from membank.embed import Embedder
from membank.manifest import Manifest
from membank.model import KVCache, Transformer
from membank.router import Router
from services.model_client.bank_client import BankClient, BankError

log = logging.getLogger("membank.client")
EOS = "<|endoftext|>"


@dataclass
class GenerateResult:
    prompt: str
    text: str
    memory: bool                           # True when fetched memory was attached
    anchor_only_reason: str | None = None  # why memory was not used, if it was not
    path: list[int] | None = None
    fetched_blocks: list[tuple[int, int]] = field(default_factory=list)
    fetched_bytes: int = 0
    new_tokens: int = 0
    timings_ms: dict[str, float] = field(default_factory=dict)  # embed, route, fetch, attach, decode


class MemoryModel:
    def __init__(self, config: Config, model: Transformer, tokenizer: Tokenizer, router: Router,
                 local_manifest: Manifest | None = None, embedder: Embedder | None = None):
        self.config, self.model, self.tokenizer, self.router = config, model, tokenizer, router
        self.local_manifest = local_manifest
        self.embedder = embedder or Embedder()
        self.eos = tokenizer.token_to_id(EOS)
        mc, c = config.memory, config.model
        # preallocated room for a whole path, (1, L, n_mats, R, W) (FFN memories: (1, L, 3, R, C));
        # level l owns rows [offset_l, offset_l + r_l)
        self.mem = torch.zeros(mc.mem_shape(c))
        self.offsets = [sum(mc.ranks[:i]) for i in range(mc.depth)]
        self.attached: dict[int, tuple[str, int]] = {}  # level -> (version, node) now in self.mem

    @classmethod
    def from_pretrained(cls, export_dir: str | Path, embedder: Embedder | None = None) -> "MemoryModel":
        d = Path(export_dir)
        config = artifacts.load_config(d)
        model = Transformer(config)
        from safetensors.torch import load_file
        missing, unexpected = model.load_state_dict(load_file(str(d / artifacts.ANCHOR)), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.model.tie_embeddings)]
        if missing or unexpected:
            raise ValueError(f"anchor weights do not match the config: missing {missing}, unexpected {unexpected}")
        model.eval()
        router = Router.load(d / artifacts.ROUTER)
        manifest = artifacts.load_manifest(d) if (d / artifacts.MANIFEST).exists() else None
        return cls(config, model, Tokenizer.from_file(str(d / artifacts.TOKENIZER)), router, manifest, embedder)

    # -- routing -----------------------------------------------------------------------------
    def warmup(self) -> None:
        """Load the embedder and run one prompt through everything, so timings are steady-state."""
        self.embedder.encode(["warm up"])
        self.generate("warm up", bank=None, max_new_tokens=2, use_memory=False)

    def route(self, prompt: str, timings: dict[str, float]) -> list[int]:
        t0 = time.perf_counter()
        emb = self.embedder.encode([prompt])
        t1 = time.perf_counter()
        path = self.router.route(emb)[0].tolist()
        timings["embed"] = (t1 - t0) * 1e3
        timings["route"] = (time.perf_counter() - t1) * 1e3
        return path

    # -- memory ------------------------------------------------------------------------------
    def check_compatible(self, manifest: Manifest) -> None:
        mc, c = self.config.memory, self.config.model
        want = (mc.kind, c.d_model, mc.mem_layers(c.n_layer), mc.branching, list(mc.ranks))
        got = (manifest.kind, manifest.d_model, manifest.mem_layers, manifest.branching, manifest.ranks)
        if want != got or manifest.block_shape(1)[-1] != mc.layout(c)[1]:
            raise ValueError(f"bank {manifest.bank}/{manifest.version} (kind, d, layers, k, ranks)={got} "
                             f"does not fit this model {want}")

    def attach(self, manifest: Manifest, blocks: dict[tuple[int, int], bytearray]) -> None:
        """Copy verified blocks into the preallocated memory, level by level."""
        for (level, node), buf in blocks.items():
            block = tensor_from_buffer(buf, manifest.block_shape(level), manifest.dtype)  # (L, n, r, W)
            off, r = self.offsets[level - 1], manifest.ranks[level - 1]
            self.mem[0, :, :, off:off + r].copy_(block)
            self.attached[level] = (manifest.version, node)

    def fetch_path(self, bank: BankClient, path: list[int], result: GenerateResult) -> None:
        """Fetch the path's blocks that are not attached yet (one RPC) and attach them."""
        t0 = time.perf_counter()
        manifest = bank.get_manifest(self.bank_id, version="")
        self.check_compatible(manifest)
        wanted = manifest.path_blocks(path)
        missing = [(lv, n) for lv, n in wanted if self.attached.get(lv) != (manifest.version, n)]
        blocks = bank.fetch(manifest.bank, manifest.version, missing, manifest) if missing else {}
        t1 = time.perf_counter()
        self.attach(manifest, blocks)
        result.timings_ms["fetch"] = (t1 - t0) * 1e3
        result.timings_ms["attach"] = (time.perf_counter() - t1) * 1e3
        result.fetched_blocks = missing
        result.fetched_bytes = sum(len(b) for b in blocks.values())

    @property
    def bank_id(self) -> str:
        if self.local_manifest is None:
            raise ValueError("this export carries no manifest.json: the bank id is unknown")
        return self.local_manifest.bank

    # -- decoding ----------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, prompt: str, mem: torch.Tensor | None, max_new_tokens: int,
               temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> list[int]:
        """Prefill the prompt, then decode token by token with a KV cache; memory stays fixed."""
        ids = self.tokenizer.encode(prompt).ids
        limit = self.config.model.max_seq_len
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= limit:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's limit is {limit - 1}")
        max_new_tokens = min(max_new_tokens, limit - len(ids))
        cache = KVCache.empty(self.config.model, 1, len(ids) + max_new_tokens)
        gen = torch.Generator().manual_seed(seed)
        logits = self.model(torch.tensor([ids]), mem=mem, cache=cache)[:, -1]
        out: list[int] = []
        for _ in range(max_new_tokens):
            if temperature <= 0:
                nxt = int(logits.argmax(-1))
            else:
                scaled = logits / temperature
                if top_k:
                    kth = scaled.topk(top_k, dim=-1).values[..., -1:]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                nxt = int(torch.multinomial(scaled.softmax(-1), 1, generator=gen))
            if nxt == self.eos:
                break
            out.append(nxt)
            if len(out) == max_new_tokens:
                break
            logits = self.model(torch.tensor([[nxt]]), mem=mem, cache=cache)[:, -1]
        return out

    def generate(self, prompt: str, bank: BankClient | None = None, *, use_memory: bool = True,
                 max_new_tokens: int = 16, temperature: float = 0.0, top_k: int = 0,
                 seed: int = 0) -> GenerateResult:
        result = GenerateResult(prompt=prompt, text="", memory=False)
        t = result.timings_ms
        for step in ("embed", "route", "fetch", "attach"):
            t[step] = 0.0
        mem = None
        if not use_memory:
            result.anchor_only_reason = "memory disabled"
        elif bank is None:
            result.anchor_only_reason = "no bank configured"
        else:
            result.path = self.route(prompt, t)
            try:
                self.fetch_path(bank, result.path, result)
                mem, result.memory = self.mem, True
            except BankError as e:  # unreachable or failing bank: the device keeps working
                result.anchor_only_reason = f"bank unavailable: {e}"
                log.warning("decoding anchor-only: %s", result.anchor_only_reason)
        t0 = time.perf_counter()
        ids = self.decode(prompt, mem, max_new_tokens, temperature, top_k, seed)
        t["decode"] = (time.perf_counter() - t0) * 1e3
        result.text, result.new_tokens = self.tokenizer.decode(ids), len(ids)
        return result
