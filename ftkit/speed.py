"""Speed options for training, applied by one explicit call after loading a model.

    model = load_model(...)
    speed, training_args = speed_up(model, speed_args, training_args, options)
    # results.update(speed): what was chosen, and why (with the measured GFLOP/s)

Each option is a small function here (or in its own module, `ftkit.fastlinear`); none changes the
weights, the saved files or the module types. The precision is a TrainingArguments decision
(`bf16=True` is autocast: weights, optimizer state and saved files stay fp32).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ftkit import fastlinear
from ftkit.config import Options
from ftkit.fastlinear import CHOICES as LINEAR_BACKENDS
from ftkit.fastlinear import use_onednn_linear
from ftkit.hardware import native_bf16

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
# bf16 rounds activations and gradients: `auto` takes it only when the probe shows a clear gain.
BF16_MARGIN = 1.1


@dataclass
class SpeedArguments:
    """How the model runs on a CPU (recipes/README.md, "Speed on a CPU"). Results do not depend on them
    beyond rounding, except attention_dropout and hidden_dropout, which are training choices."""

    attention_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout on attention probabilities (BERT-style models; the checkpoints use 0.1). With 0, "
            "attention on a CPU stays in the fused SDPA kernel; with dropout it does not (measured: 25%% of a "
            "training step). Models without attention_probs_dropout_prob keep their own."
        },
    )
    hidden_dropout: float | None = field(
        default=None,
        metadata={
            "help": "Dropout on the encoder's hidden states (BERT-style models: embeddings and each layer's two "
            "outputs; the classifier head keeps its own). Default: the checkpoint's (0.1 for MiniLM). Drawing "
            "the masks is 18%% of a bf16 training step on an AMX CPU (bench/README.md)."
        },
    )
    linear_backend: str = field(
        default="auto",
        metadata={
            "help": "fp32 linear layers on CPU: onednn, torch (MKL), or auto: oneDNN when it measures at least "
            "15%% faster here, at the model's shapes (2x on AMD Zen 5). Both are exact fp32.",
            "choices": list(LINEAR_BACKENDS),
        },
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "Training precision: fp32, bf16 (autocast; weights and saved files stay fp32), or auto: "
            "bf16 where the hardware runs it natively (CPU flag amx_bf16 or avx512_bf16, or a CUDA GPU with "
            "bf16) and a probe at the model's shapes measures it faster than fp32. --bf16/--fp16 win.",
            "choices": list(PRECISIONS),
        },
    )


def set_attention_dropout(model: nn.Module, p: float) -> bool:
    """Set the attention-probability dropout of a BERT-style model to `p`; False if the model has none."""
    if not hasattr(model.config, "attention_probs_dropout_prob"):
        return False
    for name, module in model.named_modules():
        if name.endswith("attention.self.dropout"):
            module.p = p
    model.config.attention_probs_dropout_prob = p
    return True


def set_hidden_dropout(model: nn.Module, p: float | None) -> bool:
    """Set a BERT-style encoder's hidden-state dropout to `p` (None: leave it); False if it has none."""
    if p is None or not hasattr(model.config, "hidden_dropout_prob"):
        return False
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and name.endswith(("embeddings.dropout", "output.dropout")):
            module.p = p
    if getattr(model.config, "classifier_dropout", 0) is None:  # the head's own stays as loaded
        model.config.classifier_dropout = model.config.hidden_dropout_prob
    model.config.hidden_dropout_prob = p
    return True


def measure_precision(
    hidden: int, intermediate: int, device: str = "cpu", tokens: int = 2048, repeats: int = 5
) -> dict[str, float]:
    """GFLOP/s of forward + backward of one linear at the model's FFN shape, in fp32 (on a CPU the faster
    of torch's and oneDNN's kernels, as `--linear_backend auto` would run it) and in bf16 autocast
    (weights cast on each call, as in training). About 0.1-0.3 s where bf16 is native."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(device).requires_grad_()
    w = torch.randn(intermediate, hidden, generator=gen).to(device).requires_grad_()
    g = torch.randn(tokens, intermediate, generator=gen).to(device)
    flops = 3 * 2 * tokens * hidden * intermediate
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def gflops(bf16: bool) -> float:
        def step():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                y = F.linear(x, w)
            y.backward(g.to(y.dtype))
            x.grad = w.grad = None

        step()  # first call: kernel selection and caches
        best = float("inf")
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            step()
            sync()
            best = min(best, time.perf_counter() - start)
        return flops / best / 1e9

    if device == "cpu" and fastlinear.available() and fastlinear.op_matches_f_linear():
        fp32 = max(fastlinear.measure(hidden, intermediate, tokens, repeats).values())  # MKL and oneDNN
    else:
        fp32 = gflops(bf16=False)
    return {"fp32": fp32, "bf16": gflops(bf16=True)}


def choose_precision(model: nn.Module, precision: str, device: str) -> dict[str, Any]:
    """`precision` (auto, fp32 or bf16) resolved for `device`: {"precision", "precision_why"} and, for
    auto where bf16 is native, the probe's GFLOP/s (`measure_precision`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        if precision == "bf16" and not native_bf16(device):
            logger.warning("precision bf16 on a %s without native bf16: emulated, expect it slower", device)
        return {"precision": precision, "precision_why": f"--precision {precision}"}
    native = native_bf16(device)
    if native is None:
        why = "no native bf16 here (no amx_bf16/avx512_bf16 CPU flag, no bf16 GPU): it would be emulated"
        return {"precision": "fp32", "precision_why": why}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    biggest = max(linears, key=lambda m: m.weight.numel())
    hidden, intermediate = sorted((biggest.in_features, biggest.out_features))
    try:
        speed = measure_precision(hidden, intermediate, device)
    except RuntimeError as err:
        return {"precision": "fp32", "precision_why": f"native bf16 ({native}) but the probe failed: {err}"}
    chosen = "bf16" if speed["bf16"] >= BF16_MARGIN * speed["fp32"] else "fp32"
    return {
        "precision": chosen,
        "precision_why": f"auto: native bf16 ({native}); probe bf16 {speed['bf16']:.0f} vs fp32 "
        f"{speed['fp32']:.0f} GFLOP/s at {hidden}x{intermediate} (bf16 needs {BF16_MARGIN}x)",
        "precision_gflops_fp32": round(speed["fp32"], 1),
        "precision_gflops_bf16": round(speed["bf16"], 1),
    }


def _same_on_every_rank(decision: dict[str, Any]) -> dict[str, Any]:
    """Rank 0's decision on every rank: each rank probes alone, and ranks must train alike."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    if PartialState().num_processes == 1:
        return decision
    box = [decision]
    broadcast_object_list(box)
    return box[0]


def speed_up(
    model: nn.Module, args: SpeedArguments, training_args: Any, options: Options
) -> tuple[dict, Any]:
    """Apply the speed options to a freshly loaded model (before LoRA wraps it) and decide the training
    precision. Returns the decisions (linear backend, precision, their measured GFLOP/s) for
    all_results.json, and `training_args` with `bf16` decided (an explicit --bf16/--fp16 wins)."""
    set_attention_dropout(model, args.attention_dropout)
    set_hidden_dropout(model, args.hidden_dropout)
    decision = use_onednn_linear(model, args.linear_backend)
    if options.user_set("bf16") or options.user_set("fp16"):
        chosen = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
        decision.update(precision=chosen, precision_why="--bf16/--fp16 given")
        return decision, training_args
    device = "cuda" if torch.cuda.is_available() and not training_args.use_cpu else "cpu"
    choice = _same_on_every_rank(choose_precision(model, args.precision, device))
    logger.info("precision: %s (%s)", choice["precision"], choice["precision_why"])
    decision.update(choice)
    why = choice["precision_why"]
    return decision, options.decide(training_args, why, bf16=choice["precision"] == "bf16")
