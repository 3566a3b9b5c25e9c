"""fp32 linear layers through oneDNN on CPU, forward and backward.

torch's CPU wheel sends fp32 `nn.Linear` to MKL's sgemm. On some x86 CPUs (measured: AMD EPYC Zen 5)
MKL runs at about half the speed of oneDNN, which the same wheel carries and uses for bf16 and for
inference kernels. Forward + backward is over 90% of an encoder's training step, most of it these
GEMMs, so routing them through oneDNN, in full fp32, is most of the possible gain on such a CPU. `auto` measures both libraries once
at the model's own shapes and keeps MKL where it is as fast (e.g. Intel CPUs).

Only the `forward` of each `nn.Linear` instance changes: parameters, state_dict, saved files and
module types stay as they are. The fast path is taken only for fp32 CPU tensors outside autocast,
tracing and compilation; everything else (GPU, bf16, ONNX export) calls `F.linear` as before.
The oneDNN op is private to torch: `op_matches_f_linear` checks it against `F.linear` before first use.
"""

from __future__ import annotations

import functools
import logging
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

CHOICES = ("auto", "onednn", "torch")


def mm_t(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b_t.T (+ bias) through oneDNN: fp32 in, fp32 accumulate, fp32 out."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        # The input is needed only for the weight's gradient (a frozen LoRA base needs none).
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight)
        return mm_t(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1]).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = mm_t(g2, weight.t()).view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = mm_t(g2.t(), x2.t())
        if ctx.needs_input_grad[2]:  # False when there is no bias
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b


def _fast_path(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() >= 2
        and not torch.is_autocast_enabled("cpu")
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_compiling()
    )


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, through oneDNN when the inputs allow (fp32, CPU, eager)."""
    if _fast_path(x, weight):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return onednn_linear(x, self.weight, self.bias)


def available() -> bool:
    """oneDNN is in this torch build (x86 and ARM CPU wheels have it)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def op_matches_f_linear() -> bool:
    """Whether this torch's oneDNN path gives `F.linear`'s values and gradients (checked once per process).

    `torch.ops.mkldnn._linear_pointwise` is a private op with no compatibility promise; a torch release
    may change its signature or meaning. The check runs a non-contiguous 3-D input with bias through
    both paths, forward and backward, at a small shape (about a millisecond); any difference beyond
    fp32 rounding, or any error, means torch's own path is used (with a warning).
    """
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(7, 5, 24, generator=gen).transpose(0, 1)  # (5, 7, 24), not contiguous
    w0, b0 = torch.randn(40, 24, generator=gen), torch.randn(40, generator=gen)
    g = torch.randn(5, 7, 40, generator=gen)
    results = []
    try:
        for fn in (F.linear, lambda *a: _OneDNNLinear.apply(*a)):
            x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
            y = fn(x, w, b)
            y.backward(g)
            results.append([y, x.grad, w.grad, b.grad])
        same = all(
            got is not None and got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4)
            for want, got in zip(*results, strict=True)
        )
    except (RuntimeError, TypeError, ValueError) as err:
        logger.warning(
            "linear layers: torch default (oneDNN linear fails in torch %s: %s)", torch.__version__, err
        )
        return False
    if not same:
        logger.warning(
            "linear layers: torch default (oneDNN linear differs from F.linear in torch %s)",
            torch.__version__,
        )
    return same


def _gflops(fn, flops: float, repeats: int) -> float:
    fn()  # first call: kernel selection and caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return flops / best / 1e9


def measure(hidden: int, intermediate: int, tokens: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of torch's default fp32 linear and of oneDNN's, forward + backward at one FFN shape."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen, requires_grad=True)
    w = torch.randn(intermediate, hidden, generator=gen, requires_grad=True)
    g = torch.randn(tokens, intermediate, generator=gen)
    flops = 3 * 2 * tokens * hidden * intermediate

    def step(fn):
        def run():
            fn(x, w).backward(g)
            x.grad = w.grad = None

        return run

    return {
        "torch": _gflops(step(F.linear), flops, repeats),
        "onednn": _gflops(step(lambda a, b: _OneDNNLinear.apply(a, b, None)), flops, repeats),
    }


def use_onednn_linear(model: nn.Module, mode: str = "auto") -> dict:
    """Route the fp32 CPU `nn.Linear` layers of `model` through oneDNN (see the module docstring).

    mode: `onednn` always (when the build has it), `torch` never, `auto` when oneDNN measures at least
    15% faster here. Returns what was decided, with the measured GFLOP/s, for logs and results.
    """
    if mode not in CHOICES:
        raise ValueError(f"linear_backend must be one of {', '.join(CHOICES)}, got {mode!r}")
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    decision: dict = {"linear_backend": "torch", "linear_layers": len(linears)}
    if mode == "torch" or not linears:
        return decision
    if not available():
        if mode == "onednn":
            logger.warning("linear layers: torch default (this torch build has no oneDNN)")
        return decision
    if not op_matches_f_linear():
        return decision
    if mode == "auto":
        if torch.cuda.is_available():  # Trainer will put the model on the GPU: nothing to gain
            return decision
        biggest = max(linears, key=lambda m: m.weight.numel())
        hidden, intermediate = sorted((biggest.in_features, biggest.out_features))
        try:
            speed = measure(hidden, intermediate)
        except (RuntimeError, TypeError) as err:  # a private op: another torch version may differ
            logger.warning("linear layers: torch default (oneDNN linear failed here: %s)", err)
            return decision
        decision.update({f"linear_gflops_{k}": round(v, 1) for k, v in speed.items()})
        if speed["onednn"] < 1.15 * speed["torch"]:
            logger.info(
                "linear layers: torch default (oneDNN %.0f vs %.0f GFLOP/s)", speed["onednn"], speed["torch"]
            )
            return decision
    for m in linears:
        m.forward = types.MethodType(_forward, m)
    decision["linear_backend"] = "onednn"
    logger.info(
        "linear layers: %d through oneDNN fp32 %s",
        len(linears),
        f"({decision['linear_gflops_onednn']:.0f} vs {decision['linear_gflops_torch']:.0f} GFLOP/s for torch's default)"
        if "linear_gflops_onednn" in decision
        else "(forced)",
    )
    return decision
