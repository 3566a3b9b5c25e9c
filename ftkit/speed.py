"""CPU speed options for training and prediction, applied by one explicit call after loading a model.

    model = load_model(...)
    speed = speed_up(model, speed_args)      # results.update(speed): what was chosen, and why

Each option is a small function here (or in its own module, `ftkit.fastlinear`); none changes the
weights, the saved files or the module types.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ftkit.fastlinear import CHOICES as LINEAR_BACKENDS
from ftkit.fastlinear import use_onednn_linear

logger = logging.getLogger(__name__)


@dataclass
class SpeedArguments:
    """How the model runs on a CPU (recipes/README.md, "Speed on a CPU"). Results do not depend on them
    beyond rounding, except attention_dropout, which is a training choice."""

    attention_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout on attention probabilities (BERT-style models; the checkpoints use 0.1). With 0, "
            "attention on a CPU stays in the fused SDPA kernel; with dropout it does not (measured: 25%% of a "
            "training step). Models without attention_probs_dropout_prob keep their own."
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


def set_attention_dropout(model: nn.Module, p: float) -> bool:
    """Set the attention-probability dropout of a BERT-style model to `p`; False if the model has none."""
    if not hasattr(model.config, "attention_probs_dropout_prob"):
        return False
    for name, module in model.named_modules():
        if name.endswith("attention.self.dropout"):
            module.p = p
    model.config.attention_probs_dropout_prob = p
    return True


def speed_up(model: nn.Module, args: SpeedArguments) -> dict[str, Any]:
    """Apply the speed options to a freshly loaded model (before LoRA wraps it); return the decisions
    (linear backend and its measured GFLOP/s) for all_results.json."""
    set_attention_dropout(model, args.attention_dropout)
    return use_onednn_linear(model, args.linear_backend)
