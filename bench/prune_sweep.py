"""Speed vs accuracy of pruning + int8: build the variants of one run, then bench them in one process.

    PYTHONPATH=. python bench/prune_sweep.py runs/textcls/R --validation_file val.csv --train_file train.csv \
        --levels 0.25 0.5 0.75 --recover_steps 100

Variants (written next to the run as R-int8, R-p25-int8, ...): int8 alone, then for each level that fraction
of attention heads and of FFN neurons removed (importance on the validation texts), recovered by
distillation on the training texts, and quantized to int8. The table comes from bench/predict_speed.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import predict_speed  # noqa: E402

from ftkit.compress import compress_run  # noqa: E402
from ftkit.data import read_table  # noqa: E402


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
    parser.add_argument("--skip_build", action="store_true", help="bench variants built earlier")
    args, bench_args = parser.parse_known_args(argv)
    val = [r["text"] for r in read_table(args.validation_file, require_label=False)[0]]
    train = (
        [r["text"] for r in read_table(args.train_file, require_label=False)[0]] if args.train_file else None
    )

    variants = []
    for level in [0.0, *args.levels]:
        for quantize in ("int8", None) if args.fp32_pruned and level else ("int8",):
            out = args.run.parent / f"{args.run.name}-p{round(level * 100)}{'-int8' if quantize else ''}"
            if not args.skip_build:
                start = time.perf_counter()
                compress_run(
                    args.run,
                    out,
                    quantize=quantize,
                    prune_heads=level,
                    prune_ffn=level,
                    recover_steps=args.recover_steps if level else 0,
                    texts=val,
                    recover_texts=train,
                )
                record = json.loads((out / "compress.json").read_text())
                print(
                    f"built {out} in {time.perf_counter() - start:.0f} s: {record.get('recover_loss_first_last')}"
                )
            variants.append(str(out))
    predict_speed.main([str(args.run), *variants, *bench_args])


if __name__ == "__main__":
    main()
