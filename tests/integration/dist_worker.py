"""Worker for test_distributed.py, run by torchrun (or plainly, as one rank).

    torchrun --standalone --nproc_per_node 2 tests/integration/dist_worker.py OUT_DIR

On synthetic packed data (documents of different lengths, so the ranks' slices hold different
numbers of target tokens), with the generic memory on:
1. one co-training step from the initial weights, recording the gradients the optimizers get
   (after the all-reduce, the sparse row reduction and clipping);
2. a short run through all three phases, recording the final weights and the losses.
Every rank writes OUT_DIR/rank{r}.safetensors and OUT_DIR/rank{r}.json.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from training.config import load_train_config
from training.distributed import Dist
from training.train import Trainer, pack


class RecordingTrainer(Trainer):
    recorded: list[torch.Tensor] | None = None

    def _clip(self, grads):
        super()._clip(grads)
        if self.recorded is None:
            self.recorded = [g.clone() for g in grads]


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist = Dist.from_env()
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(1, 200, size=int(rng.integers(5, 40)))) for _ in range(40)]
    nodes = np.array([[i % 2, 2 * (i % 2) + (i // 2) % 2] for i in range(40)])
    packed = pack(docs, nodes, seq_len=32, eos=0)
    common = ["generic_prob=0.25", "batch_size=8"]
    quiet = dict(dist=dist, log=lambda *a: None)

    tc = load_train_config("tiny", ["anchor_steps=0", "cotrain_steps=1", *common])
    first = RecordingTrainer(tc.model_config(), tc, packed, **quiet)
    first_loss = first.step()
    tensors = {f"grad.{i}": g for i, g in enumerate(first.recorded)}

    tc = load_train_config("tiny", ["anchor_steps=2", "cotrain_steps=3", "frozen_steps=2", *common])
    trainer = Trainer(tc.model_config(), tc, packed, **quiet)
    trainer.train()
    tensors.update({f"model.{k}": v for k, v in trainer.model.state_dict().items()
                    if k != "lm_head.weight"})
    tensors.update({f"bank.{l}": t for l, t in enumerate(trainer.bank)})
    tensors["generic"] = trainer.generic.detach()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(out / f"rank{dist.rank}.safetensors"))
    (out / f"rank{dist.rank}.json").write_text(json.dumps(
        {"world": dist.world, "first_loss": first_loss, "losses": trainer.losses}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
