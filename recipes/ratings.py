"""Fine-tune an encoder to predict a numeric rating (stars, scores): regression with MSE.

Copy-paste commands:

    make recipe TASK=ratings                                   # Amazon review snippets rated -4..+4, offline
    python recipes/ratings.py --train_file reviews.csv --text_column review --label_column stars
    python recipes/ratings.py --train_file long_reviews.jsonl --max_length 256 --long_text chunks
    python recipes/ratings.py --train_file sts.csv --text_column s1 --text_pair_column s2 --label_column score  # pairs
    python recipes/ratings.py --train_file reviews.csv --use_lora                 # LoRA: learning rate 5e-4
    accelerate launch --multi_gpu --num_processes 2 recipes/ratings.py --max_steps 50   # 2 CPU ranks (gloo)
    ftkit predict runs/ratings/<run> --input texts.txt         # a score per text

Reports MAE, RMSE, Pearson and Spearman; the model is selected on validation RMSE. The run directory
(runs/ratings/<timestamp>/) holds the model (safetensors), tokenizer, adapter for LoRA runs,
all_results.json, test predictions, plots, model card and manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from accelerate import PartialState
from transformers import (
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

from ftkit import DataError, error_exit
from ftkit.baseline import baseline
from ftkit.config import TRAINER_DEFAULTS, parse_args
from ftkit.data import TextSource, fingerprint, load_text_splits, pair_texts, rating, to_datasets
from ftkit.metrics import exact_eval_loss, regression_scores
from ftkit.models import ModelArguments, add_lora, load_model, load_tokenizer, lora_config, resolve_model_path
from ftkit.predict import prediction_rows
from ftkit.reliability import CrashSafeCheckpoints, NonFiniteError, NonFiniteGuard, resume_checkpoint
from ftkit.run import RunArguments, save_run, start_run
from ftkit.speed import SpeedArguments, speed_up
from ftkit.text import count_truncated, decide_long_text, encode_texts, pool_chunks
from ftkit.training import decide_training, early_stopping, predict_in_row_order, train_token_stats

NAME, TASK = "ratings", "regression"
logger = logging.getLogger(NAME)


@dataclass
class DataArguments:
    """What the recipe does with the texts: long texts, early stopping."""

    max_length: int = field(default=256, metadata={"help": "Tokens per input, special tokens included."})
    long_text: str = field(
        default="auto",
        metadata={
            "help": "Longer texts: auto (from how much max_length cuts), head, head_tail (first 1/4 + last "
            "3/4), or chunks (overlapping windows, scores averaged per input at eval and predict time).",
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
    early_stopping_patience: int = field(
        default=2, metadata={"help": "Evaluations without RMSE improvement before stopping."}
    )


# The recipe's defaults; a --config YAML and the command line override them.
DEFAULTS = {
    **TRAINER_DEFAULTS,
    "dataset_name": "amazon-ratings",
    "num_train_epochs": 3,
    "learning_rate": 1e-4,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.1,
    "weight_decay": 0.01,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "load_best_model_at_end": True,
    # Ratings have no classes: select on RMSE (lower is better), the root of the MSE being fitted.
    "metric_for_best_model": "rmse",
    "greater_is_better": False,
    "train_sampling_strategy": "group_by_length",
    "logging_steps": 20,
}

ARGUMENTS = (TextSource, DataArguments, ModelArguments, SpeedArguments, RunArguments, TrainingArguments)


def main(argv: list[str] | None = None) -> dict:
    args, options = parse_args(ARGUMENTS, argv, defaults=DEFAULTS, description=__doc__)
    source, data_args, model_args, speed_args, run_args, training_args = args
    # [shared: start]
    run_dir, training_args = start_run(NAME, training_args, run_args, options)
    model_path = resolve_model_path(model_args.model_name_or_path)
    # [end shared]

    # ---- Data: load, ratings, tokenize ---------------------------------------------------------
    splits, stats = load_text_splits(**vars(source))
    target = {split: [rating(r) for r in rows] for split, rows in splits.items()}
    low, high = min(target["train"]), max(target["train"])
    logger.info("data: %s; ratings %g..%g; rows %s", stats.source, low, high, stats.rows)

    tokenizer = load_tokenizer(model_path, model_args.trust_remote_code)
    train_texts, train_pairs = [r["text"] for r in splits["train"]], pair_texts(splits["train"])
    data_args = decide_long_text(options, data_args, tokenizer, train_texts, pairs=train_pairs)  # pairs: head

    policy = (data_args.max_length, data_args.long_text, data_args.stride, data_args.max_chunks)

    def preprocess(batch, indices, split):
        enc = encode_texts(tokenizer, batch["text"], *policy, pairs=batch.get("text_pair"))
        # With `chunks` one text yields several rows; each keeps its text's rating and index (for pooling).
        enc["text_index"] = [indices[i] for i in enc.pop("chunk_of")]
        enc["labels"] = [target[split][i] for i in enc["text_index"]]
        return enc

    with training_args.main_process_first(desc="tokenize"):
        ds = to_datasets(splits, preprocess)  # preprocess(batch, indices, split) on every split
    truncated = count_truncated(ds, data_args.max_length, data_args.long_text)

    # ---- Model (+ LoRA) and Trainer ------------------------------------------------------------
    label2id = None  # one output: the rating
    # [shared: model]
    # The new head is drawn from the global RNG; Trainer seeds only after the model exists.
    set_seed(training_args.seed)
    model = load_model(model_path, TASK, label2id, model_args.trust_remote_code)
    # CPU speed options and the precision, by measurement (recipes/README.md, "Speed on a CPU")
    speed, training_args = speed_up(model, speed_args, training_args, options)
    # [end shared]
    # Start the head at the mean training rating: the first steps then learn the signal, not the offset.
    head = getattr(model.classifier, "out_proj", model.classifier)
    head.bias.data.fill_(float(np.mean(target["train"])))
    model = add_lora(model, lora_config(model_args, TASK))
    training_args = decide_training(options, training_args, model_args, len(ds["train"]))
    # [shared: classification-callbacks]
    # Checkpoints count only once complete; a NaN/Inf loss or gradient stops the run (NonFiniteError).
    callbacks = [CrashSafeCheckpoints(), NonFiniteGuard()]
    if training_args.load_best_model_at_end:  # early stopping needs per-epoch eval and best-model tracking
        callbacks.append(early_stopping(data_args.early_stopping_patience, options))
    # [end shared]

    def compute_metrics(pred):
        # Per row; with `chunks` per window (model selection). The reported eval/test metrics are per input.
        logits, labels = pred
        # Reported as eval_loss: Trainer's own counts the rows a multi-process run repeats as padding.
        return {**regression_scores(labels, logits[:, 0]), "loss": exact_eval_loss(logits, labels)}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=ds["train"],
        eval_dataset=ds["validation"],
        processing_class=tokenizer,
        # Pads each batch to its own longest input; with length-grouped batches little is padding.
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )

    # ---- Train, evaluate, test (per input: chunks pooled) ------------------------------------
    # [shared: train]
    checkpoint = resume_checkpoint(run_args.resume, training_args.output_dir)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    results = dict(train_result.metrics)
    results.update(train_token_stats(trainer, results["train_runtime"], resumed_from=checkpoint))
    # [end shared]
    final = {}
    for split, prefix in (("validation", "eval"), ("test", "test")):
        out = predict_in_row_order(trainer, ds[split], metric_key_prefix=prefix)
        results.update(out.metrics)  # loss and speed per row; the scores below replace the per-row ones
        final[prefix] = pool_chunks(out.predictions[:, 0], ds[split]["text_index"])
        results |= {f"{prefix}_{k}": v for k, v in regression_scores(target[split], final[prefix]).items()}
    results |= baseline(splits, TASK, results)  # TF-IDF + ridge on the same rows
    results.update({f"{split}_truncated": n for split, n in truncated.items()})
    if data_args.long_text == "chunks":
        results.update({f"{split}_chunk_rows": len(ds[split]) for split in ds})
    results.update({**stats.as_results(), "added_labels": [], **speed})

    # ---- Save the run directory (main process only) ---------------------------------------------
    info = {"task": TASK, "max_length": data_args.max_length, "long_text": data_args.long_text}
    info |= {"stride": data_args.stride, "max_chunks": data_args.max_chunks, "labels": [], "temperature": 1.0}
    info |= stats.columns  # sentence pairs: the text and pair columns, for ftkit predict
    test_rows = splits["test"]
    save_run(
        run_dir, trainer, tokenizer, options=options,
        args=(source, data_args, model_args, speed_args, run_args, training_args),
        info=info, results=results,
        predictions=prediction_rows(
            [r["origin"] for r in test_rows], [r["text"] for r in test_rows], final["test"], info, target["test"],
            pairs=pair_texts(test_rows),
        ),
        curve_metric="rmse",
        fingerprint=fingerprint(splits),
        title=f"Rating regression: {stats.source}",
        data=stats.card(classes=f"ratings {low:g}..{high:g} (regression)"),
    )  # fmt: skip
    logger.info(
        "test RMSE %.4f, Pearson %.4f; run directory: %s",
        results["test_rmse"],
        results["test_pearson"],
        run_dir,
    )
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
