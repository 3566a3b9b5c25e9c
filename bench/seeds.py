"""Run a recipe with several training seeds and report mean ± sd of its test figures.

    python bench/seeds.py textcls                             # seeds 42 43 44, the default command
    python bench/seeds.py ner --seeds 1 2 3 -- --max_steps 50 # recipe options after --

Only `--seed` changes between runs: the split has its own seed (`--split_seed`, default 42), so every
run scores the same test rows and the spread is the training's alone. Prints mean ± sd (sample sd,
n-1) of every `test_*` and `baseline_test_*` figure and writes
bench/results/<date>-<host>-seeds-<recipe>.json with each run's figures. Wall times are comparable
only when taken under `flock /tmp/ftkit-measure.lock`.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Figures worth a mean: scores, not counts or speeds.
SKIP = ("_runtime", "_per_second", "_rows", "_support", "_words", "_truncated", "_chunk_rows", "_sentences")


def summarize(runs: list[dict]) -> dict[str, dict[str, float]]:
    """mean, sd (n-1; 0 for one run), min and max of every numeric test/baseline figure the runs share."""
    keys = [
        k for k, v in runs[0].items()
        if k.startswith(("test_", "baseline_test_")) and isinstance(v, int | float) and not isinstance(v, bool)
        and not k.endswith(SKIP) and all(k in r for r in runs)
    ]  # fmt: skip
    out = {}
    for k in keys:
        values = [float(r[k]) for r in runs]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        out[k] = {"mean": statistics.fmean(values), "sd": sd, "min": min(values), "max": max(values)}
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", choices=["textcls", "sentiment", "ratings", "ner"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--out", help="result JSON (default bench/results/<date>-<host>-seeds-<recipe>.json)")
    args = parser.parse_args(own)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs, walls = [], []
    for seed in args.seeds:
        out = HERE / "runs" / f"seeds-{args.recipe}-{stamp}-{seed}"
        cmd = [sys.executable, str(ROOT / "recipes" / f"{args.recipe}.py"), "--seed", str(seed)]
        cmd += ["--output_dir", str(out), "--disable_tqdm", "true", *extra]
        start = time.time()
        subprocess.run(cmd, check=True)
        walls.append(round(time.time() - start, 1))
        runs.append(json.loads((out / "all_results.json").read_text(encoding="utf-8")))
    summary = summarize(runs)
    for k, s in summary.items():
        print(f"{k:36s} {s['mean']:.4f} ± {s['sd']:.4f}  (min {s['min']:.4f}, max {s['max']:.4f})")
    result = {
        "recipe": args.recipe, "seeds": args.seeds, "args": extra, "host": socket.gethostname(),
        "date": time.strftime("%Y-%m-%d"), "wall_seconds": walls, "summary": summary,
        "runs": [{k: v for k, v in r.items() if k.startswith(("test_", "baseline_", "eval_"))} for r in runs],
    }  # fmt: skip
    path = (
        Path(args.out)
        if args.out
        else HERE / "results" / f"{result['date']}-{result['host']}-seeds-{args.recipe}.json"
    )
    path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
