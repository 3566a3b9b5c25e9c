"""Prediction speed and accuracy of a run and its compressed variants vs `transformers.pipeline` fp32.

`bench_predict(runs)` measures, in one process and interleaved round by round (so that a change in machine
load hits all rows alike): model files on disk, latency p50/p95 at batch 1, throughput at batch 32 and test
accuracy. The first run is the reference; `transformers.pipeline("text-classification")` runs its fp32 model
on the same texts. Every run predicts through `ftkit.predict.predict_texts` (batched, length-sorted), with
compressed variants opened by `ftkit.compress.load_compressed`. Text classification only.

`speed_tokens` gives every variant the same work whatever the runs' long-text policies: the speed and
latency texts are cut to their first `speed_tokens` tokens (decoded back to text) before any variant sees
them, so a head_tail or chunks run does no more per text than the pipeline does. Accuracy is always
measured on the whole test texts, each run applying its own recorded policy.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import pipeline

from ftkit.compress import load_compressed, load_torch_model, read_compress_record
from ftkit.data import read_table
from ftkit.predict import predict_texts, run_tokenizer
from ftkit.run import read_run_info

PIPELINE = "transformers.pipeline fp32"


def weights_mb(run_dir: Path) -> float:
    """Size of the model files (safetensors/ONNX, adapter included; checkpoints not), in MB."""
    files = [
        p
        for p in run_dir.rglob("*")
        if p.suffix in {".safetensors", ".onnx"} and "checkpoints" not in p.parts
    ]
    return sum(p.stat().st_size for p in files) / 1e6


def describe(run_dir: Path) -> str:
    """One-line description of a variant from its compress.json."""
    r = read_compress_record(run_dir)
    if not r:
        return "fp32 (ftkit predict)"
    parts = []
    if r.get("layers"):
        heads = sum(layer["heads"] for layer in r["layers"])
        ffn = sum(layer["intermediate"] for layer in r["layers"])
        parts.append(
            f"pruned heads {r['prune_heads']:.0%} ffn {r['prune_ffn']:.0%} ({heads} heads, {ffn} ffn)"
        )
    if r.get("runtime"):  # `ftkit compress --choose`: fp32 files, run as the measured runtime
        parts.append(f"{r['runtime']} (chosen by measurement)")
    else:
        parts.append(
            "ONNX int8" if r.get("quantize") == "int8" else "ONNX fp32" if r["format"] == "onnx" else "fp32"
        )
    return ", ".join(parts)


def cut_to_tokens(tokenizer, texts: Sequence[str], tokens: int) -> list[str]:
    """Each text cut to its first `tokens` tokens (special tokens counted), decoded back to text."""
    ids = tokenizer(list(texts), truncation=True, max_length=tokens)["input_ids"]
    return [tokenizer.decode(i, skip_special_tokens=True) for i in ids]


def machine() -> dict:
    """CPU model, core count, speed-relevant flags (avx2, avx512*, amx*, vnni) and torch threads, for the record."""
    from ftkit.hardware import cpu_info

    return {**cpu_info(), "torch_threads": torch.get_num_threads()}


def _predictors(runs: Sequence[Path]) -> dict[str, tuple[Callable, Path]]:
    """name -> (predict(texts, batch_size) -> label names, run dir); the pipeline first."""
    ref = runs[0]
    info = read_run_info(ref)
    pipe = pipeline(
        "text-classification",
        model=load_torch_model(ref),
        tokenizer=run_tokenizer(ref),
        device=-1,
    )
    kwargs = {"truncation": True, "max_length": info["max_length"]}
    out = {PIPELINE: (lambda xs, bs: [o["label"] for o in pipe(xs, batch_size=bs, **kwargs)], ref)}
    for run in runs:
        model, tok, run_info = load_compressed(run), run_tokenizer(run), read_run_info(run)

        def predict(xs, bs, model=model, tok=tok, run_info=run_info):
            probs = predict_texts(model, tok, list(xs), run_info, batch_size=bs, progress=False)
            return [run_info["labels"][i] for i in probs.argmax(-1)]

        out[f"{run.name}: {describe(run)}"] = (predict, run)
    return out


def bench_predict(
    runs: Sequence[str | Path],
    *,
    test_file: str | Path | None = None,
    text_column: str = "text",
    label_column: str = "gold",
    speed_texts: int = 128,
    speed_tokens: int | None = None,
    latency_texts: int = 40,
    batch_size: int = 32,
    rounds: int = 3,
    out_dir: str | Path | None = None,
) -> dict:
    """Bench `runs` (reference first) against the pipeline; write bench_predict.json/.md; return the result.

    Test texts and gold labels default to the reference run's test_predictions.jsonl. Throughput is the
    median over `rounds` passes of `speed_texts` texts (test texts, repeated if too few); latency
    percentiles pool `latency_texts` single-text calls from every round.
    """
    runs = [Path(r) for r in runs]
    test_file = Path(test_file or runs[0] / "test_predictions.jsonl")
    rows, _, _ = read_table(test_file, text_column, label_column)
    texts, gold = [r["text"] for r in rows], [str(r["label"]) for r in rows]
    speed = (texts * (speed_texts // len(texts) + 1))[:speed_texts]
    if speed_tokens:
        speed = cut_to_tokens(run_tokenizer(runs[0]), speed, speed_tokens)
    load_before = os.getloadavg()
    predictors = _predictors(runs)

    result_rows = {}
    for name, (fn, run) in predictors.items():
        correct = [p == g for p, g in zip(fn(texts, batch_size), gold, strict=True)]
        result_rows[name] = {
            "run": str(run),
            "weights_mb": round(weights_mb(run), 1),
            "accuracy": float(np.mean(correct)),
        }
    throughput = {name: [] for name in predictors}
    latency = {name: [] for name in predictors}
    for _ in range(rounds):
        for name, (fn, _run) in predictors.items():
            fn(speed[:batch_size], batch_size)  # warm-up: allocator and thread pools
            start = time.perf_counter()
            fn(speed, batch_size)
            throughput[name].append(len(speed) / (time.perf_counter() - start))
            for text in speed[:latency_texts]:
                start = time.perf_counter()
                fn([text], 1)
                latency[name].append(1000 * (time.perf_counter() - start))
    base = statistics.median(throughput[PIPELINE])
    for name, r in result_rows.items():
        r.update(
            latency_p50_ms=round(float(np.percentile(latency[name], 50)), 1),
            latency_p95_ms=round(float(np.percentile(latency[name], 95)), 1),
            throughput_per_s=round(statistics.median(throughput[name]), 1),
            throughput_runs=[round(t, 1) for t in throughput[name]],
            speedup_vs_pipeline=round(statistics.median(throughput[name]) / base, 2),
        )
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "test_file": str(test_file),
        "test_texts": len(texts),
        "max_length": read_run_info(runs[0])["max_length"],
        "speed_tokens": speed_tokens,
        "batch_size": batch_size,
        "rounds": rounds,
        "rows": result_rows,
    }
    out_dir = Path(out_dir or runs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_predict.json").write_text(json.dumps(result, indent=2))
    (out_dir / "bench_predict.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    """The result as a markdown table with its date, machine and load."""
    m = result["machine"]
    lines = [
        f"Measured {result['date']} on {m['cpu']} ({m['cores']} cores, torch threads {m['torch_threads']}), "
        f"load average (1 min) before/after {result['load_avg_before'][0]:.2f}/{result['load_avg_after'][0]:.2f}; "
        f"{result['test_texts']} test texts, max_length {result['max_length']}, "
        + (f"speed at {result['speed_tokens']} tokens per text, " if result.get("speed_tokens") else "")
        + f"median of {result['rounds']} interleaved rounds.",
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
