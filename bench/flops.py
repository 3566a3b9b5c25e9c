"""Model FLOPs per token, the measured fp32 GEMM peak, and model FLOPs utilization (MFU).

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

import time
from dataclasses import dataclass


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
