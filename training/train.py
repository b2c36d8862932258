"""The training run: data -> phases of training with checkpoints -> loss curve -> export.

    membank train --config demo --out runs/demo                       (or a JSON config file)
    torchrun --standalone --nproc_per_node 2 -m membank_cli train --config demo --out runs/dp

Recipe (PAPER.md section 6). Phases run in order, each with its own optimizers and cosine
schedules: `anchor` (the anchor alone), `cotrain` (anchor + bank, the main recipe) and `frozen`
(bank with the anchor frozen; also run as one job per level-1 subtree, merged afterwards by
training/merge.py). One step:

1. the sampler draws a global batch of packed sequences, each carrying its path (node ids);
2. a seeded coin per sample (probability generic_prob = 1/17) sends it to the *generic memory*,
   one fetch-sized memory shared by all samples, instead of its own path: the fair baseline;
3. the rows its path fetches are copied out of the bank into leaf tensors (training/optim.py)
   and each sample's memory is the concatenation of its levels' rows, (B, L, n, R, W);
4. loss = summed next-token cross-entropy / target tokens in the *global* batch, so ranks of a
   data-parallel run sum their gradients (training/distributed.py);
5. gradients: dense all-reduce (anchor, generic), sparse all-gather of the fetched rows (bank);
   one global-norm clip over all of them; AdamW for the dense groups and the lazy AdamW for the
   bank, which touches only fetched rows (no decay, no moment drift for idle blocks).

Everything random is seeded by (seed, step) or (seed, epoch), so a checkpoint (training/
checkpoint.py) resumes bit for bit: weights, both optimizers, sampler position, step, losses.

Where the other pieces live: ARCHITECTURE.md ("Training").
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from membank.config import Config
from membank.nn.memory import MemoryBank, init_memory_
from membank.nn.model import Transformer
from training import checkpoint
from training.config import TrainConfig
from training.distributed import Dist
from training.export import anchor_state
from training.optim import FetchedRows, LazyAdamW, cosine_lr, fetch_rows
from training.packing import Packed, Sampler, pack  # noqa: F401  (pack: re-exported)

IGNORE = -100  # target id of padding positions


def lm_loss(model: Transformer, tokens, doc_ids, mem=None,
            normalizer: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy over non-padding targets: their mean, or their sum / normalizer."""
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[doc_ids[:, 1:] < 0] = IGNORE  # no loss on padding
    logits = model(x, mem=mem, doc_ids=doc_ids[:, :-1])
    if normalizer is None:
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                           reduction="sum") / normalizer


def generic_coins(seed: int, step: int, batch: int, prob: float,
                  none_prob: float = 0.0) -> torch.Tensor:
    """(batch,) int8 per sample of the global batch at `step`: 0 its fetched path, 1 the generic
    memory (probability prob), 2 no memory at all (none_prob); one uniform draw per sample, so a
    none_prob of 0 leaves the generic coins as they were."""
    if prob <= 0 and none_prob <= 0:
        return torch.zeros(batch, dtype=torch.int8)
    g = torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, step, 17]).generate_state(1)[0]))
    u = torch.rand(batch, generator=g)
    return (u < prob).to(torch.int8) + 2 * ((u >= prob) & (u < prob + none_prob)).to(torch.int8)


def subtree_rows(branching: int, level: int, subtree: int) -> slice:
    """The level-l nodes under level-1 node `subtree`: a contiguous range (children = i*k + c)."""
    width = branching ** (level - 1)
    return slice(subtree * width, (subtree + 1) * width)


@dataclass
class Batch:
    tokens: torch.Tensor     # (b, T+1) this rank's sequences
    doc_ids: torch.Tensor    # (b, T+1)
    node_ids: torch.Tensor   # (b, p) their paths
    n_generic: int           # after the path samples, n_generic samples use the generic memory
    n_none: int              # and the last n_none samples no memory at all
    n_targets: int           # target tokens in the global batch: the loss normaliser
    generic_used: bool       # any sample of the global batch uses the generic memory


class Trainer:
    """Model, bank, generic memory, optimizers and data order: everything a step needs and
    everything a checkpoint saves.

    The bank is held as plain tensors, one per level (N_l, L, n, r_l, W), updated in place by
    the lazy AdamW; `offsets[l]` is the node id of row 0 (non-zero in a subtree job, which holds
    only its subtree's rows).
    """

    def __init__(self, config: Config, tc: TrainConfig, packed: Packed, *, dist: Dist = Dist(),
                 data_fingerprint: str = "", init: Path | None = None, log=print):
        self.config, self.tc, self.dist, self.log = config, tc, dist, log
        self.data_fingerprint = data_fingerprint
        torch.manual_seed(tc.seed)
        self.model = Transformer(config)
        if tc.subtree is None:
            self.bank = [p.detach() for p in MemoryBank(config).levels]
            self.offsets = [0] * len(self.bank)
        else:
            self._restrict_to_subtree(tc.subtree)   # allocates only the subtree's rows
        self.generic = torch.nn.Parameter(
            init_memory_(torch.zeros(config.memory.mem_shape(config.model)), config))
        # subtree jobs train no generic memory: the merged bank keeps the base run's
        self.use_generic = tc.generic_prob > 0 and tc.subtree is None
        if init is not None:
            self.load(init, weights_only=True)      # a subtree job reads only its rows
        if tc.subtree is not None:
            packed = packed.subtree(tc.subtree)
        self.packed = packed
        self.sampler = Sampler(len(packed), tc.batch_size, tc.seed)
        if self.sampler.batch_size < dist.world:
            raise ValueError(f"a batch of {self.sampler.batch_size} sequences cannot be split "
                             f"over {dist.world} ranks")
        self.phases = tc.phase_steps()
        self.phase_index = self.phase_step = self.global_step = 0
        self.losses: dict[str, list[float]] = {name: [] for name, _ in self.phases}
        self.dense_opt: torch.optim.AdamW | None = None
        self.bank_opt: LazyAdamW | None = None

    def _restrict_to_subtree(self, subtree: int) -> None:
        """Hold only the rows under level-1 node `subtree` (1/k of the bank), never the whole
        bank: 9 GB at paper scale for a job that needs 1/16. Their random init is a placeholder:
        a subtree job always starts from init_from, whose rows `load` reads in."""
        mc, k = self.config.memory, self.config.memory.branching
        self.bank, self.offsets = [], []
        for level, r in enumerate(mc.ranks, start=1):
            rows = subtree_rows(k, level, subtree) if r else slice(0, 0)
            w = torch.zeros(rows.stop - rows.start, *mc.block_shape(self.config.model, level))
            self.bank.append(init_memory_(w, self.config))
            self.offsets.append(rows.start)

    # -- phases and optimizer groups ----------------------------------------------------------
    @property
    def phase(self) -> tuple[str, int]:
        return self.phases[self.phase_index]

    @property
    def done(self) -> bool:
        return self.phase_index >= len(self.phases)

    def _begin_phase(self) -> None:
        name, tc = self.phase[0], self.tc
        trains_anchor, uses_memory = name in ("anchor", "cotrain"), name in ("cotrain", "frozen")
        self.model.requires_grad_(trains_anchor)
        self.model.zero_grad(set_to_none=True)
        groups = []
        if trains_anchor:
            peak = (tc.cotrain_anchor_lr if name == "cotrain" and tc.cotrain_anchor_lr
                    else tc.anchor_lr)
            groups.append({"params": list(self.model.parameters()), "weight_decay": tc.anchor_wd,
                           "peak": peak, "floor": tc.anchor_min_lr / tc.anchor_lr})
        if uses_memory and self.use_generic:
            groups.append({"params": [self.generic], "weight_decay": tc.memory_wd,
                           "peak": tc.memory_lr, "floor": tc.memory_min_lr / tc.memory_lr})
        betas = (tc.beta1, tc.beta2)
        self.dense_opt = torch.optim.AdamW(groups, lr=tc.memory_lr, betas=betas) if groups else None
        self.bank_opt = (LazyAdamW(self.bank, tc.memory_lr, betas, weight_decay=tc.memory_wd)
                         if uses_memory else None)

    def _end_phase(self) -> None:
        self.phase_index += 1
        self.phase_step = 0
        self.dense_opt = self.bank_opt = None

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> float:
        if self.dense_opt is None and self.bank_opt is None:
            self._begin_phase()
        name, total = self.phase
        batch = self._next_batch(uses_memory=self.bank_opt is not None)
        mem, fetched = self._memory(batch) if self.bank_opt is not None else (None, None)
        loss = lm_loss(self.model, batch.tokens, batch.doc_ids, mem, normalizer=batch.n_targets)
        if self.dense_opt is not None:
            self.dense_opt.zero_grad(set_to_none=True)
        loss.backward()

        # gradients: dense (anchor, generic memory) all-reduced, fetched bank rows reduced sparsely
        dense = ([p for g in self.dense_opt.param_groups for p in g["params"]]
                 if self.dense_opt else [])
        if (batch.generic_used and self.generic.grad is None
                and any(p is self.generic for p in dense)):
            self.generic.grad = torch.zeros_like(self.generic)  # used on another rank only
        dense_grads = [p.grad for p in dense if p.grad is not None]
        rows = self._row_grads(fetched) if self.bank_opt is not None else []
        self.dist.all_reduce_(dense_grads)
        rows = self.dist.reduce_rows(rows)
        self._clip(dense_grads + [item[1] for item in rows if item is not None])

        self._set_lrs(total)
        if self.dense_opt is not None:
            self.dense_opt.step()
        if self.bank_opt is not None:
            self.bank_opt.step(rows, lr=self._lr(self.tc.memory_lr, self.tc.memory_min_lr, total))

        value = self.dist.sum_scalar(loss.item())
        self.losses[name].append(value)
        self.phase_step += 1
        self.global_step += 1
        return value

    def _next_batch(self, uses_memory: bool) -> "Batch":
        """This rank's slice of the next global batch; with memory, samples on their fetched path
        first and the generic-memory samples last (the loss is a sum, so order is free)."""
        idx = self.sampler.next()
        tokens, doc_ids, node_ids = (t[idx] for t in (self.packed.tokens, self.packed.doc_ids,
                                                      self.packed.node_ids))
        n_targets = int((doc_ids[:, 1:] >= 0).sum())                    # of the global batch
        prob = self.tc.generic_prob if uses_memory and self.use_generic else 0.0
        coins = generic_coins(self.tc.seed, self.global_step, len(idx), prob,
                              self.tc.no_memory_prob if uses_memory else 0.0)
        generic_used = bool((coins == 1).any())                          # the same on every rank
        mine = self.dist.shard(len(idx))
        tokens, doc_ids, node_ids, coins = tokens[mine], doc_ids[mine], node_ids[mine], coins[mine]
        order = torch.cat([(coins == c).nonzero()[:, 0] for c in (0, 1, 2)])
        return Batch(tokens[order], doc_ids[order], node_ids[order], int((coins == 1).sum()),
                     int((coins == 2).sum()), n_targets, generic_used)

    def _memory(self, batch: "Batch") -> tuple[torch.Tensor, FetchedRows | None]:
        """Per-sample memory (B, L, n, R, W): fetched rows for path samples, the generic one,
        then zeros (no effect: exactly the anchor alone) for the no-memory samples."""
        n_fetch = len(batch.tokens) - batch.n_generic - batch.n_none
        parts, fetched = [], None
        if n_fetch:
            fetched = fetch_rows(self.bank, batch.node_ids[:n_fetch], self.offsets)
            parts.append(fetched.memory())
        if batch.n_generic:
            parts.append(self.generic.expand(batch.n_generic, *self.generic.shape[1:]))
        if batch.n_none:
            parts.append(self.generic.new_zeros(batch.n_none, *self.generic.shape[1:]))
        return (torch.cat(parts) if len(parts) > 1 else parts[0]), fetched

    def _row_grads(self, fetched: FetchedRows | None
                   ) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        if fetched is not None:
            return fetched.grads()
        # nothing fetched on this rank (every sample used the generic memory): empty rows
        return [None if level.shape[3] == 0 else
                (torch.zeros(0, dtype=torch.int64), level.new_zeros(0, *level.shape[1:]))
                for level in self.bank]

    def _clip(self, grads: list[torch.Tensor]) -> None:
        if not grads:
            return
        total = torch.nn.utils.get_total_norm(grads)
        coef = torch.clamp(self.tc.grad_clip / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)

    def _lr(self, peak: float, low: float, total: int) -> float:
        return cosine_lr(self.phase_step, total, peak, self.tc.warmup_steps, low / peak)

    def _set_lrs(self, total: int) -> None:
        for g in self.dense_opt.param_groups if self.dense_opt else []:
            g["lr"] = cosine_lr(self.phase_step, total, g["peak"], self.tc.warmup_steps, g["floor"])

    # -- the loop ---------------------------------------------------------------------------
    def train(self, ckpt_root: Path | None = None, max_steps: int | None = None) -> None:
        """Run the remaining phases (or `max_steps` more steps), checkpointing into ckpt_root:
        every tc.ckpt_every steps and at each phase's end (after which the next phase starts)."""
        budget = max_steps if max_steps is not None else float("inf")
        while not self.done and budget > 0:
            name, total = self.phase
            bar = tqdm(total=total, initial=self.phase_step, desc=name, unit="step",
                       dynamic_ncols=True, disable=not self.dist.is_main)
            while self.phase_step < total and budget > 0:
                loss = self.step()
                budget -= 1
                bar.update()
                bar.set_postfix(loss=f"{loss:.3f}")
                every = self.tc.ckpt_every
                if (ckpt_root is not None and every and self.phase_step % every == 0
                        and self.phase_step < total):
                    self.save(ckpt_root / f"step-{self.global_step:07d}")
                    checkpoint.prune(ckpt_root, self.tc.keep_ckpts)
            bar.close()
            if self.phase_step == total:
                self._end_phase()
                if ckpt_root is not None:
                    self.save(ckpt_root / f"{name}-end")

    # -- checkpoints --------------------------------------------------------------------------
    def save(self, path: Path) -> Path:
        tensors = {f"model.{k}": v for k, v in anchor_state(self.model).items()}
        tensors.update({f"bank.level{l + 1}": t for l, t in enumerate(self.bank)})
        tensors["generic"] = self.generic.detach()
        optim = checkpoint.flatten(
            {"dense": self.dense_opt.state_dict() if self.dense_opt else None,
             "bank": self.bank_opt.state_dict() if self.bank_opt else None},
            "opt", tensors)
        state = {"config": self.config.to_dict(), "train": self.tc.to_dict(),
                 "data": self.data_fingerprint, "phases": self.phases,
                 "phase_index": self.phase_index, "phase_step": self.phase_step,
                 "global_step": self.global_step, "sampler": self.sampler.state_dict(),
                 "bank_offsets": self.offsets, "subtree": self.tc.subtree, "losses": self.losses,
                 "optimizer": optim}
        return checkpoint.save(path, tensors, state)

    def load(self, path: Path, weights_only: bool = False) -> None:
        """Weights (and, unless weights_only, the whole training state) from a checkpoint.

        Tensors are read lazily (checkpoint.reader): only this run's bank rows, and optimizer
        state only for a full resume, so a subtree job never reads the whole bank into memory."""
        state = checkpoint.read_state(path)
        check_resumable(path, state, self.config, None)
        if state["data"] != self.data_fingerprint:
            raise ValueError(f"checkpoint {path} was trained on other data "
                             f"(fingerprint {state['data']}, this run {self.data_fingerprint})")
        with checkpoint.reader(path) as f:
            model = {k[len("model."):]: v for k, v in f.prefixed("model.").items()}
            missing, unexpected = self.model.load_state_dict(model, strict=False)
            if unexpected or set(missing) - {"lm_head.weight"}:
                raise ValueError(f"checkpoint {path} does not fit the model: missing {missing}, "
                                 f"unexpected {unexpected}")
            self.generic.data.copy_(f.get("generic"))
            for l, level in enumerate(self.bank):
                key, offset = f"bank.level{l + 1}", state["bank_offsets"][l]
                saved = f.shape(key)
                if saved[1:] != tuple(level.shape[1:]):
                    raise ValueError(f"checkpoint {path}: bank level {l + 1} has blocks "
                                     f"{saved[1:]}, "
                                     f"this run {tuple(level.shape[1:])}")
                start = self.offsets[l] - offset
                if not (0 <= start and start + level.shape[0] <= saved[0]):
                    raise ValueError(f"checkpoint {path} holds bank rows "
                                     f"{offset}..{offset + saved[0]} of level "
                                     f"{l + 1}, not the rows this run needs")
                level.copy_(f.rows(key, start, start + level.shape[0]))
            if weights_only:
                return
            check_resumable(path, state, self.config, self.tc)
            optim = checkpoint.unflatten(state["optimizer"], f.prefixed("opt."))
        self.phase_index, self.phase_step = state["phase_index"], state["phase_step"]
        self.global_step = state["global_step"]
        self.sampler.load_state_dict(state["sampler"])
        self.losses = {k: list(v) for k, v in state["losses"].items()}
        self.dense_opt = self.bank_opt = None
        if not self.done and self.phase_step > 0:  # mid-phase: the phase's optimizers resume too
            self._begin_phase()
            if self.dense_opt is not None:
                self.dense_opt.load_state_dict(optim["dense"])
            if self.bank_opt is not None:
                self.bank_opt.load_state_dict(optim["bank"])


    def load_anchor(self, path: Path) -> None:
        """Only the anchor's weights from a checkpoint of the same anchor and data, whatever its
        bank's shapes: runs with other memory sizes start from one pretrained anchor
        (training/scaling.py)."""
        state = checkpoint.read_state(path)
        mine, theirs = self.config.to_dict()["model"], state["config"]["model"]
        if mine != theirs:
            diff = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise ValueError(f"checkpoint {path} holds another anchor "
                             f"(differs in {', '.join(diff)})")
        if state["data"] != self.data_fingerprint:
            raise ValueError(f"checkpoint {path} was trained on other data "
                             f"(fingerprint {state['data']}, this run {self.data_fingerprint})")
        with checkpoint.reader(path) as f:
            model = {k[len("model."):]: v for k, v in f.prefixed("model.").items()}
        missing, unexpected = self.model.load_state_dict(model, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise ValueError(f"checkpoint {path} does not fit the model: missing {missing}, "
                             f"unexpected {unexpected}")


def check_resumable(path: Path, state: dict, config: Config, tc: TrainConfig | None) -> None:
    """Refuse a checkpoint from another model config (and, given tc, other training settings,
    except the ones that do not change the result)."""
    checkpoint.check_same_config(path, state["config"], config.to_dict())
    if tc is not None:
        ignore = ("threads", "ckpt_every", "keep_ckpts")
        # a field added after the checkpoint was written counts as its default
        saved = {**TrainConfig().to_dict(), **state["train"]}
        checkpoint.check_same_config(path, {k: v for k, v in saved.items() if k not in ignore},
                                     {k: v for k, v in tc.to_dict().items() if k not in ignore})


# ---------------------------------------------------------------------------------------------
# the whole run


def run(out_dir: str | Path, tc: TrainConfig, *, reuse: bool = True, resume: bool = False,
        log=print) -> Path | None:
    """Prepare data, train every phase with checkpoints, plot the loss, export.

    Returns the export directory (None for a subtree job: merge those with training/merge.py).
    reuse: return a finished run with the same inputs as it is. resume: continue from the newest
    checkpoint in out_dir/ckpt (refused if it is from another config or other data).
    """
    from training.export import export
    from training.plot import save_loss_curve
    from training.prepare import prepare_data

    tc.validate()
    config = tc.model_config()
    dist = Dist.from_env()
    out = Path(out_dir)
    export_dir, stamp, ckpt_root = out / "export", out / "run.json", out / "ckpt"
    if reuse and not resume and _finished(stamp, tc) and (export_dir / "manifest.json").exists():
        log(f"reusing cached run {out} (fingerprint {tc.fingerprint()})")
        return export_dir
    if tc.threads:
        torch.set_num_threads(tc.threads)
    start = checkpoint.latest(ckpt_root) if resume else None
    if resume and start is None:
        raise FileNotFoundError(f"nothing to resume: no checkpoint under {ckpt_root}")
    init = checkpoint.resolve(tc.init_from) if tc.init_from else None
    if start is not None or init is not None:  # before the data: a wrong config must not rebuild it
        check_resumable(start or init, checkpoint.read_state(start or init), config,
                        tc if start else None)
    t_start = time.perf_counter()
    data = prepare_data(out, tc, config, dist=dist, source=_run_dir(init) if init else None,
                        log=log)
    t_data = time.perf_counter() - t_start

    if start is None and dist.is_main and ckpt_root.exists():
        log(f"fresh run: removing old checkpoints in {ckpt_root}")
        shutil.rmtree(ckpt_root)
    trainer = Trainer(config, tc, data.packed, dist=dist, data_fingerprint=data.fingerprint,
                      init=None if start else init, log=log)
    if start is not None:
        trainer.load(start)
        log(f"resumed from {start} at step {trainer.global_step}")
    sizes = config.memory.sizes(config.model)
    log(f"anchor {trainer.model.num_params():,} params; bank {sizes['bank_params']:,}; "
        f"fetch {sizes['fetch_params']:,} per path; {len(trainer.packed)} sequences"
        + (f" in subtree {tc.subtree}" if tc.subtree is not None else "")
        + (f"; {dist.world} ranks" if dist.world > 1 else ""))

    t0 = time.perf_counter()
    trainer.train(ckpt_root if dist.is_main else None)
    t_train = time.perf_counter() - t0
    result = None
    if dist.is_main:
        save_loss_curve(trainer.losses, out / "loss.png", title=f"{tc.preset} ({out.name})")
        if tc.subtree is None:
            export(export_dir, config, trainer.model, trainer.bank, data.tokenizer_path,
                   data.router, bank_id=tc.bank, version=tc.version, generic=trainer.generic,
                   run_dir=data.tokenizer_path.parent)
            result = export_dir
        stamp.write_text(json.dumps({"fingerprint": tc.fingerprint(), "train": tc.to_dict(),
                                     "data": data.meta,
                                     "timings": {"data_s": t_data, "train_s": t_train},
                                     "losses": trainer.losses}, indent=1))
        log(("exported to " + str(export_dir) if result
             else "subtree job done (merge with membank merge)")
            + f" (data {t_data:.1f}s, train {t_train:.1f}s); loss curve {out / 'loss.png'}")
    dist.barrier()
    return result


def _finished(stamp: Path, tc: TrainConfig) -> bool:
    try:
        return json.loads(stamp.read_text()).get("fingerprint") == tc.fingerprint()
    except (OSError, ValueError):
        return False


def _run_dir(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to (<run>/ckpt/<name>)."""
    return ckpt.parent.parent
