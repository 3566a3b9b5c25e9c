"""Prediction speed and accuracy of a run and its compressed variants vs `transformers.pipeline` fp32.

    PYTHONPATH=. python bench/predict_speed.py runs/textcls/R runs/textcls/R-int8 runs/textcls/R-p50-int8
    PYTHONPATH=. python bench/predict_speed.py RUN VARIANT... --test_file test.csv --label_column label

The first directory is the reference: `transformers.pipeline("text-classification")` runs its fp32 model
on the same texts, in the same process, interleaved round by round with the variants so that a change in
machine load hits all rows alike. Every variant predicts through `ftkit.predict.predict_texts` (batched,
length-sorted). Columns: weights on disk, latency p50/p95 at batch 1, throughput at batch 32, test
accuracy. Test texts default to the reference run's test_predictions.jsonl (text + gold). The table goes
to bench_predict.json and bench_predict.md in the reference run directory (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, pipeline

from ftkit.compress import load_compressed, load_torch_model, read_compress_record
from ftkit.data import read_table
from ftkit.predict import predict_texts, read_run_info


def weights_mb(run_dir: Path) -> float:
    """Size of the model files (safetensors/ONNX, adapter included; checkpoints not)."""
    files = [
        p
        for p in run_dir.rglob("*")
        if p.suffix in {".safetensors", ".onnx"} and "checkpoints" not in p.parts
    ]
    return sum(p.stat().st_size for p in files) / 1e6


def describe(run_dir: Path) -> str:
    r = read_compress_record(run_dir)
    if not r:
        return "fp32 (ftkit predict)"
    parts = []
    if r.get("layers"):
        heads = sum(layer["heads"] for layer in r["layers"])
        parts.append(f"pruned heads {r['prune_heads']:.0%} ffn {r['prune_ffn']:.0%} ({heads} heads)")
    parts.append(
        "ONNX int8" if r.get("quantize") == "int8" else "ONNX fp32" if r["format"] == "onnx" else "fp32"
    )
    return ", ".join(parts)


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_1m": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="reference run directory, then variants")
    parser.add_argument("--test_file", type=Path, help="default: REF/test_predictions.jsonl")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--label_column", default="gold")
    parser.add_argument("--speed_texts", type=int, default=128, help="texts per throughput pass")
    parser.add_argument("--latency_texts", type=int, default=40, help="texts per latency pass (batch 1)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    parser.add_argument("--threads", type=int, help="torch and ONNX Runtime threads (default: torch's)")
    parser.add_argument("--out", type=Path, help="output directory (default: the reference run)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = args.runs[0]
    info = read_run_info(ref)
    test_rows, _, _ = read_table(
        args.test_file or ref / "test_predictions.jsonl", args.text_column, args.label_column
    )
    texts, gold = [r["text"] for r in test_rows], [str(r["label"]) for r in test_rows]
    speed_texts = (texts * (args.speed_texts // len(texts) + 1))[: args.speed_texts]
    latency_texts = speed_texts[: args.latency_texts]
    load_before = os.getloadavg()

    # Each candidate: name -> (predict(texts, batch_size) -> label names, weights MB)
    tokenizer = AutoTokenizer.from_pretrained(ref)
    pipe = pipeline("text-classification", model=load_torch_model(ref), tokenizer=tokenizer, device=-1)
    pipe_kwargs = {"truncation": True, "max_length": info["max_length"]}
    candidates = {
        "transformers.pipeline fp32": (
            lambda xs, bs: [o["label"] for o in pipe(xs, batch_size=bs, **pipe_kwargs)],
            weights_mb(ref),
            ref,
        )
    }
    for run in args.runs:
        model, tok, run_info = load_compressed(run), AutoTokenizer.from_pretrained(run), read_run_info(run)
        names = run_info["labels"]

        def predict(xs, bs, model=model, tok=tok, run_info=run_info, names=names):
            probs = predict_texts(model, tok, xs, run_info, batch_size=bs, progress=False)
            return [names[i] for i in probs.argmax(-1)]

        candidates[f"{run.name}: {describe(run)}"] = (predict, weights_mb(run), run)

    rows = {
        name: {
            "accuracy": float(
                np.mean([p == g for p, g in zip(fn(texts, args.batch_size), gold, strict=True)])
            )
        }
        for name, (fn, _, _) in candidates.items()
    }
    throughput = {name: [] for name in candidates}
    latency = {name: [] for name in candidates}
    for _ in range(args.rounds):
        for name, (fn, _, _) in candidates.items():
            fn(speed_texts[: args.batch_size], args.batch_size)  # warm-up
            start = time.perf_counter()
            fn(speed_texts, args.batch_size)
            throughput[name].append(len(speed_texts) / (time.perf_counter() - start))
            for text in latency_texts:
                start = time.perf_counter()
                fn([text], 1)
                latency[name].append(1000 * (time.perf_counter() - start))
    base = statistics.median(throughput["transformers.pipeline fp32"])
    for name, (_, size, run) in candidates.items():
        tput = statistics.median(throughput[name])
        rows[name].update(
            run=str(run),
            weights_mb=round(size, 1),
            latency_p50_ms=round(float(np.percentile(latency[name], 50)), 1),
            latency_p95_ms=round(float(np.percentile(latency[name], 95)), 1),
            throughput_per_s=round(tput, 1),
            throughput_runs=[round(t, 1) for t in throughput[name]],
            speedup_vs_pipeline=round(tput / base, 2),
        )
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "test_file": str(args.test_file or ref / "test_predictions.jsonl"),
        "test_texts": len(texts),
        "max_length": info["max_length"],
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "rows": rows,
    }
    out = args.out or ref
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_predict.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "bench_predict.md").write_text(table)
    print(table)
    return result


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Measured {result['date']} on {m['cpu']} ({m['cores']} cores, torch threads {m['torch_threads']}), "
        f"load average before/after {result['load_avg_before'][0]:.2f}/{result['load_avg_after'][0]:.2f}; "
        f"{result['test_texts']} test texts, max_length {result['max_length']}, "
        f"median of {result['rounds']} interleaved rounds.",
        "",
        f"| variant | weights MB | p50 ms (batch 1) | p95 ms (batch 1) | texts/s (batch {result['batch_size']}) "
        "| vs pipeline | test accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["rows"].items():
        lines.append(
            f"| {name} | {r['weights_mb']:.1f} | {r['latency_p50_ms']:.1f} | {r['latency_p95_ms']:.1f} "
            f"| {r['throughput_per_s']:.1f} | {r['speedup_vs_pipeline']:.2f}x | {r['accuracy']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
