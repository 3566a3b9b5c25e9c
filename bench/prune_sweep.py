"""Speed vs accuracy of pruning + int8: build the variants of one run, then bench them in one process.

    PYTHONPATH=. python bench/prune_sweep.py runs/textcls/R --validation_file val.csv --train_file train.csv \
        --levels 0.25 0.5 0.75 --recover_steps 100

Variants (written next to the run as R-int8, R-p25, R-p25-int8, ...): int8 alone, then for each level that fraction
of attention heads and of FFN neurons removed (importance on the validation texts), recovered by
distillation on the training texts (kept only if it brings the model closer to the unpruned one on the
validation texts), and quantized to int8. The table comes from `ftkit.bench.bench_predict` (the same
as `ftkit bench-predict RUN VARIANT...`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ftkit.bench import bench_predict, markdown
from ftkit.compress import compress_run
from ftkit.data import read_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--validation_file", type=Path, required=True, help="texts for importance")
    parser.add_argument("--train_file", type=Path, help="texts for recovery (default: validation texts)")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--recover_steps", type=int, default=100)
    parser.add_argument("--fp32_pruned", action="store_true", help="also bench the pruned fp32 models")
    parser.add_argument("--max_texts", type=int, default=128, help="validation texts used for importance")
    parser.add_argument("--test_file", type=Path, help="default: the run's test_predictions.jsonl")
    args = parser.parse_args(argv)
    val = [r["text"] for r in read_table(args.validation_file, require_label=False)[0]][: args.max_texts]
    train = (
        [r["text"] for r in read_table(args.train_file, require_label=False)[0]] if args.train_file else None
    )

    def build(src: Path, out: Path, **kwargs) -> None:
        if (out / "compress.json").exists():  # built by an earlier sweep: delete the folder to rebuild
            return
        start = time.perf_counter()
        compress_run(src, out, **kwargs)
        record = json.loads((out / "compress.json").read_text())
        recovery = ""
        if record.get("recover_gap_before_after"):
            before, after = record["recover_gap_before_after"]
            kept = "kept" if record["recover_kept"] else "dropped"
            recovery = (
                f"; recovery {kept}: distillation gap on the importance texts {before:.4f} -> {after:.4f}"
            )
        print(f"built {out} in {time.perf_counter() - start:.0f} s{recovery}")

    name = args.run.parent / args.run.name
    variants = [Path(f"{name}-int8")]
    build(args.run, variants[0], quantize="int8")
    for level in args.levels:
        # Prune once (fp32, safetensors), then quantize that model: pruning is the slow step.
        pruned, pruned_int8 = (
            Path(f"{name}-p{round(level * 100)}"),
            Path(f"{name}-p{round(level * 100)}-int8"),
        )
        build(
            args.run,
            pruned,
            prune_heads=level,
            prune_ffn=level,
            recover_steps=args.recover_steps,
            texts=val,
            recover_texts=train,
        )
        build(pruned, pruned_int8, quantize="int8")
        variants += [pruned, pruned_int8] if args.fp32_pruned else [pruned_int8]
    print(markdown(bench_predict([args.run, *variants], test_file=args.test_file)))


if __name__ == "__main__":
    main()
