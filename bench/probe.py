"""Instrumentation for one training run: where the time goes, tokens seen, and the validation curve.

`ProbeTrainer` is a `transformers.Trainer` that times its own phases (data loading and collation,
forward + backward, optimizer, logging, evaluation, checkpoint saving) and counts real and padded
tokens per step. The bench puts it in place of `Trainer` in a recipe module (`recipe.Trainer =
ProbeTrainer`) and wraps the recipe's top-level steps with `time_calls`, so the recipe runs
unmodified. Every evaluation during training adds a point to the curve:
(training seconds so far, metrics), where training seconds exclude evaluation and checkpoint time.
With `PROBE.stop_at` set, training ends at the first evaluation that reaches its target.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from dataclasses import dataclass, field

from flops import ModelShape, model_shape
from transformers import Trainer, TrainerCallback


@dataclass
class Probe:
    """Accumulated timings (seconds per phase), token counts and the curve of one run."""

    phases: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    lengths: list[int] = field(default_factory=list)  # real tokens of every training sequence
    padded_tokens: int = 0
    padded_lengths: list[int] = field(default_factory=list)  # padded length of every training sequence
    curve: list[dict] = field(default_factory=list)
    train_start: float | None = None
    train_end: float | None = None
    in_train: bool = False
    last_backward_end: float = 0.0
    shape: ModelShape | None = None  # of the model being trained, for the FLOPs count
    stop_at: dict | None = None  # {"metric", "target"}: end training at the first evaluation reaching it

    def reset(self) -> None:
        self.__init__()

    def add(self, phase: str, seconds: float) -> None:
        self.phases[phase] += seconds
        self.calls[phase] += 1

    def train_seconds(self, now: float | None = None) -> float:
        """Seconds inside `trainer.train()` so far, minus evaluation and checkpoint saving."""
        end = now if now is not None else (self.train_end or time.perf_counter())
        excluded = self.phases["evaluation"] + self.phases["checkpoint"]
        return end - self.train_start - excluded


# One probe per process: the bench runs one training per worker process.
PROBE = Probe()


def _timed(phase: str):
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                PROBE.add(phase, time.perf_counter() - start)

        return inner

    return wrap


class _OptimizerTimer(TrainerCallback):
    """The time from the end of the (last) backward to the end of the step: gradient clipping and
    norm, optimizer.step, scheduler step, zero_grad."""

    def on_step_end(self, args, state, control, **kwargs):
        PROBE.add("optimizer", time.perf_counter() - PROBE.last_backward_end)


class _StopAtTarget(TrainerCallback):
    """Ends training at the first evaluation whose metric reaches `PROBE.stop_at["target"]` (a metric
    where higher is better: accuracy, F1)."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get(PROBE.stop_at["metric"])
        if value is not None and value >= PROBE.stop_at["target"] - 1e-9:
            control.should_training_stop = True


class ProbeTrainer(Trainer):
    """A Trainer that records phase times, token counts and the validation curve in `PROBE`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(_OptimizerTimer())
        if PROBE.stop_at:
            self.add_callback(_StopAtTarget())
        PROBE.shape = model_shape(self.model)

    def train(self, *args, **kwargs):
        PROBE.train_start, PROBE.in_train = time.perf_counter(), True
        try:
            return super().train(*args, **kwargs)
        finally:
            PROBE.train_end, PROBE.in_train = time.perf_counter(), False

    def get_batch_samples(self, *args, **kwargs):
        start = time.perf_counter()
        out = super().get_batch_samples(*args, **kwargs)
        PROBE.add("data (fetch + collate)", time.perf_counter() - start)
        return out

    def training_step(self, model, inputs, *args, **kwargs):
        mask = inputs["attention_mask"]
        PROBE.lengths += mask.sum(dim=1).tolist()
        PROBE.padded_lengths += [mask.shape[1]] * mask.shape[0]
        PROBE.padded_tokens += mask.numel()
        start = time.perf_counter()
        loss = super().training_step(model, inputs, *args, **kwargs)
        PROBE.last_backward_end = time.perf_counter()
        PROBE.add("forward + backward", PROBE.last_backward_end - start)
        return loss

    def log(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().log(*args, **kwargs)
        finally:
            PROBE.add("logging", time.perf_counter() - start)

    def evaluate(self, *args, **kwargs):
        start = time.perf_counter()
        metrics = super().evaluate(*args, **kwargs)
        seconds = time.perf_counter() - start
        if PROBE.in_train:
            # The clock at the start of this evaluation, before its own time is booked.
            train_seconds = PROBE.train_seconds(now=start)
            PROBE.add("evaluation", seconds)
            PROBE.curve.append(
                {
                    "train_seconds": train_seconds,
                    "wall_seconds": start - PROBE.train_start,  # evaluations and checkpoints included
                    "step": self.state.global_step,
                    "examples": len(PROBE.lengths),
                    "eval_seconds": seconds,
                    **{k: v for k, v in metrics.items() if isinstance(v, int | float)},
                }
            )
        else:
            PROBE.add("final evaluation", seconds)
        return metrics

    def predict(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().predict(*args, **kwargs)
        finally:
            PROBE.add("test prediction", time.perf_counter() - start)

    def _save_checkpoint(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super()._save_checkpoint(*args, **kwargs)
        finally:
            PROBE.add("checkpoint", time.perf_counter() - start)


def time_calls(module, names: dict[str, str]) -> None:
    """Replace `module.<name>` by a wrapper that adds its run time to phase `names[name]`.

    Used on a recipe module to time its steps (loading data, tokenizing, saving) without editing it.
    Names the module lacks are skipped, so one list fits several recipes.
    """
    for name, phase in names.items():
        if hasattr(module, name):
            setattr(module, name, _timed(phase)(getattr(module, name)))
