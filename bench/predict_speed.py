"""Prediction speed and accuracy of a run and its compressed variants vs `transformers.pipeline` fp32.

    PYTHONPATH=. python bench/predict_speed.py runs/textcls/R runs/textcls/R-p0-int8 runs/textcls/R-p50-int8
    PYTHONPATH=. python bench/predict_speed.py RUN VARIANT... --test_file test.csv --label_column label

The first directory is the reference (the pipeline runs its fp32 model). Test texts default to its
test_predictions.jsonl (text + gold). Prints the table and writes bench_predict.json/.md to the reference
run (or --out). The measuring code is `ftkit.bench.bench_predict` (also behind `ftkit bench-predict`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ftkit.bench import bench_predict, markdown


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="reference run directory, then variants")
    parser.add_argument("--test_file", type=Path, help="default: REF/test_predictions.jsonl")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--label_column", default="gold")
    parser.add_argument("--speed_texts", type=int, default=128, help="texts per throughput pass")
    parser.add_argument("--latency_texts", type=int, default=40, help="single-text calls per round")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--threads", type=int, help="torch and ONNX Runtime threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="output directory (default: the reference run)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # ONNX Runtime sessions follow torch.get_num_threads()
    result = bench_predict(
        args.runs,
        test_file=args.test_file,
        text_column=args.text_column,
        label_column=args.label_column,
        speed_texts=args.speed_texts,
        latency_texts=args.latency_texts,
        batch_size=args.batch_size,
        rounds=args.rounds,
        out_dir=args.out,
    )
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
