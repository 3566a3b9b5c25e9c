"""Training efficiency of ftkit's recipes against a plain-Trainer baseline and the hardware peak.

    make bench                                          # quick budget: every task with a recipe, ~18 min
    python bench/train_speed.py --task textcls          # one task
    python bench/train_speed.py --task ner --full       # the full default budgets (each side's epochs)
    python bench/train_speed.py --ftkit_args --per_device_train_batch_size 32   # try a change

Measured in one run on one machine: the fp32 GEMM peak (torch, same thread count as training, through
MKL and through oneDNN, the faster of the two being "the peak"; ONNX Runtime's MLAS GEMM for
reference), then per task
the baseline (bench/baseline.py: the Hugging Face example scripts' defaults) and ftkit's recipe (its
own `main([...])`, unmodified, with `Trainer` swapped for the timing `ProbeTrainer`), each in its own
process (clean peak RSS). The baseline trains for its budget (a fraction of an epoch for the quick
one, its default 3 epochs with --full) and its final validation metric becomes the target. ftkit then
runs its own default schedule, evaluated at evenly spaced steps; in the quick budget it stops at the
first evaluation that reaches the target (a handicap for ftkit: the baseline's schedule is squeezed
into its short budget and decays to zero, ftkit's is still near its peak learning rate). The clock
counts training only (data, forward/backward, optimizer, logging): evaluation and checkpoint time is
reported apart.
Figures: real (non-pad) tokens/s, pad share, model FLOPs per token, useful MFU (useful FLOP/s over
the measured peak), peak RSS, the validation curve, and the time each side needs to reach the
baseline's final validation metric. The CPU load average is recorded with every figure.
Writes bench/results/<date>-<host>.json and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

# task -> ftkit recipe (+ arguments), baseline script (+ arguments), validation metric compared
TASKS = {
    "textcls": {
        "recipe": "textcls",
        "recipe_args": [],
        "baseline": "textcls",
        "baseline_args": {},
        "metric": "accuracy",
    },
    "sentiment": {
        "recipe": "sentiment",
        "recipe_args": [],
        "baseline": "textcls",
        "baseline_args": {"dataset_name": "rotten-tomatoes"},
        "metric": "accuracy",
    },
    "ner": {"recipe": "ner", "recipe_args": [], "baseline": "ner", "baseline_args": {}, "metric": "f1"},
}
# Budgets. The baseline trains `baseline_epochs` (None: its default 3) with `baseline_evals` evenly spaced
# validation passes; ftkit runs its default schedule with `ftkit_evals` passes over it and, with
# `stop_at_target`, stops once it reaches the baseline's final metric. Quick: 18 minutes on 2 cores
# (2026-12-01); halving ftkit's evaluations saved 30 s there and cost resolution (sentiment 3.49x -> 2.75x).
# Shorter baseline budgets than these measure mostly the first steps, where ftkit's warm-up (10% of its
# full run) still holds the learning rate low: 0.1 epoch of NER gave 0.61x (0.5 epoch: 1.43x).
QUICK = {
    "textcls": {"baseline_epochs": 1.0, "baseline_evals": 8, "ftkit_evals": 40, "stop_at_target": True},
    "sentiment": {"baseline_epochs": 0.25, "baseline_evals": 5, "ftkit_evals": 40, "stop_at_target": True},
    "ner": {"baseline_epochs": 0.5, "baseline_evals": 5, "ftkit_evals": 60, "stop_at_target": True},
}
FULL = {
    task: {"baseline_epochs": None, "baseline_evals": 12, "ftkit_evals": 24, "stop_at_target": False}
    for task in TASKS
}

# The recipe's top-level steps whose time is reported (names absent from a recipe are skipped).
RECIPE_STEPS = {
    "load_text_splits": "load data",
    "load_tagged_splits": "load data",
    "load_tokenizer": "load tokenizer",
    "encode_texts": "tokenize",
    "encode_splits": "tokenize",
    "load_model": "load model",
    "speed_up": "load model",
    "add_lora": "load model",
    "train_token_stats": "pad statistics",
    "save_run": "write the run directory",
}
TRAIN_PHASES = ("data (fetch + collate)", "forward + backward", "optimizer", "logging")


# ---- One training run (in a worker process) -------------------------------------------------------


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_ftkit(task: str, budget: dict, extra: list[str], out_dir: str) -> dict:
    """ftkit's recipe with its defaults, except: `budget["ftkit_evals"]` evaluations for the curve, and no
    checkpoints or best-model reload (the curve needs neither)."""
    from probe import ProbeTrainer, time_calls

    module = load_recipe(TASKS[task]["recipe"])
    module.Trainer = ProbeTrainer
    time_calls(module, RECIPE_STEPS)
    argv = [
        *TASKS[task]["recipe_args"],
        "--output_dir", out_dir,
        "--eval_strategy", "steps",
        "--eval_steps", str(1 / budget["ftkit_evals"]),
        "--save_strategy", "no",
        "--load_best_model_at_end", "false",
        "--disable_tqdm", "true",
    ]  # fmt: skip
    return module.main(argv + extra)


def run_baseline(task: str, budget: dict, extra: list[str], out_dir: str) -> dict:
    import baseline
    from probe import ProbeTrainer

    overrides = {"eval_strategy": "steps", "eval_steps": 1 / budget["baseline_evals"], "disable_tqdm": True}
    if budget["baseline_epochs"]:
        overrides["num_train_epochs"] = budget["baseline_epochs"]
    run = baseline.TASKS[TASKS[task]["baseline"]]
    return run(ProbeTrainer, out_dir, **TASKS[task]["baseline_args"], **overrides)


def worker(spec: dict) -> dict:
    """Run one side of one task and return its figures (called in a fresh process)."""
    import torch
    from flops import train_flops
    from probe import PROBE

    start, load_start = time.perf_counter(), os.getloadavg()[0]
    PROBE.stop_at = spec.get("stop_at")
    with tempfile.TemporaryDirectory() as out_dir:
        run = run_ftkit if spec["side"] == "ftkit" else run_baseline
        results = run(spec["task"], spec["budget"], spec["extra"], out_dir)
    wall = time.perf_counter() - start
    metric = "eval_" + TASKS[spec["task"]]["metric"]
    curve = list(PROBE.curve)
    train_s = PROBE.train_seconds()
    if not curve or curve[-1]["examples"] != len(PROBE.lengths):
        # The last interval did not end on an evaluation: the final evaluation closes the curve.
        curve.append({"train_seconds": train_s, "examples": len(PROBE.lengths), metric: results[metric]})
    real, padded = sum(PROBE.lengths), PROBE.padded_tokens
    useful = train_flops(PROBE.shape, PROBE.lengths)
    # FLOPs the hardware executes, pad tokens included (a padded row attends over its padded length).
    hardware = train_flops(PROBE.shape, PROBE.padded_lengths)
    phases = dict(PROBE.phases)
    inner = sum(v for k, v in phases.items() if k in (*TRAIN_PHASES, "evaluation", "checkpoint"))
    phases["other in train()"] = PROBE.train_end - PROBE.train_start - inner
    outside = sum(v for k, v in phases.items() if k not in (*TRAIN_PHASES, "evaluation", "checkpoint"))
    outside -= phases["other in train()"]
    phases["imports, datasets.map, setup"] = wall - (PROBE.train_end - PROBE.train_start) - outside
    return {
        "side": spec["side"],
        "task": spec["task"],
        "extra_args": spec["extra"],
        "threads": torch.get_num_threads(),
        "load_1min_start": load_start,
        "load_1min_end": os.getloadavg()[0],
        "wall_seconds": wall,
        "train_seconds": train_s,
        "train_examples": len(PROBE.lengths),
        "real_tokens": real,
        "padded_tokens": padded,
        "pad_share": 1 - real / padded,
        "real_tokens_per_second": real / train_s,
        "n_nonembedding": PROBE.shape.n_nonembedding,
        "n_trainable": PROBE.shape.n_trainable,
        "useful_flops_per_token": useful / real,
        "useful_gflops_per_second": useful / train_s / 1e9,
        "hardware_gflops_per_second": hardware / train_s / 1e9,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_metric": results[metric],
        "metric": metric,
        "curve": curve,
        "phases": phases,
        "phase_calls": dict(PROBE.calls),
    }


# ---- Orchestration ----------------------------------------------------------------------------------


class LoadSampler:
    """Samples the 1-minute load average every few seconds while a run is going."""

    def __init__(self, every: float = 5.0):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every: float) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        s = self.samples or [os.getloadavg()[0]]
        return {"load_mean": sum(s) / len(s), "load_max": max(s)}


def spawn(spec: dict) -> dict:
    """Run `worker(spec)` in a fresh interpreter; return its figures plus the load during the run."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        out = f.name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--worker_out", out]
    with LoadSampler() as load:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:])
        raise SystemExit(f"{spec['side']} {spec['task']} failed (exit {proc.returncode})")
    result = json.loads(Path(out).read_text())
    Path(out).unlink()
    result.update(load.summary())
    return result


def time_to_reach(curve: list[dict], metric: str, target: float) -> float | None:
    """Training seconds at the first evaluation whose `metric` is at least `target` (None: never)."""
    for point in curve:
        if point.get(metric) is not None and point[metric] >= target - 1e-9:
            return point["train_seconds"]
    return None


def compare(base: dict, ftk: dict) -> dict:
    """Time for each side to reach the baseline's final validation metric, and the ratio."""
    metric, target = base["metric"], base["final_metric"]
    t_base = time_to_reach(base["curve"], metric, target)
    t_ftk = time_to_reach(ftk["curve"], metric, target)
    return {
        "metric": metric,
        "target": target,
        "baseline_seconds": t_base,
        "ftkit_seconds": t_ftk,
        "speedup": t_base / t_ftk if t_base and t_ftk else None,
    }


def measure_peak() -> dict:
    from flops import bf16_peak, gemm_peak, onnxruntime_gemm_peak

    with LoadSampler(1.0) as load:
        peak = gemm_peak()
        onednn = gemm_peak(backend="onednn")
        mlas = onnxruntime_gemm_peak()
        bf16 = bf16_peak()
    return {
        **peak,
        "onednn_gflops_best": onednn["gflops_best"],
        "onnxruntime_gflops_best": mlas["gflops_best"],
        "bf16_gflops_best": bf16,
        **load.summary(),
    }


def print_task(task: str, base: dict, ftk: dict, cmp: dict, peak_gflops: float, best_gflops: float) -> None:
    print(
        f"\n== {task}: {cmp['metric']} on the validation split; fp32 GEMM peak {peak_gflops:.1f} GFLOP/s "
        f"(torch's faster of MKL and oneDNN; MFU), {best_gflops:.1f} (fastest on this machine; MFU hw)"
    )
    head = (
        f"{'side':<10}{'examples':>9}{'train s':>9}{'real tok/s':>11}{'pad':>6}{'MFLOP/tok':>10}"
        f"{'GFLOP/s':>9}{'MFU':>6}{'MFU hw':>7}{'RSS MB':>8}{'final':>7}{'to target s':>12}{'load':>6}"
    )
    print(head)
    for r, t in ((base, cmp["baseline_seconds"]), (ftk, cmp["ftkit_seconds"])):
        print(
            f"{r['side']:<10}{r['train_examples']:>9}{r['train_seconds']:>9.1f}{r['real_tokens_per_second']:>11.0f}"
            f"{r['pad_share']:>6.0%}{r['useful_flops_per_token'] / 1e6:>10.1f}{r['useful_gflops_per_second']:>9.1f}"
            f"{r['useful_gflops_per_second'] / peak_gflops:>6.0%}{r['useful_gflops_per_second'] / best_gflops:>7.0%}"
            f"{r['peak_rss_mb']:>8.0f}{r['final_metric']:>7.3f}{(f'{t:.1f}' if t else 'never'):>12}{r['load_mean']:>6.1f}"
        )
    if cmp["speedup"]:
        print(
            f"ftkit reaches the baseline's final {cmp['metric']} ({cmp['target']:.4f}) {cmp['speedup']:.2f}x sooner"
        )
    else:
        print(
            f"ftkit does not reach the baseline's final {cmp['metric']} ({cmp['target']:.4f}) within its budget"
        )
    print("\nwhere ftkit's run time goes (s):")
    total = ftk["wall_seconds"]
    for phase, sec in sorted(ftk["phases"].items(), key=lambda kv: -kv[1]):
        print(f"  {phase:<26}{sec:>8.1f}{sec / total:>6.0%}  ({ftk['phase_calls'].get(phase, '-')} calls)")
    print(f"  {'whole recipe main()':<26}{total:>8.1f}")


def results_path(out_dir: Path) -> Path:
    stem = f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}"
    path, n = out_dir / f"{stem}.json", 2
    while path.exists():
        path, n = out_dir / f"{stem}-{n}.json", n + 1
    return path


def available_tasks() -> list[str]:
    return [t for t, cfg in TASKS.items() if (ROOT / "recipes" / f"{cfg['recipe']}.py").is_file()]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", nargs="+", choices=list(TASKS), help="default: every task with a recipe")
    p.add_argument("--full", action="store_true", help="full default budgets instead of the quick ones")
    p.add_argument("--epochs", type=float, help="the baseline's epochs (overrides the budget)")
    p.add_argument("--evals", type=int, help="ftkit's validation passes over its run (overrides the budget)")
    p.add_argument("--skip_baseline", help="reuse the baseline figures from this results JSON")
    p.add_argument("--out_dir", default=str(BENCH / "results"))
    p.add_argument("--ftkit_args", nargs=argparse.REMAINDER, default=[], help="extra recipe arguments (last)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(json.loads(args.worker)), default=float))
        return {}

    import torch

    sys.stdout.reconfigure(line_buffering=True)  # progress shows up under `make` and in logs
    tasks = args.task or available_tasks()
    budget = FULL if args.full else QUICK
    print(f"load before: {os.getloadavg()}; torch threads {torch.get_num_threads()}; tasks {tasks}")
    peak = measure_peak()
    print(
        f"fp32 GEMM {peak['n']}^3, GFLOP/s best: torch {peak['gflops_best']:.1f} (MKL), torch oneDNN "
        f"{peak['onednn_gflops_best']:.1f}, ONNX Runtime (MLAS) {peak['onnxruntime_gflops_best']:.1f}; "
        f"load {peak['load_mean']:.1f}"
    )
    previous = json.loads(Path(args.skip_baseline).read_text()) if args.skip_baseline else None
    from flops import machine

    report = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "machine": machine(),  # CPU model and flags (avx2, avx512*, amx*, vnni)
        "budget": "full" if args.full else "quick",
        "peak_before": peak,
        "tasks": {},
    }
    for task in tasks:
        b = dict(budget[task])
        b.update({k: v for k, v in (("baseline_epochs", args.epochs), ("ftkit_evals", args.evals)) if v})
        spec = {"task": task, "budget": b}
        if previous:
            stored = previous["tasks"][task]
            if stored["budget"].get("baseline_epochs") != b["baseline_epochs"]:
                raise SystemExit(
                    f"{args.skip_baseline}: {task} baseline budget {stored['budget']} is not {b}"
                )
            base = stored["baseline"]
        else:
            print(f"{task}: baseline, {b} ...")
            base = spawn({**spec, "side": "baseline", "extra": []})
        if b["stop_at_target"]:
            spec["stop_at"] = {"metric": base["metric"], "target": base["final_metric"]}
        print(f"{task}: ftkit, {b} {' '.join(args.ftkit_args)}; stop at {spec.get('stop_at')} ...")
        ftk = spawn({**spec, "side": "ftkit", "extra": args.ftkit_args})
        report["tasks"][task] = {"budget": b, "baseline": base, "ftkit": ftk, "compare": compare(base, ftk)}
    report["peak_after"] = measure_peak()
    peaks = [report[k] for k in ("peak_before", "peak_after")]
    peak_gflops = max(p[k] for p in peaks for k in ("gflops_best", "onednn_gflops_best"))
    # "MFU hw" is against the machine's best peak: MLAS fp32, or bf16 where it is native (AMX: 5x fp32).
    best = max(peak_gflops, *(p[k] for p in peaks for k in ("onnxruntime_gflops_best", "bf16_gflops_best")))
    report["peak_gflops"], report["best_gemm_gflops"] = peak_gflops, best
    for task, t in report["tasks"].items():
        for side in ("baseline", "ftkit"):
            t[side]["useful_mfu"] = t[side]["useful_gflops_per_second"] / peak_gflops
            t[side]["useful_mfu_best_peak"] = t[side]["useful_gflops_per_second"] / best
            t[side]["useful_mfu_hardware"] = t[side]["useful_gflops_per_second"] / best
        print_task(task, t["baseline"], t["ftkit"], t["compare"], peak_gflops, best)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    path = results_path(Path(args.out_dir))
    path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(
        f"\npeak GEMM before/after, GFLOP/s: torch {peaks[0]['gflops_best']:.1f}/{peaks[1]['gflops_best']:.1f}, "
        f"oneDNN {peaks[0]['onednn_gflops_best']:.1f}/{peaks[1]['onednn_gflops_best']:.1f}; wrote {path}"
    )
    return report


if __name__ == "__main__":
    main()
