"""Run a recipe with several training seeds and report mean ± sd of its test figures.

    python bench/seeds.py textcls                             # seeds 42 43 44, the default command
    python bench/seeds.py ner --seeds 1 2 3 -- --max_steps 50 # recipe options after --

Only `--seed` changes between runs: the split has its own seed (`--split_seed`, default 42), so every
run scores the same test rows and the spread is the training's alone. Prints mean ± sd (sample sd,
n-1) of every `test_*` and `baseline_test_*` figure and writes
bench/results/<date>-<host>-seeds-<recipe>.json with each run's figures, and beside it
<same name>.predictions.json.gz with each run's test predictions, so that runs in other precisions or
on other machines can be compared prediction by prediction, sessions later:

    python bench/seeds.py agree A.json B.json     # per seed: share of the same test predictions

Wall times are comparable only when taken under `flock /tmp/ftkit-measure.lock`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ftkit.hardware import cpu_info

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


def kept_predictions(run_dir: Path) -> dict[str, list]:
    """A run's test predictions without the texts: {"rows": one label (label set, score) per test row}
    from test_predictions.jsonl, or {"sentences": one list of tags per sentence} from NER's
    test_predictions.conll (word, gold tag, predicted tag per line; a blank line ends a sentence)."""
    conll = run_dir / "test_predictions.conll"
    if conll.exists():
        sentences, current = [], []
        for line in conll.read_text(encoding="utf-8").splitlines() + [""]:
            if line.strip():
                if not line.startswith("-DOCSTART-"):
                    current.append(line.split()[-1])
            elif current:
                sentences.append(current)
                current = []
        return {"sentences": sentences}
    rows = [json.loads(line) for line in (run_dir / "test_predictions.jsonl").open(encoding="utf-8")]
    key = next(k for k in ("label", "labels", "score") if k in rows[0])
    return {"rows": [row[key] for row in rows]}


def sidecar(result_json: Path) -> Path:
    return result_json.with_name(result_json.name.removesuffix(".json") + ".predictions.json.gz")


def agreement(a: dict[str, list], b: dict[str, list]) -> dict[str, float]:
    """Share of test rows (NER: sentences, and words) that two runs predict the same; for scores
    (regression) the mean absolute difference instead."""
    kind = "sentences" if "sentences" in a else "rows"
    x, y = a[kind], b.get(kind, [])
    if len(x) != len(y):
        raise SystemExit(f"the runs scored different test sets: {len(x)} against {len(y)} {kind}")
    if x and isinstance(x[0], float):
        return {"mean_abs_diff": statistics.fmean(abs(p - q) for p, q in zip(x, y, strict=True))}
    out = {kind: sum(p == q for p, q in zip(x, y, strict=True)) / len(x)}
    if kind == "sentences":
        words = [(p, q) for sp, sq in zip(x, y, strict=True) for p, q in zip(sp, sq, strict=True)]
        out["words"] = sum(p == q for p, q in words) / len(words)
    return out


def agree(path_a: str, path_b: str) -> dict[str, dict[str, float]]:
    """Per seed both results share: the agreement of their test predictions (from the sidecars)."""
    a, b = (json.loads(gzip.decompress(sidecar(Path(p)).read_bytes())) for p in (path_a, path_b))
    out = {seed: agreement(a[seed], b[seed]) for seed in a if seed in b}
    if not out:
        raise SystemExit(f"no seed in common: {sorted(a)} against {sorted(b)}")
    for seed, figures in out.items():
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
    return out


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["agree"]:
        if len(argv) != 3:
            raise SystemExit("usage: python bench/seeds.py agree A.json B.json")
        return agree(argv[1], argv[2])
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", choices=["textcls", "sentiment", "ratings", "ner"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--out", help="result JSON (default bench/results/<date>-<host>-seeds-<recipe>.json)")
    args = parser.parse_args(own)
    machine = {**cpu_info(), "load_at_start": os.getloadavg()}  # walls mean little under load
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs, walls, predictions = [], [], {}
    for seed in args.seeds:
        out = HERE / "runs" / f"seeds-{args.recipe}-{stamp}-{seed}"
        cmd = [sys.executable, str(ROOT / "recipes" / f"{args.recipe}.py"), "--seed", str(seed)]
        cmd += ["--output_dir", str(out), "--disable_tqdm", "true", *extra]
        start = time.time()
        subprocess.run(cmd, check=True)
        walls.append(round(time.time() - start, 1))
        runs.append(json.loads((out / "all_results.json").read_text(encoding="utf-8")))
        predictions[str(seed)] = kept_predictions(out)
    summary = summarize(runs)
    for k, s in summary.items():
        print(f"{k:36s} {s['mean']:.4f} ± {s['sd']:.4f}  (min {s['min']:.4f}, max {s['max']:.4f})")
    result = {
        "recipe": args.recipe, "seeds": args.seeds, "args": extra, "host": socket.gethostname(),
        "date": time.strftime("%Y-%m-%d"), "machine": machine, "wall_seconds": walls, "summary": summary,
        "runs": [{k: v for k, v in r.items() if k.startswith(("test_", "baseline_", "eval_"))} for r in runs],
    }  # fmt: skip
    path = (
        Path(args.out)
        if args.out
        else HERE / "results" / f"{result['date']}-{result['host']}-seeds-{args.recipe}.json"
    )
    path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    sidecar(path).write_bytes(gzip.compress(json.dumps(predictions).encode(), mtime=0))
    print(f"wrote {path} and {sidecar(path).name}")
    return result


if __name__ == "__main__":
    main()
