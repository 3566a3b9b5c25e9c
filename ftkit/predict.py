"""Load any run directory (full or LoRA) and predict on new texts: batched, length-sorted, no pad waste."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from ftkit import DataError
from ftkit.data import decode, read_table, split_lines
from ftkit.metrics import softmax
from ftkit.models import MODEL_CLASSES, resolve_model_path
from ftkit.multilabel import MULTI_LABEL, run_thresholds
from ftkit.run import read_run_info
from ftkit.text import encode_texts, match_token_types, pad_batch, pool_probabilities

logger = logging.getLogger(__name__)


def run_config(path: str | Path):
    """The `config.json` of a run directory (or base model) without running any code it names.

    `trust_remote_code=False` is explicit: left unset, transformers asks `[y/N]` on a terminal for a
    config whose unknown model_type names Python files (`auto_map`), and "y" runs them.
    """
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path}: cannot load config.json without running code from it: {err}") from None


def run_tokenizer(path: str | Path):
    """The tokenizer of a run directory, with `trust_remote_code=False` (see `run_config`), returning
    `token_type_ids` only where the model has a second segment type (`match_token_types`)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path}: cannot load the tokenizer without running code from it: {err}") from None
    match_token_types(tokenizer, run_config(path))
    return tokenizer


def _check_weights_format(run_dir: Path) -> None:
    # Pickled weights (.bin) can run code when loaded: ftkit loads safetensors only and says so plainly.
    for folder in (run_dir, run_dir / "adapter"):
        if not any(folder.glob("*.safetensors")) and (pickled := sorted(folder.glob("*.bin"))):
            raise DataError(
                f"{pickled[0]}: pickled weights are not loaded (they can run code); ftkit reads safetensors "
                "only: re-save the model with safe_serialization=True"
            )


def load_run(run_dir: str | Path):
    """(model, tokenizer, info) for a run directory, in eval mode, weights from safetensors only.

    Full runs and merged LoRA runs load as plain transformers models; unmerged LoRA runs load the
    base model named in the run and apply `run_dir/adapter` (which carries the trained head).
    The CPU speed options are `ftkit.speed.speed_up`, applied by the caller (`ftkit predict` does).
    """
    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    _check_weights_format(run_dir)
    if info["task"] == "multi-task":
        from ftkit.multitask import load_multitask

        return (
            load_multitask(run_dir, info, resolve_model_path(info.get("base_model"))),
            run_tokenizer(run_dir),
            info,
        )
    if info["task"] not in MODEL_CLASSES:
        raise DataError(f"{run_dir / 'ftkit_run.json'}: unknown task {info['task']!r}")
    tokenizer = run_tokenizer(run_dir)
    model_cls = MODEL_CLASSES[info["task"]]
    config = run_config(run_dir)  # carries the label maps and head size
    no_code = {"use_safetensors": True, "trust_remote_code": False}
    if (run_dir / "model.safetensors").is_file():
        model = model_cls.from_pretrained(run_dir, config=config, **no_code)
    elif (run_dir / "adapter" / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = resolve_model_path(info.get("base_model"))
        if info.get("case_feature"):
            # NER case types: the base loads with its own token-type table, grown as in training; the
            # adapter then brings the trained one.
            config.type_vocab_size = run_config(base_path).type_vocab_size
        base = model_cls.from_pretrained(base_path, config=config, **no_code)
        if info.get("case_feature"):
            from ftkit.ner import add_case_types

            add_case_types(base)
        model = PeftModel.from_pretrained(base, run_dir / "adapter")  # safetensors: checked above
    else:
        raise DataError(f"{run_dir}: no model.safetensors and no adapter/ folder: nothing to load")
    return model.eval(), tokenizer, info


def load_for_inference(run_dir: str | Path, linear_backend: str = "auto"):
    """(model, tokenizer, info) as `ftkit predict` runs a run directory (`ftkit serve` too).

    A run with compress.json (pruned, int8, ONNX, or the runtime `ftkit compress --choose` picked) loads
    through `ftkit.compress.load_compressed`; any other through `load_run`, its fp32 linear layers on the
    `linear_backend` (see `ftkit.fastlinear.use_onednn_linear`).
    """
    if (Path(run_dir) / "compress.json").is_file():
        from ftkit.compress import load_compressed  # compress imports this module

        return load_compressed(run_dir), run_tokenizer(run_dir), read_run_info(run_dir)
    from ftkit.fastlinear import use_onednn_linear

    model, tokenizer, info = load_run(run_dir)
    use_onednn_linear(model, linear_backend)
    return model, tokenizer, info


def predict_rows(
    model,
    tokenizer,
    texts: list[str],
    origins: list[str],
    info: dict[str, Any],
    batch_size: int = 32,
    progress: bool = False,
    pairs: list[str] | None = None,
) -> list[dict[str, Any]]:
    """The `ftkit predict` output row of each text, whatever the task: entities with character offsets
    (token classification), every head's tags (multi-task), else label and probabilities (or a score;
    multi-label: the labels over their thresholds). `progress` shows a progress bar for classification
    runs; `pairs` are the second texts of a sentence-pair run."""
    if info["task"] == "token-classification":
        from ftkit.ner import predict_entities  # the NER recipe's prediction path

        return predict_entities(model, tokenizer, texts, origins, info, batch_size=batch_size)
    if info["task"] == "multi-task":
        from ftkit.multitask import predict_multitask  # every head from one encoder pass

        return predict_multitask(model, tokenizer, texts, origins, info, batch_size=batch_size)
    scores = predict_texts(model, tokenizer, texts, info, batch_size, progress, pairs=pairs)
    return prediction_rows(origins, texts, scores, info, pairs=pairs)


@torch.inference_mode()
def predict_texts(
    model,
    tokenizer,
    texts: list[str],
    info: dict[str, Any],
    batch_size: int = 32,
    progress: bool = True,
    pairs: list[str] | None = None,
) -> np.ndarray:
    """Class probabilities (N, C) (multi-label: one per label), or scores (N,) for regression, in the
    order of `texts`.

    Inputs are sorted by length so each batch pads to a similar length; with the `chunks` policy
    the windows of one text are scored and their probabilities averaged into one prediction. A run
    trained on sentence pairs (`text_pair_column` in its info) needs `pairs`, the second texts.
    """
    if bool(info.get("text_pair_column")) != (pairs is not None):
        raise DataError(
            "this run was trained on sentence pairs: give the second texts too"
            if pairs is None
            else "this run was trained on single texts: it takes no second texts"
        )
    enc = encode_texts(
        tokenizer,
        texts,
        info["max_length"],
        info.get("long_text", "head"),
        info.get("stride", 64),
        info.get("max_chunks", 0),
        pairs=pairs,
    )
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    order = np.argsort([-n for n in enc["length"]], kind="stable")
    outputs: list[np.ndarray] = [None] * len(order)  # type: ignore[list-item]
    for start in tqdm(
        range(0, len(order), batch_size), desc="Predicting", unit="batch", disable=not progress
    ):
        idx = order[start : start + batch_size]
        batch = pad_batch({k: [enc[k][i] for i in idx] for k in keys}, tokenizer.pad_token_id)
        logits = model(**batch).logits.float().numpy()
        for i, row in zip(idx, logits, strict=True):
            outputs[i] = row
    logits = np.stack(outputs)
    if info["task"] == MULTI_LABEL:  # the recipe's pooling: mean logit over a text's windows, then sigmoid
        return pool_probabilities(logits, enc["chunk_of"], multi_label=True)
    # `temperature` is set by runs calibrated on their validation set (sentiment --calibrate); 1 = as trained.
    scores = logits[:, 0] if info["task"] == "regression" else softmax(logits / info.get("temperature", 1.0))
    # Pool chunk rows back to one row per input text.
    owner = np.asarray(enc["chunk_of"])
    if len(owner) == len(texts):
        return scores
    return np.stack([scores[owner == i].mean(axis=0) for i in range(len(texts))])


def read_inputs(
    path: str | Path, text_column: str | None = None, encoding: str = "utf-8"
) -> tuple[list[str], list[str]]:
    """Texts and their origins (`file:line`) from a .txt (one text per line) or a table file.

    Blank lines in a .txt are skipped and counted in the log; nothing else is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    if path.suffix.lower() == ".txt":
        lines = split_lines(decode(path.read_bytes(), path, encoding))
        kept = [(f"{path}:{n}", line) for n, line in enumerate(lines, start=1) if line.strip()]
        if len(kept) < len(lines):
            logger.warning("%s: skipped %d blank line(s)", path, len(lines) - len(kept))
        if not kept:
            raise DataError(f"{path}: no texts (the file is empty or blank)")
        return [t for _, t in kept], [o for o, _ in kept]
    rows, _, _ = read_table(path, text_column, None, encoding, require_label=False)
    return [r["text"] for r in rows], [r["origin"] for r in rows]


def read_pair_inputs(
    path: str | Path,
    info: dict[str, Any],
    text_column: str | None = None,
    text_pair_column: str | None = None,
    encoding: str = "utf-8",
) -> tuple[list[str], list[str], list[str]]:
    """(texts, second texts, origins) of a sentence-pair table for a run trained on pairs: the columns
    the run was trained with (`text_column`, `text_pair_column` in its info) unless given. A .txt holds
    one text per line, no pairs: an error that says what to give instead."""
    path = Path(path)
    pair_col = text_pair_column or info["text_pair_column"]
    text_col = text_column or info.get("text_column")
    if path.suffix.lower() == ".txt":
        raise DataError(
            f"{path}: this run was trained on sentence pairs; a .txt has one text per line. Give a "
            f".csv/.tsv/.jsonl/.json/.parquet with columns {text_col or 'text'!r} and {pair_col!r} "
            "(or name them with --text_column / --text_pair_column)"
        )
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    rows, _, _ = read_table(path, text_col, None, encoding, require_label=False, text_pair_column=pair_col)
    return [r["text"] for r in rows], [r["text_pair"] for r in rows], [r["origin"] for r in rows]


def prediction_rows(
    origins: list[str],
    texts: list[str],
    scores: np.ndarray,
    info: dict[str, Any],
    gold: list | None = None,
    pairs: list[str] | None = None,
) -> list[dict[str, Any]]:
    """One output record per input: label and per-class probabilities (or a score for regression;
    multi-label: `labels`, each label whose probability reaches its threshold in `info["thresholds"]`),
    after the `gold` label, labels or rating when given (the recipes' test_predictions.jsonl); for
    sentence pairs the second text follows the first (`text_pair`)."""
    rows = []
    cut = run_thresholds(info) if info["task"] == MULTI_LABEL else None
    for i, (origin, text, s) in enumerate(zip(origins, texts, scores, strict=True)):
        row: dict[str, Any] = {} if gold is None else {"gold": gold[i]}
        row |= {"origin": origin, "text": text} | ({} if pairs is None else {"text_pair": pairs[i]})
        if info["task"] == "regression":
            row["score"] = float(s)
        elif cut is not None:
            row["labels"] = [n for n, p, t in zip(info["labels"], s, cut, strict=True) if p >= t]
            row.update({f"p_{n}": round(float(p), 6) for n, p in zip(info["labels"], s, strict=True)})
        else:
            names = info["labels"]
            row["label"] = names[int(np.argmax(s))]
            row.update({f"p_{n}": round(float(p), 6) for n, p in zip(names, s, strict=True)})
        rows.append(row)
    return rows
