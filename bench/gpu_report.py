"""The table bench/gpu_check.sh prints: train time, real tokens/s, useful MFU and the test metric per run.

    python bench/gpu_report.py --out gpu_check.json NAME:RANKS:RUN_DIR ...

Useful MFU = real (non-pad) training tokens/s x training FLOPs per token (bench/flops.py: 6 x
non-embedding parameters + attention, with the attention term at the run's max_length, an upper bound
that adds at most ~5% for MiniLM at 128 tokens) over RANKS x the GPU's peak. Two peaks: a measured
dense GEMM (8192^3, best of 10, in the run's precision) and the datasheet's dense tensor-core figure
for the GPUs in DATASHEET (None for others).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import model_shape, train_flops_per_token  # noqa: E402

# Dense (no sparsity) tensor-core TFLOP/s, bf16 and fp16 with fp32 accumulation, from NVIDIA's
# datasheets. Matched as substrings of torch.cuda.get_device_name(), first match wins.
DATASHEET = {
    "H100 SXM": {"bf16": 989, "fp16": 989},
    "H100 NVL": {"bf16": 835, "fp16": 835},
    "H100": {"bf16": 756, "fp16": 756},  # PCIe
    "A100": {"bf16": 312, "fp16": 312},
    "L40S": {"bf16": 362, "fp16": 362},
    "L4": {"bf16": 121, "fp16": 121},
    "A10G": {"bf16": 70, "fp16": 70},
    "A10": {"bf16": 125, "fp16": 125},
    "RTX 4090": {"bf16": 165, "fp16": 165},
    "V100": {"bf16": None, "fp16": 125},
    "T4": {"bf16": None, "fp16": 65},
}
METRICS = ("test_accuracy", "test_macro_f1", "test_f1", "test_rmse")


def datasheet_peak(name: str, precision: str) -> float | None:
    """TFLOP/s from DATASHEET for a device name, or None."""
    for key, peaks in DATASHEET.items():
        if key in name:
            return peaks[precision]
    return None


def measured_peak(precision: str, n: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of an n x n x n product on GPU 0 in `precision`, best of `repeats`."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    a @ b  # warm-up: cuBLAS heuristics
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def run_row(name: str, ranks: int, run_dir: Path, peaks: dict[str, dict[str, float | None]]) -> dict:
    """One run's figures from its run directory (all_results.json, ftkit_run.json, the saved model)."""
    from transformers import AutoConfig, AutoModel

    results = json.loads((run_dir / "all_results.json").read_text())
    info = json.loads((run_dir / "ftkit_run.json").read_text())
    model = AutoModel.from_config(AutoConfig.from_pretrained(run_dir))
    flops_per_token = train_flops_per_token(model_shape(model), info.get("max_length", 128))
    precision = "bf16" if "bf16" in name else "fp16"
    tokens = results["train_real_tokens_per_second"]
    row = {
        "run": name,
        "ranks": ranks,
        "train_s": results["train_runtime"],
        "real_tokens_per_s": tokens,
        "train_tflops": tokens * flops_per_token / 1e12,
        **{k: results[k] for k in METRICS if k in results},
    }
    for kind, peak in peaks[precision].items():
        row[f"mfu_{kind}"] = row["train_tflops"] / (ranks * peak) if peak else None
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="NAME:RANKS:RUN_DIR")
    p.add_argument("--out", required=True, help="JSON file for the table, GPU and peaks")
    args = p.parse_args(argv)
    import torch

    gpu = torch.cuda.get_device_name(0)
    peaks = {
        precision: {"measured": measured_peak(precision), "datasheet": datasheet_peak(gpu, precision)}
        for precision in ("bf16", "fp16")
        if precision == "fp16" or torch.cuda.is_bf16_supported()
    }
    rows = []
    for spec in args.runs:
        name, ranks, run_dir = spec.split(":", 2)
        rows.append(run_row(name, int(ranks), Path(run_dir), peaks))
    print(f"GPU: {gpu} x {torch.cuda.device_count()}; peaks TFLOP/s {json.dumps(peaks)}")
    print(
        f"{'run':<24} {'ranks':>5} {'train s':>8} {'tokens/s':>10} {'MFU meas.':>9} {'MFU sheet':>9}  metric"
    )
    for r in rows:
        metric = ", ".join(f"{k[5:]} {r[k]:.4f}" for k in METRICS if k in r)
        sheet = f"{r['mfu_datasheet']:.1%}" if r.get("mfu_datasheet") else "-"
        print(
            f"{r['run']:<24} {r['ranks']:>5} {r['train_s']:>8.1f} {r['real_tokens_per_s']:>10.0f} "
            f"{r['mfu_measured']:>9.1%} {sheet:>9}  {metric}"
        )
    Path(args.out).write_text(json.dumps({"gpu": gpu, "peaks": peaks, "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
