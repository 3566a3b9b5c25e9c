"""Trainer-side helpers the recipes call: token statistics of training, test predictions in row order."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from transformers.trainer_utils import PredictionOutput

from ftkit.reliability import CrashSafeCheckpoints


def pad_stats(dataloader) -> tuple[int, int]:
    """(real tokens, real + pad tokens) over one pass of a dataloader's batches, collation only.

    Used after training on the training dataloader to report the pad share that its sampler and
    collator produce (one epoch's worth; later epochs shuffle the same way).
    """
    real = total = 0
    for batch in dataloader:
        mask = batch["attention_mask"]
        real += int(mask.sum())
        total += mask.numel()
    return real, total


def train_token_stats(trainer, train_runtime: float, resumed_from: str | None = None) -> dict[str, float]:
    """Real (non-pad) training tokens per second over all ranks, and the pad share of the batches.

    Counts one epoch of this rank's training batches (collation only) and scales it to every rank
    and to the epochs this run trained (after a resume, only those since the checkpoint).
    """
    real, total = pad_stats(trainer.get_train_dataloader())
    # The checkpoint a run resumed from can be pruned by the end of training: CrashSafeCheckpoints
    # noted its epoch when training began.
    noted = [c.start_epoch for c in trainer.callback_handler.callbacks if isinstance(c, CrashSafeCheckpoints)]
    start = noted[0] if noted else 0.0
    if resumed_from and not noted:
        start = json.loads((Path(resumed_from) / "trainer_state.json").read_text(encoding="utf-8"))["epoch"]
    tokens = real * trainer.args.world_size * (trainer.state.epoch - start)
    return {"train_real_tokens_per_second": tokens / train_runtime, "train_pad_share": 1 - real / total}


def predict_in_row_order(trainer, dataset, metric_key_prefix: str = "test") -> PredictionOutput:
    """`trainer.predict(dataset)` with one prediction per row, in the dataset's row order.

    Trainer's `train_sampling_strategy="group_by_length"` also reorders evaluation batches. For this
    call the trainer runs on a copy of its arguments with random (training) sampling, which leaves
    evaluation sequential; the parsed arguments and the trainer's own are left as they are.
    """
    own = trainer.args
    trainer.args = copy.copy(own)
    trainer.args.train_sampling_strategy = "random"
    try:
        return trainer.predict(dataset, metric_key_prefix=metric_key_prefix)
    finally:
        trainer.args = own
