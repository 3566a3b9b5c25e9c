"""Pick a run's fastest inference path on this machine by measurement, within an accuracy tolerance.

    choose_inference(run_dir, out_dir, texts, labels)      # `ftkit compress RUN --out OUT --choose`

The fastest path differs between CPUs (bench/README.md): on an Intel Xeon with AMX, bf16 weights in
plain torch ran 4.4x the fp32 pipeline and ONNX int8 2.0x (2026-12-02); on a CPU without native bf16,
bf16 is an emulation slower than fp32 and int8 is the candidate that can win. So every candidate is
measured here: texts/s at batch 32 with 128 tokens per text (the same work for every candidate and
every run, whatever its long-text policy), and accuracy on the given labelled texts through
`ftkit.predict.predict_texts` (the run's own max_length and policy). The fastest candidate within
`tolerance` (0.5 point) of fp32's accuracy is written to `out_dir`, and `compress.json` records every
candidate's figures and the choice; `ftkit predict out_dir` then serves it (`load_compressed`). For a
multi-label run the figure is micro-F1 at the run's per-label thresholds instead of accuracy.

Candidates: `fp32` (torch, `--linear_backend auto`), `bf16` (torch, bf16 weights; measured only where
the CPU runs bf16 natively unless asked for), `torch-int8` (torch dynamic int8 linears), `onnx-int8`
(`compress_run(quantize="int8")`, ONNX Runtime). Torch variants are stored as the fp32 safetensors
plus the runtime to apply at load, so the files stay loadable by transformers as they are.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from ftkit import DataError
from ftkit.data import row_labels
from ftkit.hardware import cpu_info, native_bf16
from ftkit.metrics import multi_label_scores
from ftkit.multilabel import MULTI_LABEL, run_thresholds

logger = logging.getLogger(__name__)

CANDIDATES = ("fp32", "bf16", "torch-int8", "onnx-int8")
TORCH_RUNTIMES = ("fp32", "bf16", "torch-int8")
TOLERANCE = 0.005  # accuracy, as a fraction: 0.5 point
BATCH_SIZE, TOKENS = 32, 128


def apply_runtime(model: torch.nn.Module, runtime: str) -> torch.nn.Module:
    """A torch model (fp32, eval mode) set up to run as `runtime` (one of TORCH_RUNTIMES)."""
    if runtime == "fp32":
        from ftkit.fastlinear import use_onednn_linear

        use_onednn_linear(model, "auto")
        return model
    if runtime == "bf16":
        return model.to(torch.bfloat16)
    if runtime == "torch-int8":
        # Linear weights int8 per tensor, activations quantized per batch (fbgemm on x86 CPUs).
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    raise ValueError(f"runtime must be one of {', '.join(TORCH_RUNTIMES)}, got {runtime!r}")


def fixed_batch(tokenizer, texts: Sequence[str], batch_size: int = BATCH_SIZE, tokens: int = TOKENS) -> dict:
    """`batch_size` of `texts` (repeated if fewer), each cut or padded to exactly `tokens` tokens."""
    picked = [texts[i % len(texts)] for i in range(batch_size)]
    enc = tokenizer(picked, truncation=True, max_length=tokens, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.inference_mode()
def measure_speed(models: dict, batch: dict, rounds: int = 3) -> dict[str, float]:
    """texts/s of each model on `batch`, best of `rounds`; candidates alternate within each round, so a
    change in machine load hits all of them alike."""
    best = dict.fromkeys(models, float("inf"))
    for model in models.values():  # warm-up: kernel selection, ONNX Runtime's first run
        model(**batch)
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(**batch)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(batch["input_ids"]) / seconds for name, seconds in best.items()}


def measure_accuracy(models: dict, tokenizer, texts: Sequence[str], labels: Sequence, info: dict) -> dict:
    """Accuracy of each model on the labelled texts, predicted as `ftkit predict` does; for a
    multi-label run (labels: lists of names) micro-F1 at the run's thresholds."""
    from ftkit.predict import predict_texts

    names = np.asarray(info["labels"])
    if info["task"] == MULTI_LABEL:
        gold = np.array([[n in set(row_labels(label)) for n in names] for label in labels])
        cut = run_thresholds(info)
        return {
            name: multi_label_scores(
                gold, predict_texts(model, tokenizer, list(texts), info, progress=False) >= cut
            )["micro_f1"]
            for name, model in models.items()
        }
    gold = np.asarray([str(label) for label in labels])
    return {
        name: float(
            np.mean(
                names[predict_texts(model, tokenizer, list(texts), info, progress=False).argmax(-1)] == gold
            )
        )
        for name, model in models.items()
    }


def choose(figures: dict[str, dict], tolerance: float = TOLERANCE, metric: str = "accuracy") -> str:
    """The fastest candidate whose `metric` is within `tolerance` of fp32's (fp32 itself always is)."""
    floor = figures["fp32"][metric] - tolerance - 1e-9  # 1e-9: exactly at the tolerance counts
    eligible = [n for n, f in figures.items() if "texts_per_s" in f and f[metric] >= floor]
    return max(eligible, key=lambda n: figures[n]["texts_per_s"])


def _build(run_dir: Path, names: Sequence[str], work: Path, texts: Sequence[str]) -> dict:
    from ftkit.compress import compress_run, load_compressed, load_torch_model

    base = load_torch_model(run_dir)
    models = {n: apply_runtime(copy.deepcopy(base), n) for n in names if n in TORCH_RUNTIMES}
    if "onnx-int8" in names:
        models["onnx-int8"] = load_compressed(
            compress_run(run_dir, work / "onnx-int8", quantize="int8", texts=list(texts)[:8])
        )
    return models


def choose_inference(
    run_dir: str | Path,
    out_dir: str | Path,
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    accuracy_on: str,
    candidates: Sequence[str] | None = None,
    tolerance: float = TOLERANCE,
) -> dict:
    """Measure the candidates for a text-classification run, write the chosen one to `out_dir` and
    return the compress.json record. `accuracy_on` says where `texts`/`labels` come from (for the
    record); `candidates` default to all, bf16 only where this CPU runs it natively."""
    from ftkit.compress import COMPRESS_FILE, _copy_run_files, load_torch_model, read_compress_record
    from ftkit.run import package_versions, read_run_info

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    info = read_run_info(run_dir)
    if info["task"] not in ("text-classification", MULTI_LABEL):
        raise DataError(
            f"{run_dir}: --choose compares accuracy, so it takes text-classification runs, not {info['task']}"
        )
    metric = "micro_f1" if info["task"] == MULTI_LABEL else "accuracy"
    if read_compress_record(run_dir).get("format") == "onnx":
        raise DataError(f"{run_dir} is an ONNX run; choose from the run it was made from")
    unknown = sorted(set(candidates or ()) - set(CANDIDATES))
    if unknown:
        raise DataError(f"unknown candidate(s) {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}")
    skipped = {}
    if candidates is None:
        candidates = list(CANDIDATES)
        if native_bf16("cpu") is None:
            skipped["bf16"] = (
                "no native bf16 on this CPU (no amx_bf16/avx512_bf16): emulated, slower than fp32"
            )
    names = ["fp32", *(n for n in candidates if n != "fp32" and n not in skipped)]
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as work:
        work = Path(work)
        models = _build(run_dir, names, work, texts)
        speed = measure_speed(models, fixed_batch(tokenizer, texts))
        accuracy = measure_accuracy(models, tokenizer, texts, labels, info)
        figures = {n: {"texts_per_s": round(speed[n], 1), metric: round(accuracy[n], 4)} for n in names}
        figures.update({n: {"skipped": why} for n, why in skipped.items()})
        chosen = choose(figures, tolerance, metric)
        for name, f in figures.items():
            logger.info("inference %-10s %s", name, f)
        if chosen == "onnx-int8":
            shutil.copytree(work / "onnx-int8", out_dir, dirs_exist_ok=True)
            record = read_compress_record(out_dir)
        else:
            _copy_run_files(run_dir, out_dir, tokenizer)
            load_torch_model(run_dir).save_pretrained(out_dir)  # fp32 files; the runtime applies at load
            record = {**read_compress_record(run_dir), "source": str(run_dir), "format": "safetensors"}
            record.update(file="model.safetensors", runtime=chosen)
            record["versions"] = package_versions(("torch", "transformers", "onnx", "onnxruntime"))
    record["choice"] = {
        "chosen": chosen,
        "rule": f"fastest within {tolerance * 100:g} point(s) of fp32 {metric}",
        "speed_at": {"batch_size": BATCH_SIZE, "tokens_per_text": TOKENS},
        "accuracy_on": accuracy_on,
        "accuracy_texts": len(texts),
        "machine": {**cpu_info(), "torch_threads": torch.get_num_threads()},
        "candidates": figures,
    }
    (out_dir / COMPRESS_FILE).write_text(json.dumps(record, indent=2))
    logger.info("inference path: %s (%s)", chosen, record["choice"]["rule"])
    return record
