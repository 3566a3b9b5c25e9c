"""Where the time goes in ftkit's default training: Trainer phases and, inside the step, torch ops.

    python bench/profile_train.py                          # textcls defaults, 24 steps, eval + save every 12
    python bench/profile_train.py --steps 40 --every 20 --ftkit_args --per_device_train_batch_size 32

Runs the recipe's `main([...])` with its default options (per-epoch evaluation, checkpoints and
best-model tracking, scaled to `--every` steps so that both happen within a short run), times every
phase with `ProbeTrainer`, and records `--profile_steps` training steps with torch.profiler.
Prints the phase table, then the step's self CPU time by operator category and the top operators.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

# Operator name fragments -> category, first match wins (self CPU time is summed per category).
CATEGORIES = (
    ("scaled_dot_product", "attention (sdpa kernels)"),
    ("flash_attention", "attention (sdpa kernels)"),
    ("bmm", "matmul"),
    ("addmm", "matmul"),
    ("aten::mm", "matmul"),
    ("mkldnn", "matmul"),
    ("softmax", "softmax"),
    ("layer_norm", "layer norm"),
    ("gelu", "gelu"),
    ("dropout", "dropout"),
    ("bernoulli", "dropout"),
    ("adam", "optimizer"),
    ("norm", "grad clipping"),
    ("embedding", "embedding"),
    ("copy_", "copies"),
    ("clone", "copies"),
    ("contiguous", "copies"),
    ("cat", "copies"),
    ("add", "elementwise"),
    ("mul", "elementwise"),
    ("div", "elementwise"),
    ("sum", "reductions"),
    ("fill_", "fills / zeroing"),
    ("zero_", "fills / zeroing"),
)


def category(name: str) -> str:
    for frag, cat in CATEGORIES:
        if frag in name:
            return cat
    return "other ops"


def main(argv: list[str] | None = None) -> dict:
    import torch
    from probe import PROBE, ProbeTrainer, time_calls
    from train_speed import RECIPE_STEPS, TASKS, load_recipe
    from transformers import TrainerCallback

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="textcls", choices=list(TASKS))
    p.add_argument("--steps", type=int, default=24, help="training steps")
    p.add_argument("--every", type=int, default=12, help="evaluate and save every N steps")
    p.add_argument("--profile_start", type=int, default=4, help="first profiled step (after warm-up)")
    p.add_argument("--profile_steps", type=int, default=4)
    p.add_argument("--out", help="write the figures as JSON here")
    p.add_argument("--ftkit_args", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    class ProfileSteps(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.profile_start:
                prof.__enter__()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == args.profile_start + args.profile_steps:
                prof.__exit__(None, None, None)

    class ProfiledTrainer(ProbeTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.add_callback(ProfileSteps())

    module = load_recipe(TASKS[args.task]["recipe"])
    module.Trainer = ProfiledTrainer
    time_calls(module, RECIPE_STEPS)
    start, load_start = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out_dir:
        argv = [
            *TASKS[args.task]["recipe_args"],
            "--output_dir", out_dir,
            "--max_steps", str(args.steps),
            "--eval_strategy", "steps", "--eval_steps", str(args.every),
            "--save_strategy", "steps", "--save_steps", str(args.every),
            "--disable_tqdm", "true",
            *args.ftkit_args,
        ]  # fmt: skip
        module.main(argv)
    wall = time.perf_counter() - start

    print(
        f"\nload 1-min: {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end; torch threads {torch.get_num_threads()}"
    )
    print(
        f"phases of recipe main() ({wall:.1f} s; {args.steps} steps, evaluation + checkpoint every {args.every}):"
    )
    for phase, sec in sorted(PROBE.phases.items(), key=lambda kv: -kv[1]):
        calls = PROBE.calls[phase]
        print(f"  {phase:<26}{sec:>8.2f} s {sec / wall:>5.0%}  {calls:>4} calls  {sec / calls:>7.3f} s/call")

    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    by_cat: dict[str, float] = defaultdict(float)
    for e in events:
        by_cat[category(e.key)] += e.self_cpu_time_total
    print(f"\ntorch ops over {args.profile_steps} profiled steps (self CPU time, {total / 1e6:.2f} s):")
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:<26}{us / 1e6:>8.2f} s {us / total:>5.0%}")
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    print("\ntop operators:")
    for e in top:
        print(
            f"  {e.key:<55}{e.self_cpu_time_total / 1e6:>8.2f} s {e.self_cpu_time_total / total:>5.0%}  {e.count:>6} calls"
        )
    from flops import machine

    result = {
        "machine": machine(),  # CPU model and flags (avx2, avx512*, amx*, vnni)
        "load_1min_start": load_start,
        "load_1min_end": os.getloadavg()[0],
        "threads": torch.get_num_threads(),
        "wall_seconds": wall,
        "steps": args.steps,
        "every": args.every,
        "ftkit_args": args.ftkit_args,
        "phases": dict(PROBE.phases),
        "calls": dict(PROBE.calls),
        "op_categories_seconds": {k: v / 1e6 for k, v in by_cat.items()},
        "top_ops": [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in top],
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
