"""Fine-tune an encoder for sentiment: polarity with calibrated probabilities, or rating regression.

Copy-paste commands:

    make recipe TASK=sentiment                                 # Rotten Tomatoes + all-MiniLM-L6-v2, offline
    python recipes/sentiment.py --train_file reviews.csv --text_column review --label_column stars --task regression
    python recipes/sentiment.py --train_file reviews.csv --label_column stars --rating_to_polarity 3   # <3 neg, >3 pos
    python recipes/sentiment.py --train_file imbalanced.csv --class_weights auto
    python recipes/sentiment.py --train_file long_reviews.jsonl --max_length 256 --long_text chunks
    python recipes/sentiment.py --config recipes/configs/sentiment_lora.yaml --merge_lora
    accelerate launch --multi_gpu --num_processes 2 recipes/sentiment.py --max_steps 50   # 2 CPU ranks (gloo)
    ftkit predict runs/sentiment/<run> --input texts.txt       # label + calibrated probabilities (or a score)

The run directory (runs/sentiment/<timestamp>/) holds the model (safetensors), tokenizer, adapter for
LoRA runs, all_results.json, per-class report, test predictions, plots, model card and manifest; a
calibrated run stores its temperature in ftkit_run.json, where `ftkit predict` applies it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from accelerate import PartialState
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)

from ftkit import DataError
from ftkit.config import cpu_only, parse_args, to_dict
from ftkit.data import check_labels, fingerprint, label_key, label_maps, load_text_splits, to_datasets
from ftkit.losses import class_weights, weighted_cross_entropy
from ftkit.metrics import (
    classification_scores,
    confusion,
    fit_temperature,
    per_class_report,
    probability_scores,
    regression_scores,
    softmax,
)
from ftkit.models import (
    ModelArguments,
    add_lora,
    load_model,
    load_tokenizer,
    lora_config,
    resolve_model_path,
    save_model,
)
from ftkit.predict import prediction_rows, write_rows
from ftkit.reliability import (
    CrashSafeCheckpoints,
    NonFiniteError,
    NonFiniteGuard,
    exact_eval_loss,
    resume_checkpoint,
)
from ftkit.run import (
    RUN_FILE,
    make_run_dir,
    plot_confusion,
    plot_curves,
    setup_logging,
    train_token_stats,
    write_config,
    write_json,
    write_manifest,
    write_model_card,
)
from ftkit.text import encode_texts, pool_chunks

logger = logging.getLogger("sentiment")
TASK = "text-classification"


@dataclass
class DataArguments:
    """Where the texts and labels come from, and how long texts are cut."""

    dataset_name: str = field(
        default="rotten-tomatoes",
        metadata={
            "help": "Built-in corpus (bbc-news, rotten-tomatoes), a hub dataset, or sklearn/20newsgroups. Used when no files/data_dir are given."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_file: str | None = field(
        default=None, metadata={"help": "CSV, TSV, JSON, JSONL or Parquet with a text and a label column."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Same format as train_file. Default: 10%% of train, stratified."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Same format as train_file. Default: 10%% of train, stratified."}
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder <class>/<doc> or <split>/<class>/<doc> (20news-bydate), or its .tar.gz."},
    )
    text_column: str | None = field(
        default=None, metadata={"help": "Text column. Default: detected (text, sentence, content, ...)."}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "Label column. Default: detected (label, category, ...)."}
    )
    encoding: str = field(
        default="utf-8", metadata={"help": "Encoding of text files (20news-bydate: latin-1)."}
    )
    encoding_errors: str = field(
        default="strict",
        metadata={
            "help": "strict: bad bytes are an error; replace: decode them as U+FFFD.",
            "choices": ["strict", "replace"],
        },
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of the data held out for validation when no validation split is given."},
    )
    test_fraction: float = field(
        default=0.1, metadata={"help": "Share of the data held out for test when no test split is given."}
    )
    add_unseen_labels: bool = field(
        default=False, metadata={"help": "Add labels that occur only in validation/test instead of failing."}
    )
    max_length: int = field(default=128, metadata={"help": "Tokens per input, special tokens included."})
    long_text: str = field(
        default="head",
        metadata={
            "help": "Longer texts: head, head_tail (first 1/4 + last 3/4), or chunks (overlapping windows, "
            "probabilities averaged per input at eval and predict time).",
            "choices": ["head", "head_tail", "chunks"],
        },
    )
    stride: int = field(default=32, metadata={"help": "chunks: tokens shared by consecutive windows."})
    task: str = field(
        default="classification",
        metadata={
            "help": "classification (polarity or any classes) or regression (numeric ratings, MSE).",
            "choices": ["classification", "regression"],
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
            "help": "Fit a temperature on the validation set and apply it to saved and predicted "
            "probabilities (classification; regression ignores it)."
        },
    )
    early_stopping_patience: int = field(
        default=2, metadata={"help": "Evaluations without macro-F1 improvement before stopping."}
    )
    resume: str | None = field(
        default=None,
        metadata={
            "help": "auto: continue from the last complete checkpoint in <output_dir>/checkpoints (partial "
            "ones are skipped; none: start fresh); or the path of one checkpoint."
        },
    )


# The recipe's own TrainingArguments defaults; a --config YAML and the command line override them.
TRAINING_DEFAULTS = {
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
    "report_to": "none",
    "seed": 42,
    # True (the transformers 5 default) multiplies the loss by the world size for models whose loss
    # takes no token count, BERT heads included: gradients and logged losses come out N times too
    # large in a multi-process run (transformers issue #37474).
    "average_tokens_across_devices": False,
    # Without a GPU, use_cpu makes accelerate set up a multi-process launch (accelerate --multi_gpu,
    # torchrun) as gloo ranks with DDP (ddp_backend=gloo alone gives ranks that never sync gradients),
    # and lets `--bf16 true` train in bf16 autocast on the CPU.
    "use_cpu": cpu_only(),
}


def rating(row: dict) -> float:
    """A row's label as a number (ratings), or an error naming the row."""
    try:
        value = float(row["label"])
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise DataError(
            f"{row['origin']}: label {row['label']!r} is not a number; "
            "--task regression and --rating_to_polarity need numeric ratings"
        )
    return value


def ratings_to_polarity(splits: dict[str, list[dict]], threshold: float) -> int:
    """Ratings below `threshold` become negative, above it positive. Ratings equal to it are
    dropped (returned count): a middle rating is neither, and amazon/yelp polarity drop them too."""
    dropped = 0
    for split, rows in splits.items():
        kept = []
        for row in rows:
            value = rating(row)
            if value == threshold:
                dropped += 1
                continue
            kept.append({**row, "label": "positive" if value > threshold else "negative"})
        splits[split] = kept
    return dropped


def check_options(args: DataArguments) -> None:
    """Option combinations that cannot work, as one-line errors."""
    if args.task == "regression" and args.rating_to_polarity is not None:
        raise DataError("--rating_to_polarity makes classes from ratings: use it without --task regression")
    if args.task == "regression" and args.class_weights:
        raise DataError("--class_weights weights classes: --task regression has none")
    if args.long_text == "chunks" and not 0 <= args.stride < args.max_length // 2:
        raise DataError(f"--stride must be >= 0 and below half of --max_length ({args.max_length // 2})")


def sentiment_scores(scores: np.ndarray, labels: np.ndarray, num_labels: int) -> dict[str, float]:
    """Class probabilities (N, C): accuracy, macro-F1, ROC-AUC, ECE, NLL. Ratings (N,): MAE, RMSE, r, rho."""
    if scores.ndim == 1:
        return regression_scores(labels, scores)
    return {
        **classification_scores(labels, scores.argmax(-1), num_labels),
        **probability_scores(labels, scores),
    }


def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, training_args = parse_args(
        (DataArguments, ModelArguments, TrainingArguments),
        argv,
        defaults=TRAINING_DEFAULTS,
        description=__doc__,
    )
    setup_logging(training_args.should_log)
    check_options(data_args)
    regression = data_args.task == "regression"
    task = "regression" if regression else TASK
    if regression and training_args.metric_for_best_model == "macro_f1":
        # Ratings have no classes: select on RMSE (lower is better), the root of the MSE being fitted.
        training_args.metric_for_best_model, training_args.greater_is_better = "rmse", False
    run_dir = make_run_dir("sentiment", training_args.output_dir, resume=bool(data_args.resume))
    training_args.output_dir = str(run_dir / "checkpoints")
    model_path = resolve_model_path(model_args.model_name_or_path)

    # ---- Data: load, check labels, tokenize -------------------------------------------------
    splits, stats = load_text_splits(
        dataset_name=data_args.dataset_name,
        dataset_config=data_args.dataset_config,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        test_file=data_args.test_file,
        data_dir=data_args.data_dir,
        text_column=data_args.text_column,
        label_column=data_args.label_column,
        encoding=data_args.encoding,
        encoding_errors=data_args.encoding_errors,
        validation_fraction=data_args.validation_fraction,
        test_fraction=data_args.test_fraction,
        seed=training_args.seed,
    )
    if data_args.rating_to_polarity is not None:
        stats.skipped["rating_at_threshold"] = ratings_to_polarity(splits, data_args.rating_to_polarity)
        stats.rows = {split: len(rows) for split, rows in splits.items()}
    if regression:
        label2id, added_labels, names = {}, [], []
        target = {split: [rating(r) for r in rows] for split, rows in splits.items()}
        logger.info(
            "data: %s; ratings %g..%g; rows %s",
            stats.source,
            min(target["train"]),
            max(target["train"]),
            stats.rows,
        )
    else:
        label2id, _ = label_maps([r["label"] for r in splits["train"]])
        if len(label2id) < 2:
            raise DataError(
                f"{stats.source}: after --rating_to_polarity only {list(label2id)} is left in train"
            )
        added_labels = check_labels(splits, label2id, data_args.add_unseen_labels)
        names = list(label2id)
        target = {split: [label2id[label_key(r["label"])] for r in rows] for split, rows in splits.items()}
        logger.info("data: %s; %d classes; rows %s", stats.source, len(names), stats.rows)

    tokenizer = load_tokenizer(model_path, model_args.trust_remote_code)

    def preprocess(batch, indices, split):
        enc = encode_texts(
            tokenizer, batch["text"], data_args.max_length, data_args.long_text, data_args.stride
        )
        # With `chunks` one text yields several rows; each keeps its text's label and index (for pooling).
        enc["text_index"] = [indices[i] for i in enc.pop("chunk_of")]
        enc["labels"] = [target[split][i] for i in enc["text_index"]]
        return enc

    with training_args.main_process_first(desc="tokenize"):
        ds = to_datasets(splits)
        for split in ds:
            ds[split] = ds[split].map(
                preprocess,
                batched=True,
                with_indices=True,
                fn_kwargs={"split": split},
                remove_columns=["text", "label", "origin"],
                desc=f"Tokenizing {split}",
            )
    # Inputs, not rows: a chunked text counts once.
    truncated = {
        split: len({i for i, t in zip(ds[split]["text_index"], ds[split]["truncated"], strict=True) if t})
        for split in ds
    }
    logger.info(
        "inputs longer than max_length=%d (cut by %s): %s",
        data_args.max_length,
        data_args.long_text,
        truncated,
    )

    # ---- Model (+ LoRA) and Trainer ------------------------------------------------------------
    # The new head is drawn from the global RNG; Trainer seeds only after the model exists.
    set_seed(training_args.seed)
    # attention_dropout and linear_backend are CPU speed options (recipes/README.md, "Speed on a CPU").
    model = load_model(
        model_path,
        task,
        label2id,
        model_args.trust_remote_code,
        attention_dropout=model_args.attention_dropout,
        linear_backend=model_args.linear_backend,
    )
    if regression:
        # Start the head at the mean training rating: the first steps then learn the signal, not the offset.
        head = getattr(model.classifier, "out_proj", model.classifier)
        head.bias.data.fill_(float(np.mean(target["train"])))
    model = add_lora(model, lora_config(model_args, task))
    weights = None
    if data_args.class_weights:
        weights = class_weights(data_args.class_weights, ds["train"]["labels"], names)
        logger.info("class weights: %s", dict(zip(names, weights, strict=True)))

    # Checkpoints count only once complete; a NaN/Inf loss or gradient stops the run (NonFiniteError).
    callbacks = [CrashSafeCheckpoints(), NonFiniteGuard()]
    if training_args.load_best_model_at_end:  # early stopping needs per-epoch eval and best-model tracking
        callbacks.append(EarlyStoppingCallback(data_args.early_stopping_patience))

    def compute_metrics(pred):
        # Per row; with `chunks` per window (model selection). The reported eval/test metrics are per input.
        logits, labels = pred
        scores = sentiment_scores(logits[:, 0] if regression else softmax(logits), labels, len(names))
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

    # ---- Train, evaluate, test -----------------------------------------------------------------
    checkpoint = resume_checkpoint(data_args.resume, training_args.output_dir)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    results = dict(train_result.metrics)
    results.update(train_token_stats(trainer, results["train_runtime"], resumed_from=checkpoint))
    # group_by_length also reorders evaluation batches; predict in row order so that chunk rows pool
    # back onto their input and each prediction lines up with its input row in test_predictions.jsonl.
    sampling, trainer.args.train_sampling_strategy = trainer.args.train_sampling_strategy, "random"
    raw, final = {}, {}
    for split, prefix in (("validation", "eval"), ("test", "test")):
        out = trainer.predict(ds[split], metric_key_prefix=prefix)
        results.update(out.metrics)  # loss and speed per row; the scores below replace the per-row ones
        raw[prefix] = (out.predictions, np.asarray(ds[split]["text_index"]), np.asarray(target[split]))
    trainer.args.train_sampling_strategy = sampling  # config.yaml records what training used
    temperature = 1.0
    if data_args.calibrate and not regression:
        logits, owner, labels = raw["eval"]
        temperature = fit_temperature(logits, labels, owner)
        results["calibration_temperature"] = temperature
    for prefix, (logits, owner, labels) in raw.items():
        if regression:
            scores = pool_chunks(logits[:, 0], owner)
        else:
            if data_args.calibrate:
                uncalibrated = pool_chunks(softmax(logits), owner)
                results[f"{prefix}_ece_uncalibrated"] = probability_scores(labels, uncalibrated)["ece"]
            scores = pool_chunks(softmax(logits / temperature), owner)
        final[prefix] = scores
        results.update({f"{prefix}_{k}": v for k, v in sentiment_scores(scores, labels, len(names)).items()})
    results.update({f"{split}_truncated": n for split, n in truncated.items()})
    if data_args.long_text == "chunks":
        results.update({f"{split}_chunk_rows": len(ds[split]) for split in ds})
    results.update(stats.as_results())
    results["added_labels"] = added_labels
    if weights:
        results["class_weights"] = dict(zip(names, weights, strict=True))

    # ---- Save the run directory (main process only) ---------------------------------------------
    if trainer.is_world_process_zero():
        run_info = {
            "task": task,
            "base_model": model_args.model_name_or_path,  # None: the embedded default
            "lora": model_args.use_lora,
            "merged": model_args.merge_lora,
            "max_length": data_args.max_length,
            "long_text": data_args.long_text,
            "stride": data_args.stride,
            "labels": names,
            "temperature": temperature,  # ftkit predict divides the logits by it
        }
        write_json(run_dir / RUN_FILE, run_info)
        save_model(trainer.model, tokenizer, run_dir, model_args.merge_lora)
        write_json(run_dir / "all_results.json", results)
        gold, scores, report_text = target["test"], final["test"], None
        if not regression:
            preds = scores.argmax(-1)
            report, report_text = per_class_report(gold, preds, names)
            write_json(run_dir / "test_report.json", report)
            (run_dir / "test_report.txt").write_text(report_text, encoding="utf-8")
            plot_confusion(confusion(gold, preds, len(names)), names, run_dir / "confusion_matrix.png")
            gold = [names[g] for g in gold]
        rows = prediction_rows(
            [r["origin"] for r in splits["test"]], [r["text"] for r in splits["test"]], scores, run_info
        )
        write_rows(
            [{"gold": g, **row} for g, row in zip(gold, rows, strict=True)],
            run_dir / "test_predictions.jsonl",
        )
        plot_curves(
            trainer.state.log_history, run_dir / "training_curves.png", "rmse" if regression else "macro_f1"
        )
        config = to_dict(data_args, model_args, training_args)
        usage = f"ftkit predict {run_dir} --input texts.txt\n# or: transformers.pipeline('text-classification', model='{run_dir}'"
        usage += ", function_to_apply='none')  # the rating" if regression else ")"
        if temperature != 1:
            usage += f"  # uncalibrated: ftkit predict divides the logits by T={temperature:.3g}"
        write_config(run_dir, config)
        write_manifest(run_dir, seed=training_args.seed, data_fingerprint=fingerprint(splits))
        write_model_card(
            run_dir,
            title=f"Sentiment {data_args.task}: {stats.source}",
            base_model=model_path,
            data={
                "source": stats.source,
                **stats.rows,
                "split": stats.split_made or "as given",
                "duplicates removed": stats.duplicates_removed,
                "classes": ", ".join(names) or "ratings (regression)",
            },
            config=config,
            results=results,
            report_text=report_text,
            usage=usage,
        )
        key = "test_rmse" if regression else "test_accuracy"
        logger.info("test %s %.4f; run directory: %s", key[5:], results[key], run_dir)
    return results


if __name__ == "__main__":
    try:
        main()
    except (DataError, NonFiniteError) as err:
        raise SystemExit(f"error: {err}") from None
    # Close a multi-process run's process group here: left to interpreter exit, gloo's threads can
    # abort a rank that did everything right ("terminate called without an active exception").
    PartialState().destroy_process_group()
