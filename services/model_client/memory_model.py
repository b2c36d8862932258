"""The device side: an anchor model that routes a prompt, fetches its memory, attaches it, decodes.

    model = MemoryModel.from_pretrained("runs/demo/export", bank="localhost:50051")
    result = model.generate("The atomic number of Ruthenium is")
    print(result.text, result.timings_ms)
    model.close()                     # the bank's connections

    params = SamplingParams(max_tokens=64, temperature=0.7, top_p=0.9, stop=("\n",), seed=1)
    stream = model.generate_stream(prompt, bank=bank, params=params)  # text pieces as decoded
    for piece in stream:
        print(piece, end="", flush=True)
    print(stream.result.timings_ms)   # embed route fetch attach prefill decode ttft (ms)

The prompt is embedded and routed on the device; the bank only ever sees block ids. Fetched
memory goes into room preallocated once, (1, L, n_mats, R, W) in the model's dtype, one slice of
R per level, so a new prompt fetches only the levels whose node changed and never reallocates.
When the bank's dtype is the room's (e.g. `dtype="bfloat16"` for a bfloat16 bank) and there is no
device cache, a block is received straight into its slice (one piece per layer and matrix: a
bank.Scatter), so attaching it copies nothing; otherwise it is received into a buffer and copied
(converted, or dequantized for int8) into its slice. A level is detached before anything is
written into its slice, and attached only after its bytes matched the manifest's digest (the
Bank verifies it while receiving: services/model_client/bank.py),
and a manifest is used only when a key the device pins signed it (`trust`, membank/signing.py;
otherwise the answer is anchor-only and says why).
When no bank can be reached the model decodes anchor-only and says so in the result.

`bank` is a target string or {shard id: target} (services/model_client/targets.py open_bank),
or any Bank; `generate(prompt, bank=...)` takes another one for one prompt. Over shards, with
a device cache (services/model_client/fetcher.py, device_cache.py):

    model = MemoryModel.from_pretrained(export, bank={"s0": "10.0.0.1:50051",
                                                      "s1": "10.0.0.2:50051"},
                                        cache=DeviceCache(256 << 20, "~/.cache/membank"))
    result = model.generate(prompt)     # result.fetched_blocks / .cached_blocks

What the model keeps about a bank (the manifest, read once per `manifest_ttl_s`; the device
cache; which encoding a version has) is a CachedBank's (services/model_client/cached_bank.py),
one per bank: the model itself does route -> fetch -> attach -> decode. The decode loop is
membank/nn/decode.py's, the one the evaluation decodes with.

int8 blocks (membank/quant.py): `MemoryModel.from_pretrained(export, encoding="int8")` fetches
the int8 payloads the bank stored at ingest (about 1/2 the bytes of bfloat16 blocks, 1/4 of
float32), verifies them against the manifest's int8 checksums like native blocks, caches them as
they are, and dequantizes each one straight into its level's slice of the preallocated memory
(in the model's dtype) when attaching it. A bank version ingested without int8 is fetched in its
native dtype instead: a fleet keeps its memory (at full precision, more bytes) when a version
was published without `--encodings int8`; a warning is logged once per version and
`GenerateResult.encoding` says what was attached.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch
from tokenizers import Tokenizer

from membank import artifacts, quant
from membank.config import Config
from membank.manifest import Manifest
from membank.nn.decode import decode_steps
from membank.nn.embed import Embedder
from membank.nn.model import Transformer
from membank.nn.static_embed import embedder_for
from membank.nn.tensors import dequantize_into, tensor_from_buffer, torch_dtype
from membank.router import Router
from membank.signing import Trust
from services.model_client.bank import (
    Bank,
    BankError,
    Block,
    BlockIntegrityError,
    IncompatibleBankError,
    Scatter,
    UntrustedManifestError,
)
from services.model_client.cached_bank import Attached, CachedBank
from services.model_client.detokenize import IncrementalDecoder
from services.model_client.device_cache import DeviceCache
from services.model_client.sampling import SamplingParams, StopMatcher, select_token
from services.model_client.targets import open_bank

log = logging.getLogger("membank.client")
EOS = "<|endoftext|>"
DTYPES = ("float32", "bfloat16")        # what a device may run the anchor and its room in
MAX_TTFT_BUDGET_MS = 600_000            # ten minutes: beyond, wait for the whole path


@dataclass
class GenerateResult:
    prompt: str
    text: str
    memory: bool                           # True when fetched memory was attached
    anchor_only_reason: str | None = None  # why memory was not used, if it was not
    path: list[int] | None = None
    version: str = ""                      # the bank version whose manifest fetched the path
    # the bank version each attached level of the path was checked against (its block is the
    # one that version lists there), level 1 first: one value unless a path mixed versions
    # (which CachedBank rules out; the compose test counts it)
    level_versions: list[str] = field(default_factory=list)
    fetched_blocks: list[tuple[int, int]] = field(default_factory=list)
    fetched_bytes: int = 0
    cached_blocks: list[tuple[int, int]] = field(default_factory=list)  # from the device cache
    # fetched in the background before this prompt needed them (a prefetch, or the levels an
    # earlier prompt's TTFT budget left behind)
    prefetched_blocks: list[tuple[int, int]] = field(default_factory=list)
    # the path's levels (with blocks) in the memory this answer was decoded with, and those a
    # TTFT budget left out: still fetching, attached by a later prompt (ttft_budget_ms)
    levels_attached: list[int] = field(default_factory=list)
    levels_pending: list[int] = field(default_factory=list)
    # the encoding of the blocks gathered for this prompt: "native" or "int8" (which can differ
    # from the model's setting when the bank version lacks it; see the module docstring)
    encoding: str = ""
    new_tokens: int = 0
    # embed, route, fetch, attach, prefill, decode (model time only, not the consumer's), and
    # ttft: from the start of the generation to the first token chosen
    timings_ms: dict[str, float] = field(default_factory=dict)
    finish_reason: str = ""                # "eos", "stop" (a stop string), "length" (max tokens)


class MemoryModel:
    def __init__(self, config: Config, model: Transformer, tokenizer: Tokenizer, router: Router,
                 local_manifest: Manifest | None = None, embedder: Embedder | None = None, *,
                 bank: Bank | None = None, cache: DeviceCache | None = None,
                 manifest_ttl_s: float = 5.0, encoding: str = "", trust: Trust | None = None,
                 anchor: str | None = None):
        """`bank`: the Bank `generate` uses when given none (None: anchor only). `cache`,
        `manifest_ttl_s`, `encoding`, `trust`: the settings of the CachedBank kept for each
        bank (services/model_client/cached_bank.py): the device block cache (None: only the
        attached levels are reused), how long a bank manifest is trusted before the next
        prompt re-reads it, the block encoding to fetch ("" / "native" or "int8"), the pinned
        signing keys (membank/signing.py; None: nothing pinned, every manifest refused, so
        every answer is anchor-only). `anchor`: what names this model's anchor
        (artifacts.anchor_id); a bank version whose manifest names another is refused (None:
        not checked)."""
        self.encoding = quant.normalize(encoding)
        self.anchor = anchor
        self.trust = trust if trust is not None else Trust()
        self.config, self.model, self.tokenizer, self.router = config, model, tokenizer, router
        self.bank, self.cache, self.manifest_ttl_s = bank, cache, manifest_ttl_s
        self._view: CachedBank | None = None      # the CachedBank of the last bank used
        self._view_lock = threading.Lock()
        self.local_manifest = local_manifest
        self.embedder = embedder or Embedder()
        self.eos = tokenizer.token_to_id(EOS)
        mc, c = config.memory, config.model
        # preallocated room for a whole path, (1, L, n_mats, R, W) (FFN memories: (1, L, 3, R, C)),
        # in the model's dtype; level l owns rows [offset_l, offset_l + r_l)
        self.mem = torch.zeros(mc.mem_shape(c), dtype=next(model.parameters()).dtype)
        self.offsets = [sum(mc.ranks[:i]) for i in range(mc.depth)]
        self._scatters: dict[int, Scatter] = {}   # level -> its slice as receivable pieces
        # level -> what its slice of self.mem holds (cached_bank.Attached), and the bank
        # version it was last checked against
        self.attached: dict[int, Attached] = {}
        self.level_versions: dict[int, str] = {}
        self._prefill_ms_per_token = 0.0     # measured on earlier prompts (TTFT budgets)

    @classmethod
    def from_pretrained(cls, export_dir: str | Path, embedder: Embedder | None = None, *,
                        bank: str | Mapping[str, str] | Bank | None = None,
                        timeout_s: float = 10.0, token: str | None = None,
                        cache: DeviceCache | None = None, manifest_ttl_s: float = 5.0,
                        encoding: str = "", trust: Trust | None = None,
                        dtype: str = "float32") -> "MemoryModel":
        """The model of an export. `bank`: a target or {shard id: target}, opened with
        targets.open_bank (`timeout_s`, `token`), or a Bank; None: anchor only. `dtype`
        ("float32" or "bfloat16"): the anchor's weights and the memory room."""
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        d = Path(export_dir)
        config = artifacts.load_config(d)
        model = Transformer(config)
        from safetensors.torch import load_file
        missing, unexpected = model.load_state_dict(load_file(str(d / artifacts.ANCHOR)),
                                                    strict=False)
        missing = [k for k in missing
                   if not (k == "lm_head.weight" and config.model.tie_embeddings)]
        if missing or unexpected:
            raise ValueError(f"anchor weights do not match the config: missing {missing}, "
                             f"unexpected {unexpected}")
        model.to(torch_dtype(dtype)).eval()
        router = Router.load(d / artifacts.ROUTER)
        if embedder is None:             # the one the tree was built with: MiniLM or static
            embedder = embedder_for(router.embedder, d)
        manifest = artifacts.load_manifest(d) if (d / artifacts.MANIFEST).exists() else None
        if isinstance(bank, (str, Mapping)):
            bank = open_bank(bank, timeout_s=timeout_s, token=token)
        return cls(config, model, Tokenizer.from_file(str(d / artifacts.TOKENIZER)), router,
                   manifest, embedder, bank=bank, cache=cache, manifest_ttl_s=manifest_ttl_s,
                   encoding=encoding, trust=trust, anchor=artifacts.anchor_id(d))

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
        got = (manifest.kind, manifest.d_model, manifest.mem_layers, manifest.branching,
               manifest.ranks)
        if want != got or manifest.block_shape(1)[-1] != mc.layout(c)[1]:
            raise ValueError(f"bank {manifest.bank}/{manifest.version} "
                             f"(kind, d, layers, k, ranks)={got} "
                             f"does not fit this model {want}")
        if manifest.anchor and self.anchor and manifest.anchor != self.anchor:
            raise ValueError(f"bank {manifest.bank}/{manifest.version} was trained with anchor "
                             f"{manifest.anchor[:19]}, this device runs {self.anchor[:19]}: "
                             f"update the device's export to the one published with it")

    def attach(self, manifest: Manifest, blocks: dict[tuple[int, int], bytearray],
               encoding: str = "", in_place: frozenset | set = frozenset()) -> None:
        """Copy verified blocks (in `encoding`) into the preallocated memory, level by level;
        int8 payloads are dequantized straight into their slice, in the model's dtype. A block
        is checked whole (size, scales) before its slice is written. Blocks in `in_place` were
        received into their slice already (_room_dest): they are only marked attached."""
        for (level, node), buf in blocks.items():
            if (level, node) in in_place:
                self.attached[level] = (manifest.bank, manifest.content_id(level, node, encoding))
                continue
            shape = manifest.block_shape(level)                              # (L, n, r, W)
            off, r = self.offsets[level - 1], manifest.ranks[level - 1]
            room = self.mem[0, :, :, off:off + r]
            self.attached.pop(level, None)
            if encoding == quant.INT8:
                dequantize_into(buf, shape, room)
            else:
                room.copy_(tensor_from_buffer(buf, shape, manifest.dtype))
            self.attached[level] = (manifest.bank, manifest.content_id(level, node, encoding))

    def _room_dest(self, manifest: Manifest, block: Block, encoding: str) -> Scatter | None:
        """Where to receive `block`: its level's slice of the room as a Scatter, when the
        bytes can land there as they are (native encoding, the room's dtype, little-endian
        host); else None (received into a buffer, then copied). The level is detached here:
        its slice is about to hold bytes that are not verified yet."""
        level = block[0]
        if (encoding != quant.NATIVE or sys.byteorder != "little"
                or torch_dtype(manifest.dtype) != self.mem.dtype):
            return None
        self.attached.pop(level, None)
        scatter = self._scatters.get(level)
        if scatter is None:
            off, r = self.offsets[level - 1], manifest.ranks[level - 1]
            room = self.mem[0, :, :, off:off + r]           # (L, n, r, W), strided in R
            # one contiguous (r, W) piece per (layer, matrix), in the block's byte order
            scatter = Scatter(piece.view(torch.uint8).numpy()
                              for per_layer in room for piece in per_layer)
            self._scatters[level] = scatter
        return scatter

    def bank_view(self, bank: Bank) -> CachedBank:
        """The CachedBank of `bank` (made on first use; another bank replaces it, and the old
        one's background fetches stop). Thread-safe: a prefetch may ask beside a prompt."""
        with self._view_lock:
            if self._view is None or self._view.bank is not bank:
                if self._view is not None:
                    self._view.inflight.close()
                self._view = CachedBank(bank, self.bank_id, cache=self.cache,
                                        manifest_ttl_s=self.manifest_ttl_s,
                                        encoding=self.encoding, check=self.check_compatible,
                                        trust=self.trust)
            return self._view

    def fetch_path(self, bank: Bank, path: list[int], result: GenerateResult,
                   deadline: float | None = None) -> None:
        """Attach the path's blocks that are not attached yet: from the device cache, then one
        fetch for the rest (one RPC per shard with a ShardedFetcher); BankError when the bank
        cannot give them (levels it was not fetching stay attached; a level it was receiving
        in place is left detached, and fetched again by the next prompt). `deadline`
        (time.monotonic()): attach what is verified by then; the rest keeps coming in the
        background (`result.levels_pending`)."""
        t0 = time.perf_counter()
        got = self.bank_view(bank).fetch_path(
            path, self.attached, dest=self._room_dest if deadline is None else None,
            deadline=deadline)
        t1 = time.perf_counter()
        self.attach(got.manifest, got.blocks, got.encoding, got.in_place)
        m = got.manifest
        result.version = m.version
        # the path's levels whose room holds the block this version lists there (kept from an
        # earlier prompt or attached now), each counted for this version
        result.levels_attached = [lv for lv, n in m.path_blocks(path) if self.attached.get(lv)
                                  == (m.bank, m.content_id(lv, n, got.encoding))]
        for lv in result.levels_attached:
            self.level_versions[lv] = m.version
        result.level_versions = [self.level_versions[lv] for lv in result.levels_attached]
        result.encoding = quant.label(got.encoding)
        result.cached_blocks, result.fetched_blocks = got.cached, got.fetched
        result.prefetched_blocks = got.prefetched
        result.fetched_bytes = got.fetched_bytes
        result.levels_pending = [lv for lv, _ in got.pending]
        result.timings_ms["fetch"] = (t1 - t0) * 1e3
        result.timings_ms["attach"] = (time.perf_counter() - t1) * 1e3

    @property
    def bank_id(self) -> str:
        if self.local_manifest is None:
            raise ValueError("this export carries no manifest.json: the bank id is unknown")
        return self.local_manifest.bank

    # -- decoding ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        """The prompt's token ids; ValueError (one line) when empty or too long for the model."""
        ids = self.tokenizer.encode(prompt).ids
        limit = self.config.model.max_seq_len
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= limit:
            raise ValueError(f"prompt has {len(ids)} tokens; the model's limit is {limit - 1}")
        return ids

    @torch.no_grad()
    def decode_tokens(self, ids: list[int], mem: torch.Tensor | None, params: SamplingParams,
                      timings: dict[str, float]) -> Iterator[int]:
        """Prefill `ids`, then yield new token ids one by one with a KV cache (EOS is yielded
        and ends it): membank/nn/decode.py's loop, one row, `params` choosing each token. The
        memory stays fixed for the whole prompt. `timings` gets prefill and decode (ms),
        counting model work only: the time a consumer spends between tokens is not decode
        time."""
        gen = None if params.greedy else params.generator()

        def choose(logits: torch.Tensor) -> torch.Tensor:           # (1, V) -> (1,)
            return torch.tensor([select_token(logits[0], params, gen)])

        steps = decode_steps(self.model, torch.tensor([ids]), mem, params.max_tokens, choose,
                             timings)
        try:
            for nxt in steps:
                token = int(nxt[0])
                yield token
                if token == self.eos:
                    return
        finally:
            steps.close()

    def decode(self, prompt: str, mem: torch.Tensor | None, max_new_tokens: int,
               temperature: float = 0.0, top_k: int = 0, seed: int = 0) -> list[int]:
        """The new token ids for `prompt` (EOS not included), without text or stop strings."""
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                seed=seed)
        return [t for t in self.decode_tokens(self.encode_prompt(prompt), mem, params, {})
                if t != self.eos]

    def memory_for(self, prompt: str, bank: Bank | None, use_memory: bool,
                   result: GenerateResult, deadline: float | None = None
                   ) -> torch.Tensor | None:
        """Route and fetch the prompt's memory; None (and the reason in `result`) for anchor
        only. `deadline` (time.monotonic()): the memory of the levels verified by then."""
        t = result.timings_ms
        for step in ("embed", "route", "fetch", "attach"):
            t[step] = 0.0
        if not use_memory:
            result.anchor_only_reason = "memory disabled"
            return None
        if bank is None:
            result.anchor_only_reason = "no bank configured"
            return None
        result.path = self.route(prompt, t)
        try:
            self.fetch_path(bank, result.path, result, deadline)
        except BankError as e:  # unreachable, failing or untrusted bank: the device keeps working
            what = ("untrusted manifest" if isinstance(e, UntrustedManifestError) else
                    "block failed verification" if isinstance(e, BlockIntegrityError) else
                    "bank does not fit this model" if isinstance(e, IncompatibleBankError) else
                    "bank unavailable")
            result.anchor_only_reason = f"{what}: {e}"
            log.warning("decoding anchor-only: %s", result.anchor_only_reason)
            return None
        if not result.levels_pending:
            result.memory = True
            return self.mem
        if not result.levels_attached:
            result.anchor_only_reason = (f"no level verified within the TTFT budget (levels "
                                         f"{result.levels_pending} still fetching)")
            return None
        result.memory = True
        return self.partial_memory(result.levels_attached)

    def partial_memory(self, levels: list[int]) -> torch.Tensor:
        """The room's rows of `levels` only, (1, L, n, R', W): a level left out contributes
        nothing (its neurons are absent, as in the evaluation's partial paths), whatever its
        slice holds. Levels 1..j are a view; any other set is copied."""
        mc = self.config.memory
        rows = [(self.offsets[lv - 1], self.offsets[lv - 1] + mc.ranks[lv - 1])
                for lv in sorted(levels)]
        if rows[0][0] == 0 and all(a == b for (_, b), (a, _) in zip(rows, rows[1:])):
            return self.mem[:, :, :, :rows[-1][1]]
        return torch.cat([self.mem[:, :, :, a:b] for a, b in rows], dim=3)

    def prefetch(self, prompt: str, *, max_bytes: int | None = None,
                 bank: Bank | None = None) -> "PrefetchResult":
        """Route a prompt as typed so far and start fetching its path's missing blocks in the
        background (shallow levels first, within `max_bytes`; None: the whole path), so the
        prompt once complete finds them cached. Returns at once; BankError when the bank's
        manifest cannot be read. `bank`: None, the model's own."""
        bank = self.bank if bank is None else bank
        if bank is None:
            raise ValueError("no bank configured: nothing to prefetch from")
        if not prompt.strip():
            raise ValueError("empty prompt")
        timings: dict[str, float] = {}
        path = self.route(prompt, timings)
        got = self.bank_view(bank).prefetch(path, self.attached, max_bytes)
        return PrefetchResult(path=path, version=got.version, encoding=got.encoding,
                              attached=got.attached, ready=got.ready, started=got.started,
                              over_budget=got.over_budget, started_bytes=got.started_bytes,
                              timings_ms=timings)

    def generate_stream(self, prompt: str, bank: Bank | None = None, *,
                        use_memory: bool = True, params: SamplingParams | None = None,
                        ttft_budget_ms: float | None = None) -> "GenerationStream":
        """Stream one generation: iterate for the text pieces; `.result` is complete afterwards.
        `bank`: this prompt's bank (None: the model's own, `self.bank`).

        `ttft_budget_ms`: the time to first token the caller allows. The levels of the path
        verified when it is spent, less the prefill this prompt is expected to take (measured
        on earlier prompts), are attached, the answer decoded with them, and the rest keeps
        coming in the background for the next prompt; `result.levels_attached` and
        `levels_pending` say which. None: wait for the whole path.

        The prompt is checked at once (ValueError when empty or too long); routing, fetching and
        decoding run as the stream is iterated. Not thread-safe: one generation at a time per
        model (the memory room and the attached levels are shared state)."""
        params = params or SamplingParams()
        ids = self.encode_prompt(prompt)
        result = GenerateResult(prompt=prompt, text="", memory=False)
        bank = self.bank if bank is None else bank
        if ttft_budget_ms is not None and not 0 <= ttft_budget_ms <= MAX_TTFT_BUDGET_MS:
            raise ValueError(f"ttft_budget_ms must be in [0, {MAX_TTFT_BUDGET_MS}], "
                             f"not {ttft_budget_ms}")
        return GenerationStream(self._stream(ids, bank, use_memory, params, result,
                                             ttft_budget_ms), result)

    def _stream(self, ids: list[int], bank: Bank | None, use_memory: bool,
                params: SamplingParams, result: GenerateResult,
                ttft_budget_ms: float | None = None) -> Iterator[str]:
        start = time.perf_counter()
        t = result.timings_ms
        deadline = None
        if ttft_budget_ms is not None:      # what is left for memory after the prefill
            deadline = (time.monotonic() + ttft_budget_ms / 1e3
                        - self._prefill_ms_per_token * len(ids) / 1e3)
        mem = self.memory_for(result.prompt, bank, use_memory, result, deadline)
        text = IncrementalDecoder(self.tokenizer)
        stop = StopMatcher(params.stop)
        pieces: list[str] = []
        result.finish_reason = "length"
        tokens = self.decode_tokens(ids, mem, params, t)
        try:
            for token in tokens:
                if "ttft" not in t:
                    t["ttft"] = (time.perf_counter() - start) * 1e3
                if token == self.eos:
                    result.finish_reason = "eos"
                    break
                result.new_tokens += 1
                piece = stop.feed(text.push(token))
                if piece:
                    pieces.append(piece)
                    yield piece
                if stop.stopped:
                    break
            if not stop.stopped:  # the end: what the decoder and the stop matcher held back
                tail = stop.feed(text.flush())
                tail += "" if stop.stopped else stop.flush()
                if tail:
                    pieces.append(tail)
                    yield tail
            if stop.stopped:
                result.finish_reason = "stop"
        finally:
            tokens.close()
            t.setdefault("ttft", (time.perf_counter() - start) * 1e3)
            result.text = "".join(pieces)
            if t.get("prefill"):         # the TTFT budget's estimate of the next prefill
                per_token = t["prefill"] / len(ids)
                self._prefill_ms_per_token = (per_token if not self._prefill_ms_per_token
                                              else 0.5 * (self._prefill_ms_per_token + per_token))

    def generate(self, prompt: str, bank: Bank | None = None, *, use_memory: bool = True,
                 max_new_tokens: int = 16, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, stop: tuple[str, ...] = (), seed: int | None = 0,
                 params: SamplingParams | None = None,
                 ttft_budget_ms: float | None = None) -> GenerateResult:
        """Generate to the end: the text and the timing breakdown (`params` wins over the rest;
        `ttft_budget_ms`: generate_stream's)."""
        params = params or SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                          top_k=top_k, top_p=top_p, stop=tuple(stop), seed=seed)
        stream = self.generate_stream(prompt, bank, use_memory=use_memory, params=params,
                                      ttft_budget_ms=ttft_budget_ms)
        for _ in stream:
            pass
        return stream.result

    def close(self) -> None:
        """Stop background fetches and close the model's own bank (`self.bank`), if any."""
        if self._view is not None:
            self._view.inflight.close()
        if self.bank is not None:
            self.bank.close()


@dataclass
class PrefetchResult:
    """What a prefetch found for the path of a partial prompt (blocks as (level, node))."""
    path: list[int]
    version: str
    encoding: str
    attached: list[tuple[int, int]]        # in the room already
    ready: list[tuple[int, int]]           # in the device cache, or on their way already
    started: list[tuple[int, int]]         # fetching now, in the background
    over_budget: list[tuple[int, int]]     # left out: beyond max_bytes
    started_bytes: int
    timings_ms: dict[str, float]           # embed, route


class GenerationStream:
    """The text pieces of one generation, as they are produced; `result` once it is exhausted.

        stream = model.generate_stream(prompt, bank=bank, params=SamplingParams(max_tokens=32))
        for piece in stream:
            print(piece, end="", flush=True)
        print(stream.result.timings_ms)

    Closing it early (or dropping it) stops decoding; `result` then holds what was produced.
    """

    def __init__(self, pieces: Iterator[str], result: GenerateResult):
        self._pieces, self.result = pieces, result

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def close(self) -> None:
        self._pieces.close()
