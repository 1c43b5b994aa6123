"""The training loop that every stage shares: resume, data position, progress bar, checkpoints, time.

    loop = TrainingLoop(options.out, checkpoint.jsonable(asdict(options)), resume=options.resume,
                        total_steps=..., save_every=options.save_every, keep_checkpoints=options.keep_checkpoints)
    result = loop.run(stage, dp, optimizer)   # stage: a TrainingStage (sft.SFTStage, grpo.GRPOStage)

A stage supplies what differs: one training step, the data position, and whatever its checkpoints carry
besides the wrapped model, the optimizer and the random generators (which the loop saves and restores
itself). Every rank runs the loop; checkpoints are written through `train.checkpoint` (atomic, every
rank's state gathered to rank 0), and `dp.close()` runs however the loop ends.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from tqdm.auto import tqdm

from . import checkpoint
from .launch import is_main_process


class TrainingStage(Protocol):
    """What a stage fills into the loop."""

    name: str  # the progress bar's label

    def step(self, step: int) -> dict | None:
        """Run training step `step` (from 0); return a record for the history, or None (not a log step)."""

    def skip(self, steps: int) -> None:
        """Advance the data to where an uninterrupted run would be after `steps` steps (on resume)."""

    def postfix(self, record: dict) -> dict[str, str]:
        """What the progress bar shows of a record."""

    def checkpoint_state(self) -> tuple[dict, dict]:
        """(this rank's state, state shared by all ranks) that checkpoints carry besides the loop's own."""

    def load_checkpoint_state(self, mine: dict, shared: dict) -> None:
        """Restore `checkpoint_state` from a checkpoint (before the random generators are restored)."""


@dataclass
class LoopResult:
    history: list[dict]  # the records the stage returned, over all sittings
    train_time_s: float  # wall time of the loop, including the time before a resume


class TrainingLoop:
    """Created before the stage builds its state (the stage may read `resumed`), run once."""

    def __init__(self, out: str, options_json: dict, *, resume: bool, total_steps: int, save_every: int | None,
                 keep_checkpoints: int):
        self.out, self.options_json = out, options_json
        self.total_steps, self.save_every, self.keep_checkpoints = total_steps, save_every, keep_checkpoints
        # (first step, this rank's state, shared state) of the checkpoint to continue from, or None
        self.resumed: tuple[int, dict, dict] | None = checkpoint.resume_point(out, options_json, resume)

    @property
    def first_step(self) -> int:
        return 0 if self.resumed is None else self.resumed[0]

    def run(self, stage: TrainingStage, dp: Any, optimizer: Any) -> LoopResult:
        history: list[dict] = []
        time_before = 0.0
        if self.resumed is not None:
            _, mine, shared = self.resumed
            dp.load_state_dict(mine["model"])  # weights and the relax algorithm's state
            optimizer.load_state_dict(mine["optimizer"])
            history, time_before = shared["history"], shared["train_time_s"]
            stage.load_checkpoint_state(mine, shared)
            checkpoint.set_rng_state(mine["rng"])  # last: nothing may draw from the generators after this
        stage.skip(self.first_step)
        start = time.perf_counter() - time_before  # train_time_s counts the time before a resume too
        progress = tqdm(total=self.total_steps, initial=self.first_step, desc=stage.name,
                        disable=not is_main_process(), dynamic_ncols=True)
        try:
            for step in range(self.first_step, self.total_steps):
                record = stage.step(step)
                progress.update(1)
                if record is not None:
                    history.append(record)
                    progress.set_postfix(stage.postfix(record))
                if checkpoint.checkpoint_due(step + 1, self.total_steps, self.save_every):
                    extra_mine, extra_shared = stage.checkpoint_state()
                    mine = {"model": dp.state_dict(), "optimizer": optimizer.state_dict(),
                            "rng": checkpoint.rng_state(), **extra_mine}
                    shared = {"history": history, "train_time_s": time.perf_counter() - start, **extra_shared}
                    checkpoint.save_checkpoint(self.out, step + 1, mine, shared, self.options_json,
                                               self.keep_checkpoints)
        finally:
            progress.close()
            dp.close()
        return LoopResult(history, time.perf_counter() - start)
