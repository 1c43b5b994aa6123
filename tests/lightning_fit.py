"""A Lightning run with RelaxStrategy, as a user writes it (tests/test_relax_lightning.py runs it).

    python tests/lightning_fit.py --out DIR --fit NAME:ALGORITHM[:key=value,...] [--fit ...]
        [--steps 6] [--accumulate 1] [--kill-at STEP] [--resume CKPT] [--checkpoint-every-epoch]

Launched with plain `python` (Lightning re-runs this script for the second process) or under torchrun.
Each --fit is one `Trainer.fit` of small_mlp on rank-specific batches (relax_models.rank_batch, 3 steps of
--accumulate batches per epoch, the same every epoch); every rank saves its final weights to
DIR/NAME.rank{r}.pt. --kill-at ends every
process at that step (os._exit, as a killed job), --resume continues from a Lightning checkpoint.
"""
import argparse
import json
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lightning.pytorch as pl  # noqa: E402

from relax_models import rank_batch, small_mlp  # noqa: E402
from thinkscale.relax import algorithms  # noqa: E402
from thinkscale.relax.lightning import RelaxStrategy  # noqa: E402
from thinkscale.spec import field_types, split_spec, typed_options  # noqa: E402

STEPS_PER_EPOCH = 3


class Regression(pl.LightningModule):
    def __init__(self, optimizer: str, accumulate: int):
        super().__init__()
        self.net = small_mlp(seed=0)
        self.optimizer_name, self.accumulate = optimizer, accumulate

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_index):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        batches = [rank_batch(self.global_rank, i) for i in range(STEPS_PER_EPOCH * self.accumulate)]
        return torch.utils.data.DataLoader(batches, batch_size=None)


class KillAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            sys.stdout.flush()
            os._exit(3)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--fit", action="append", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--checkpoint-every-epoch", action="store_true")
    args = p.parse_args()
    for run in args.fit:
        name, spec = run.split(":", 1)
        algorithm, items = split_spec(spec, what="algorithm")
        options = typed_options(algorithm, items, what="algorithm", types=field_types(algorithms.REGISTRY[algorithm]))
        # async refuses gradient accumulation (its averaging thread and no_sync): it trains without
        accumulate = 1 if algorithm == "async" else args.accumulate
        callbacks = [KillAt(args.kill_at)] if args.kill_at else []
        if args.checkpoint_every_epoch:
            # at the epoch's last step, not at its end: Lightning resumes a checkpoint saved in
            # on_train_epoch_end with one batch more under gradient accumulation (DDPStrategy too)
            callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=args.out, filename=name + "-{step}",
                                                          save_top_k=-1, every_n_train_steps=STEPS_PER_EPOCH))
        trainer = pl.Trainer(strategy=RelaxStrategy(algorithm, timeout_s=60, **options), accelerator="cpu",
                             devices=2, max_steps=args.steps, accumulate_grad_batches=accumulate,
                             logger=False, enable_checkpointing=args.checkpoint_every_epoch,
                             enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                             callbacks=callbacks)
        model = Regression("adam" if algorithm == "qadam" else "sgd", accumulate)
        trainer.fit(model, ckpt_path=args.resume)
        torch.save(model.net.state_dict(), os.path.join(args.out, f"{name}.rank{trainer.global_rank}.pt"))
        if trainer.global_rank == 0:
            with open(os.path.join(args.out, f"{name}.json"), "w") as f:
                json.dump({"global_step": trainer.global_step, "world_size": trainer.world_size,
                           "optimizer": type(trainer.optimizers[0]).__name__}, f)


if __name__ == "__main__":
    main()
