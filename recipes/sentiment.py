"""Fine-tune an encoder for sentiment: polarity (or any classes) with calibrated probabilities.

Copy-paste commands:

    make recipe TASK=sentiment                                 # Rotten Tomatoes + all-MiniLM-L6-v2, offline
    python recipes/sentiment.py --train_file reviews.csv --label_column stars --rating_to_polarity 3   # <3 neg, >3 pos
    python recipes/sentiment.py --train_file imbalanced.csv --class_weights auto
    python recipes/sentiment.py --train_file long_reviews.jsonl --max_length 256 --long_text chunks
    python recipes/sentiment.py --config recipes/configs/sentiment_lora.yaml --merge_lora
    accelerate launch --multi_gpu --num_processes 2 recipes/sentiment.py --max_steps 50   # 2 CPU ranks (gloo)
    ftkit predict runs/sentiment/<run> --input texts.txt       # label + calibrated probabilities

Numeric ratings as the target (regression) are recipes/ratings.py. The run directory
(runs/sentiment/<timestamp>/) holds the model (safetensors), tokenizer, adapter for LoRA runs,
all_results.json, per-class report, test predictions, plots, model card and manifest; a calibrated
run stores its temperature in ftkit_run.json, where `ftkit predict` applies it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from accelerate import PartialState
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

from ftkit import DataError, error_exit
from ftkit.augment import AugmentArguments, augment_texts
from ftkit.baseline import baseline
from ftkit.config import TRAINER_DEFAULTS, parse_args
from ftkit.data import (
    TextSource,
    check_labels,
    fingerprint,
    label_key,
    label_maps,
    load_text_splits,
    ratings_to_polarity,
    to_datasets,
)
from ftkit.losses import class_weights, weighted_cross_entropy
from ftkit.metrics import (
    classification_scores,
    confusion,
    exact_eval_loss,
    fit_temperature,
    per_class_report,
    probability_scores,
    softmax,
)
from ftkit.models import ModelArguments, add_lora, load_model, load_tokenizer, lora_config, resolve_model_path
from ftkit.predict import prediction_rows
from ftkit.reliability import CrashSafeCheckpoints, NonFiniteError, NonFiniteGuard, resume_checkpoint
from ftkit.run import RunArguments, save_run, start_run
from ftkit.speed import SpeedArguments, speed_up
from ftkit.text import count_truncated, decide_long_text, encode_texts, pool_chunks
from ftkit.training import decide_training, early_stopping, predict_in_row_order, train_token_stats

NAME, TASK = "sentiment", "text-classification"
logger = logging.getLogger(NAME)


@dataclass
class DataArguments:
    """What the recipe does with the texts: labels, long texts, imbalance, calibration, early stopping."""

    add_unseen_labels: bool = field(
        default=False, metadata={"help": "Add labels that occur only in validation/test instead of failing."}
    )
    max_length: int = field(default=128, metadata={"help": "Tokens per input, special tokens included."})
    long_text: str = field(
        default="auto",
        metadata={
            "help": "Longer texts: auto (from how much max_length cuts), head, head_tail (first 1/4 + last "
            "3/4), or chunks (overlapping windows, probabilities averaged per input at eval and predict time).",
            "choices": ["auto", "head", "head_tail", "chunks"],
        },
    )
    stride: int = field(default=32, metadata={"help": "chunks: tokens shared by consecutive windows."})
    max_chunks: int = field(
        default=0,
        metadata={
            "help": "chunks: at most this many windows per text, spread over it (0: all; auto caps them)."
        },
    )
    rating_to_polarity: float | None = field(
        default=None,
        metadata={
            "help": "Turn numeric ratings into classes: below -> negative, above -> positive; ratings equal "
            "to it are dropped and counted (data_skipped_rating_at_threshold)."
        },
    )
    class_weights: str | None = field(
        default=None,
        metadata={
            "help": "Weighted cross-entropy: auto (balanced, n / (k * n_class)) or one weight per class in "
            "label order, e.g. 2,1."
        },
    )
    calibrate: bool = field(
        default=True,
        metadata={
            "help": "Fit a temperature on the validation set; saved and predicted probabilities use it."
        },
    )
    early_stopping_patience: int = field(
        default=2, metadata={"help": "Evaluations without macro-F1 improvement before stopping."}
    )


# The recipe's defaults; a --config YAML and the command line override them.
DEFAULTS = {
    **TRAINER_DEFAULTS,
    "dataset_name": "rotten-tomatoes",
    "num_train_epochs": 1,
    "learning_rate": 1e-4,
    # Snippets are short: 32 per step makes each matmul worth it on a CPU (about 1.5x faster per epoch than 16).
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.1,
    "weight_decay": 0.01,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "load_best_model_at_end": True,
    "metric_for_best_model": "macro_f1",
    "train_sampling_strategy": "group_by_length",
    "logging_steps": 20,
}


def sentiment_scores(labels: np.ndarray, probs: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy, macro-F1 (model selection), ROC-AUC, ECE and log loss of class probabilities."""
    return {
        **classification_scores(labels, probs.argmax(-1), num_labels),
        **probability_scores(labels, probs),
    }


ARGUMENTS = (TextSource, DataArguments, AugmentArguments, ModelArguments, SpeedArguments, RunArguments,
             TrainingArguments)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args, options = parse_args(ARGUMENTS, argv, defaults=DEFAULTS, description=__doc__)
    source, data_args, aug_args, model_args, speed_args, run_args, training_args = args
    # [shared: start]
    run_dir, training_args = start_run(NAME, training_args, run_args, options)
    model_path = resolve_model_path(model_args.model_name_or_path)
    # [end shared]

    # ---- Data: load, labels (ratings to polarity), tokenize ----------------------------------
    splits, stats = load_text_splits(**vars(source))
    if data_args.rating_to_polarity is not None:
        ratings_to_polarity(splits, stats, data_args.rating_to_polarity)
    label2id, _ = label_maps([r["label"] for r in splits["train"]])
    added_labels = check_labels(splits, label2id, data_args.add_unseen_labels)
    names = list(label2id)
    splits["train"], augmented = augment_texts(splits["train"], aug_args, training_args.seed)  # train only
    target = {split: [label2id[label_key(r["label"])] for r in rows] for split, rows in splits.items()}
    logger.info("data: %s; %d classes; rows %s", stats.source, len(names), stats.rows)

    tokenizer = load_tokenizer(model_path, model_args.trust_remote_code)
    data_args = decide_long_text(options, data_args, tokenizer, [r["text"] for r in splits["train"]])

    policy = (data_args.max_length, data_args.long_text, data_args.stride, data_args.max_chunks)

    def preprocess(batch, indices, split):
        enc = encode_texts(tokenizer, batch["text"], *policy)
        # With `chunks` one text yields several rows; each keeps its text's label and index (for pooling).
        enc["text_index"] = [indices[i] for i in enc.pop("chunk_of")]
        enc["labels"] = [target[split][i] for i in enc["text_index"]]
        return enc

    with training_args.main_process_first(desc="tokenize"):
        ds = to_datasets(splits, preprocess)  # preprocess(batch, indices, split) on every split
    truncated = count_truncated(ds, data_args.max_length, data_args.long_text)

    # ---- Model (+ LoRA) and Trainer ------------------------------------------------------------
    # [shared: model]
    # The new head is drawn from the global RNG; Trainer seeds only after the model exists.
    set_seed(training_args.seed)
    model = load_model(model_path, TASK, label2id, model_args.trust_remote_code)
    # CPU speed options and the precision, by measurement (recipes/README.md, "Speed on a CPU")
    speed, training_args = speed_up(model, speed_args, training_args, options)
    # [end shared]
    model = add_lora(model, lora_config(model_args, TASK))
    training_args = decide_training(options, training_args, model_args, len(ds["train"]))
    weights = class_weights(data_args.class_weights, ds["train"]["labels"], names)  # None: unweighted
    # [shared: classification-callbacks]
    # Checkpoints count only once complete; a NaN/Inf loss or gradient stops the run (NonFiniteError).
    callbacks = [CrashSafeCheckpoints(), NonFiniteGuard()]
    if training_args.load_best_model_at_end:  # early stopping needs per-epoch eval and best-model tracking
        callbacks.append(early_stopping(data_args.early_stopping_patience, options))
    # [end shared]

    def compute_metrics(pred):
        # Per row; with `chunks` per window (model selection). The reported eval/test metrics are per input.
        logits, labels = pred
        scores = sentiment_scores(labels, softmax(logits), len(names))
        # Reported as eval_loss: Trainer's own counts the rows a multi-process run repeats as padding.
        # (Unweighted: with --class_weights the training loss is the weighted one.)
        return {**scores, "loss": exact_eval_loss(logits, labels)}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=ds["train"],
        eval_dataset=ds["validation"],
        processing_class=tokenizer,
        # Pads each batch to its own longest input; with length-grouped batches little is padding.
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        # Weighted cross-entropy for imbalanced classes; without weights the model's own loss.
        compute_loss_func=weighted_cross_entropy(weights) if weights else None,
        callbacks=callbacks,
    )

    # ---- Train, calibrate on validation, test (per input: chunks pooled) ----------------------
    # [shared: train]
    checkpoint = resume_checkpoint(run_args.resume, training_args.output_dir)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    results = dict(train_result.metrics)
    results.update(train_token_stats(trainer, results["train_runtime"], resumed_from=checkpoint))
    # [end shared]
    raw = {}
    for split, prefix in (("validation", "eval"), ("test", "test")):
        out = predict_in_row_order(trainer, ds[split], metric_key_prefix=prefix)
        results.update(out.metrics)  # loss and speed per row; the scores below replace the per-row ones
        raw[prefix] = (out.predictions, np.asarray(target[split]), np.asarray(ds[split]["text_index"]))
    # Temperature scaling: one T, fitted on the validation inputs, divides every logit.
    temperature = fit_temperature(*raw["eval"]) if data_args.calibrate else 1.0
    final = {}
    for prefix, (logits, labels, owner) in raw.items():
        final[prefix] = probs = pool_chunks(softmax(logits / temperature), owner)
        results |= {f"{prefix}_{k}": v for k, v in sentiment_scores(labels, probs, len(names)).items()}
        if data_args.calibrate:
            before = probability_scores(labels, pool_chunks(softmax(logits), owner))["ece"]
            results |= {f"{prefix}_ece_uncalibrated": before, "calibration_temperature": temperature}
    results |= baseline(splits, TASK, results)  # TF-IDF + LinearSVC on the same rows
    results.update({f"{split}_truncated": n for split, n in truncated.items()})
    if data_args.long_text == "chunks":
        results.update({f"{split}_chunk_rows": len(ds[split]) for split in ds})
    results.update({**stats.as_results(), "added_labels": added_labels, **speed, **augmented})
    if weights:
        results["class_weights"] = dict(zip(names, weights, strict=True))

    # ---- Save the run directory (main process only) ---------------------------------------------
    info = {"task": TASK, "max_length": data_args.max_length, "long_text": data_args.long_text}
    info |= {
        "stride": data_args.stride,
        "max_chunks": data_args.max_chunks,
        "labels": names,
        "temperature": temperature,
    }  # predict divides by T
    gold, probs, test_rows = target["test"], final["test"], splits["test"]
    preds = probs.argmax(-1)
    save_run(
        run_dir, trainer, tokenizer, options=options,
        args=(source, data_args, aug_args, model_args, speed_args, run_args, training_args),
        info=info, results=results,
        predictions=prediction_rows(
            [r["origin"] for r in test_rows], [r["text"] for r in test_rows], probs, info, [names[g] for g in gold]
        ),
        report=per_class_report(gold, preds, names),
        confusion=(confusion(gold, preds, len(names)), names),
        curve_metric="macro_f1",
        fingerprint=fingerprint(splits),
        title=f"Sentiment classification: {stats.source}",
        data=stats.card(classes=", ".join(names)),
    )  # fmt: skip
    logger.info("test accuracy %.4f; run directory: %s", results["test_accuracy"], run_dir)
    return results


# [shared: main-guard]
if __name__ == "__main__":
    try:
        main()
    except (DataError, NonFiniteError) as err:
        raise SystemExit(error_exit(err)) from None
    # Close a multi-process run's process group here: left to interpreter exit, gloo's threads can
    # abort a rank that did everything right ("terminate called without an active exception").
    PartialState().destroy_process_group()
# [end shared]
