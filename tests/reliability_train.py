"""A minimal Trainer run on the tiny model, used as a subprocess by tests/test_reliability.py.

Synthetic classification (label = whether token 7 occurs), 48 rows, batch 4: 12 steps per epoch. Writes
`result.json` (logged losses per step, world size) and `final/model.safetensors` into --output_dir.
`--kill_at_step N` SIGKILLs the process right after optimizer step N; `--kill_in_save N:WHERE` SIGKILLs it
during the save of checkpoint-N, either after the model file is written (`WHERE=optimizer`) or after
every Trainer file is written but before the completion marker (`WHERE=marker`).

    python tests/reliability_train.py --model TINY --output_dir OUT [--resume] [--plain]
    torchrun --nproc_per_node 2 tests/reliability_train.py ...   # gloo on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the worktree's ftkit, not an installed one
from ftkit.metrics import exact_eval_loss  # noqa: E402
from ftkit.reliability import (  # noqa: E402
    CrashSafeCheckpoints,
    NonFiniteError,
    NonFiniteGuard,
    resolve_resume,
)


def synthetic_dataset(n: int, vocab_size: int, length: int = 12) -> Dataset:
    g = torch.Generator().manual_seed(1234)  # the data never depends on the training seed
    ids = torch.randint(5, vocab_size, (n, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    labels = (ids == 7).any(dim=1).long()
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * length] * n, "labels": labels.tolist()}
    )


class Kill(TrainerCallback):
    def __init__(self, step: int | None) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class KillBeforeMarker(TrainerCallback):
    """Placed before CrashSafeCheckpoints: on_save runs after Trainer wrote everything, before the marker."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RankSeed(TrainerCallback):
    """Give each rank its own RNG stream (Trainer seeds all ranks alike), so that restoring the wrong rank's
    RNG state on resume shows up as different weights. On resume Trainer loads the saved states later."""

    def on_train_begin(self, args, state, control, **kwargs):
        torch.manual_seed(args.seed + 1000 * args.process_index)


class KillInSaveTrainer(Trainer):
    """SIGKILLs itself in the middle of a checkpoint save: model weights written, optimizer not yet."""

    kill_step = -1

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.state.global_step == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        super()._save_optimizer_and_scheduler(output_dir)


def evaluate_sizes(model_path: str, out: Path, sizes: list[int]) -> None:
    """Evaluate a regression model whose labels are the row indices: gathered label_ids must be each row once."""
    seen = {}

    def compute_metrics(pred):
        seen[len(pred.label_ids)] = {
            "ids": pred.label_ids.tolist(),
            "preds": pred.predictions.ravel().tolist(),
        }
        return {"loss": exact_eval_loss(pred.predictions, pred.label_ids)}

    set_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
    model.accepts_loss_kwargs = False  # see build_trainer()
    args = TrainingArguments(
        output_dir=str(out / "eval"),
        per_device_eval_batch_size=4,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, compute_metrics=compute_metrics)
    result = {"world_size": args.world_size}
    for n in sizes:
        data = synthetic_dataset(n, model.config.vocab_size).remove_columns("labels")
        data = data.add_column("labels", [float(i) for i in range(n)])
        seen.clear()
        metrics = trainer.evaluate(data)
        (gathered,) = seen.values()
        result[str(n)] = {**gathered, "eval_loss": metrics["eval_loss"]}
    if args.process_index == 0:
        (out / "eval_result.json").write_text(json.dumps(result))


def build_trainer(model_path, output_dir, callbacks=(), trainer_cls=Trainer, seed=0, **overrides) -> Trainer:
    """The run every reliability test uses: 48 rows, 4 per step (2 per rank on 2 ranks), 2 epochs."""
    set_seed(seed)  # before the model: the new classifier head is drawn from the global RNG
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
    # BERT heads take **kwargs, so Trainer 5.23 assumes they normalise the loss by `num_items_in_batch`;
    # they take a plain mean, and Trainer then multiplies the loss by the number of processes (train
    # and eval) and skips the division by gradient_accumulation_steps. False restores the true mean.
    model.accepts_loss_kwargs = False
    settings = dict(
        output_dir=str(output_dir),
        seed=seed,
        learning_rate=1e-3,
        num_train_epochs=2,
        per_device_train_batch_size=4 if int(os.environ.get("WORLD_SIZE", 1)) == 1 else 2,
        logging_steps=1,
        save_steps=5,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
    )
    data = synthetic_dataset(48, model.config.vocab_size)
    return trainer_cls(
        model=model,
        args=TrainingArguments(**{**settings, **overrides}),
        train_dataset=data,
        eval_dataset=data.select(range(8)),
        callbacks=list(callbacks),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--epochs", type=float, default=2)
    p.add_argument("--save_steps", type=int, default=5)
    p.add_argument("--save_total_limit", type=int, default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--plain", action="store_true", help="no ftkit callbacks: what Trainer does alone")
    p.add_argument("--kill_at_step", type=int, default=None)
    p.add_argument("--kill_in_save", default=None, help="STEP:optimizer or STEP:marker")
    p.add_argument("--eval_sizes", default=None, help="comma-separated: only run the eval check")
    a = p.parse_args(argv)
    if a.eval_sizes:
        evaluate_sizes(a.model, Path(a.output_dir), [int(n) for n in a.eval_sizes.split(",")])
        return 0

    callbacks = [RankSeed()]
    trainer_cls = Trainer
    if a.kill_in_save:
        step, where = a.kill_in_save.split(":")
        if where == "marker":
            callbacks.append(KillBeforeMarker(int(step)))
        else:
            trainer_cls = KillInSaveTrainer
            trainer_cls.kill_step = int(step)
    if not a.plain:
        callbacks += [CrashSafeCheckpoints(), NonFiniteGuard()]
    callbacks.append(Kill(a.kill_at_step))
    out = Path(a.output_dir)
    trainer = build_trainer(
        a.model,
        out / "checkpoints",
        callbacks,
        trainer_cls,
        seed=a.seed,
        learning_rate=a.lr,
        num_train_epochs=a.epochs,
        save_steps=a.save_steps,
        save_total_limit=a.save_total_limit,
    )
    args = trainer.args
    resume = resolve_resume(args.output_dir) if a.resume else None
    try:
        trainer.train(resume_from_checkpoint=resume)
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    if args.process_index == 0:
        trainer.save_model(str(out / "final"))
        losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
        result = {"losses": losses, "world_size": args.world_size, "resumed_from": resume}
        (out / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # a tiny model: threads only contend on the shared 2-core machine (10x slower)
    code = main()
    if torch.distributed.is_initialized():
        # Left to interpreter exit, gloo's threads sometimes abort a rank ("terminate called without
        # an active exception", SIGABRT), failing a run that did everything right.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.exit(code)
