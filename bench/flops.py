"""Model FLOPs per token, the machine's measured GEMM peaks (fp32, bf16, int8), and MFU.

    python bench/flops.py --out bench/results/DATE-vm-flops.json    # this machine's peaks, CPU and flags

The peaks differ by an order of magnitude between CPUs (bench/README.md): an AMX Xeon multiplies bf16
5x faster than fp32, a CPU without native bf16 emulates it far slower. MFU is reported against the
machine's best peak (`best_peak`), whatever precision the run used, and against the peak of its own.

Counting convention (Kaplan et al. 2020; Chowdhury et al. 2022, PaLM appendix B):
- a weight matrix with N parameters costs 2N FLOPs per token forward and 4N backward (2N for the
  input gradient, 2N for the weight gradient), so full fine-tuning costs 6N per token;
- a frozen weight still needs the input gradient (2N) but not the weight gradient: 4N per token,
  plus 6N per token for each trainable parameter (LoRA adapters, the head);
- attention scores and the weighted sum cost 4*d*T per token and layer forward (T = tokens in the
  sequence, d = hidden size), 12*L*d*T forward + backward.
N counts parameters outside the embedding tables (`nn.Embedding`), as is usual: a lookup has no
multiply-adds. "Useful" FLOPs count real (non-pad) tokens only, with T the sequence's real length.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ModelShape:
    """What the FLOPs formula needs from a model."""

    n_nonembedding: int  # parameters outside nn.Embedding tables (frozen + trainable)
    n_trainable: int  # parameters with requires_grad
    layers: int
    hidden: int
    frozen_body: bool  # LoRA or a frozen encoder: the non-embedding weights mostly get no gradient


def model_shape(model) -> ModelShape:
    """Count a (possibly LoRA-wrapped) transformers encoder's parameters for `train_flops_per_token`."""
    import torch

    embedding = {
        id(p)
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding)
        for p in m.parameters(recurse=False)
    }
    params = list(model.parameters())
    n_ne = sum(p.numel() for p in params if id(p) not in embedding)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    config = model.config
    # Full fine-tuning trains (nearly) every non-embedding weight; a LoRA/frozen body trains few.
    frozen = trainable < 0.5 * n_ne
    # LoRA adapters are counted once, as trainable, not also as body weights.
    if frozen:
        n_ne -= sum(p.numel() for p in params if p.requires_grad and id(p) not in embedding)
    return ModelShape(n_ne, trainable, config.num_hidden_layers, config.hidden_size, frozen)


def train_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token of a sequence of `seq_len` tokens.

    Full fine-tuning: 6*N_ne + 12*L*d*T. Frozen body (LoRA): 4*N_ne + 12*L*d*T + 6*N_trainable.
    """
    attention = 12 * shape.layers * shape.hidden * seq_len
    if shape.frozen_body:
        return 4 * shape.n_nonembedding + attention + 6 * shape.n_trainable
    return 6 * shape.n_nonembedding + attention


def train_flops(shape: ModelShape, lengths: list[int]) -> float:
    """Training FLOPs of a batch whose sequences have `lengths` tokens each (sum over tokens)."""
    return float(sum(n * train_flops_per_token(shape, n) for n in lengths))


def mfu(flops: float, seconds: float, peak_flops_per_second: float) -> float:
    """Model FLOPs utilization: achieved FLOP/s as a share of the peak FLOP/s."""
    return flops / seconds / peak_flops_per_second


def gemm_peak(n: int = 4096, repeats: int = 5, dtype: str = "float32", backend: str = "torch") -> dict:
    """GFLOP/s of an n x n x n matrix product with torch's current thread count (best of `repeats`).

    backend: `torch` is `a @ b` (MKL for fp32 in the CPU wheel), `onednn` the same product through
    oneDNN's linear kernel, which ftkit's `--linear_backend` uses. The best run, not the mean: the
    peak is what the hardware can do when nothing interferes; load only ever lowers a run.
    """
    import torch

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dt)
    b = torch.randn(n, n, generator=gen).to(dt)
    if backend == "onednn":
        from ftkit.fastlinear import mm_t

        def product():
            return mm_t(a, b)  # a @ b.T, the kernel ftkit's linear layers use

    else:

        def product():
            return a @ b

    product()  # warm-up: thread pool, oneDNN/MKL kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    flops = 2 * n**3
    return {
        "n": n,
        "dtype": dtype,
        "backend": backend,
        "threads": torch.get_num_threads(),
        "gflops_best": flops / min(times) / 1e9,
        "gflops_median": flops / sorted(times)[len(times) // 2] / 1e9,
    }


def int8_gemm_peak(n: int = 4096, repeats: int = 5) -> dict:
    """GOP/s of an n x n x n int8 x int8 -> int32 product (`torch._int_mm`; VNNI/AMX-INT8 where present)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=gen)
    b = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=gen)
    torch._int_mm(a, b)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch._int_mm(a, b)
        times.append(time.perf_counter() - start)
    return {"n": n, "dtype": "int8", "backend": "torch._int_mm", "threads": torch.get_num_threads(),
            "gflops_best": 2 * n**3 / min(times) / 1e9}  # fmt: skip


def machine() -> dict:
    """CPU model and its speed-relevant flags (avx2, avx512*, amx*, vnni), threads, load: for every results file."""
    import torch

    from ftkit.hardware import cpu_info, native_bf16

    return {
        **cpu_info(),
        "native_bf16": native_bf16(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d"),
    }


def bf16_peak(n: int = 4096, repeats: int = 5) -> float:
    """The faster of torch's and oneDNN's bf16 GEMM, GFLOP/s (at 512^3 where bf16 is not native: see all_peaks)."""
    from ftkit.hardware import native_bf16

    if not native_bf16():
        n, repeats = 512, 2
    best = 0.0
    for backend in ("torch", "onednn"):
        with contextlib.suppress(RuntimeError):  # oneDNN has no bf16 kernel for CPUs without AVX-512
            best = max(best, gemm_peak(n, repeats, dtype="bfloat16", backend=backend)["gflops_best"])
    return best


def all_peaks(n: int = 4096, repeats: int = 5) -> dict:
    """Every GEMM peak of this machine, GFLOP/s (GOP/s for int8): fp32 (MKL, oneDNN), bf16 (torch,
    oneDNN), int8, and `best_peak`, the largest, which MFU is measured against. A kernel this CPU
    lacks is left out (oneDNN has no bf16 without AVX-512); where bf16 is not native it is measured
    at 512^3 only (measured: 0.4 GFLOP/s on an AVX2-only AMD EPYC, 2026-12-02: 4096^3 would take minutes),
    and so is int8 without VNNI/AMX-INT8 (0.35 GOP/s there)."""
    from ftkit.hardware import cpu_flags, native_bf16

    bf16_n, bf16_repeats = (n, repeats) if native_bf16() else (512, 2)
    int8_dot = any("vnni" in f or f == "amx_int8" for f in cpu_flags())
    int8_n, int8_repeats = (n, repeats) if int8_dot else (512, 2)
    runs = {
        "fp32_mkl": lambda: gemm_peak(n, repeats),
        "fp32_onednn": lambda: gemm_peak(n, repeats, backend="onednn"),
        "bf16_torch": lambda: gemm_peak(bf16_n, bf16_repeats, dtype="bfloat16"),
        "bf16_onednn": lambda: gemm_peak(bf16_n, bf16_repeats, dtype="bfloat16", backend="onednn"),
        "int8": lambda: int8_gemm_peak(int8_n, int8_repeats),
    }
    peaks, missing = {}, {}
    for name, run in runs.items():
        try:
            peaks[name] = round(run()["gflops_best"], 1)
        except RuntimeError as err:  # no such kernel for this CPU in this torch build
            missing[name] = str(err).splitlines()[0][:120]
    fp32 = max(v for k, v in peaks.items() if k.startswith("fp32"))
    bf16 = max((v for k, v in peaks.items() if k.startswith("bf16")), default=0.0)
    return {**peaks, "fp32": fp32, "bf16": bf16, "best_peak": max(fp32, bf16), "n": n, "bf16_n": bf16_n,
            "int8_n": int8_n, "missing": missing}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description="This machine's GEMM peaks (fp32, bf16, int8), CPU model and flags."
    )
    p.add_argument("--n", type=int, default=4096, help="square GEMM size")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    result = {"machine": machine(), "peaks_gflops": all_peaks(args.n, args.repeats)}
    result["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def onnxruntime_gemm_peak(n: int = 4096, repeats: int = 5, threads: int | None = None) -> dict:
    """GFLOP/s of the same n x n x n fp32 product in ONNX Runtime (its MLAS kernels), best of `repeats`.

    A second opinion on the hardware: torch's CPU GEMM is MKL's, whose code path on some CPUs (seen:
    AMD Zen 5) reaches half of what MLAS does, so "the peak" torch measures is torch's ceiling there.
    """
    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    spec = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ABC"]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm", spec[:2], spec[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {
        "A": rng.standard_normal((n, n), dtype=np.float32),
        "B": rng.standard_normal((n, n), dtype=np.float32),
    }
    session.run(None, feed)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return {"n": n, "threads": options.intra_op_num_threads, "gflops_best": 2 * n**3 / min(times) / 1e9}


if __name__ == "__main__":
    main()
