"""Fine-tune an encoder for text classification (news topics, 20 Newsgroups, any labelled texts).

Copy-paste commands:

    make recipe TASK=textcls                                   # BBC News + all-MiniLM-L6-v2, offline
    python recipes/textcls.py --train_file train.csv --validation_file dev.csv --text_column body --label_column topic
    python recipes/textcls.py --data_dir 20news-bydate.tar.gz --encoding latin-1 --long_text chunks
    python recipes/textcls.py --train_file nli.csv --text_column premise --text_pair_column hypothesis  # pairs
    python recipes/textcls.py --dataset_name SetFit/20_newsgroups --model_name_or_path bert-base-uncased  # online
    python recipes/textcls.py --config recipes/configs/textcls_lora.yaml --merge_lora
    python recipes/textcls.py --train_file tagged.jsonl --text_column text --label_column tags  # multi-label: lists
    accelerate launch --multi_gpu --num_processes 2 recipes/textcls.py --max_steps 50   # 2 CPU ranks (gloo)

The run directory (runs/textcls/<timestamp>/) holds the model (safetensors), tokenizer, adapter for
LoRA runs, all_results.json, per-class report, test predictions, plots, model card and manifest.
Multi-label runs (label lists) also hold each label's decision threshold, tuned on validation.
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
from ftkit.augment import AugmentArguments, augment_texts
from ftkit.baseline import MAIN_METRIC, baseline
from ftkit.config import TRAINER_DEFAULTS, parse_args
from ftkit.data import (
    TextSource,
    check_labels,
    fingerprint,
    label_maps,
    label_targets,
    load_text_splits,
    pair_texts,
    to_datasets,
)
from ftkit.losses import multi_label_loss
from ftkit.metrics import confusion, decision_scores, exact_eval_loss, per_class_report, sigmoid
from ftkit.models import ModelArguments, add_lora, load_model, load_tokenizer, lora_config, resolve_model_path
from ftkit.multilabel import MULTI_LABEL, label_names, tune_thresholds
from ftkit.predict import prediction_rows
from ftkit.reliability import CrashSafeCheckpoints, NonFiniteError, NonFiniteGuard, resume_checkpoint
from ftkit.run import RunArguments, save_run, start_run
from ftkit.speed import SpeedArguments, speed_up
from ftkit.text import count_truncated, decide_long_text, encode_texts, pool_probabilities
from ftkit.training import decide_training, early_stopping, predict_in_row_order, train_token_stats

NAME, TASK = "textcls", "text-classification"
logger = logging.getLogger(NAME)


@dataclass
class DataArguments:
    """What the recipe does with the texts: labels, long texts, early stopping."""

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
    early_stopping_patience: int = field(
        default=2, metadata={"help": "Evaluations without macro-F1 improvement before stopping."}
    )
    multi_label: str = field(
        default="auto",
        metadata={
            "help": "Label lists (JSON/JSONL lists, or CSV/TSV cells split by --label_delimiter): auto (multi-"
            "label when every row has a list), true (single labels become one-label lists), or false.",
            "choices": ["auto", "true", "false"],
        },
    )
    label_delimiter: str | None = field(
        default=None, metadata={"help": "CSV/TSV multi-label cells: the text between labels, e.g. '|'."}
    )
    pos_weight: str | None = field(
        default=None,
        metadata={
            "help": "Multi-label: weight of each label's positive rows in the BCE loss: auto (negatives/"
            "positives of the label in training, at most 10) or one number per label. Default: none."
        },
    )


# The recipe's defaults; a --config YAML and the command line override them.
DEFAULTS = {
    **TRAINER_DEFAULTS,
    "dataset_name": "bbc-news",
    "num_train_epochs": 2,
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
    "metric_for_best_model": "macro_f1",
    "train_sampling_strategy": "group_by_length",
    "logging_steps": 20,
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

    # ---- Data: load, check labels, tokenize -------------------------------------------------
    splits, stats = load_text_splits(
        **vars(source), multi_label=data_args.multi_label, label_delimiter=data_args.label_delimiter
    )
    multi, task = stats.multi_label, MULTI_LABEL if stats.multi_label else TASK  # label lists: sigmoid + BCE
    label2id, _ = label_maps([r["label"] for r in splits["train"]])
    added_labels = check_labels(splits, label2id, data_args.add_unseen_labels)
    names = list(label2id)
    splits["train"], augmented = augment_texts(splits["train"], aug_args, training_args.seed)  # train only
    target = label_targets(splits, label2id)  # label ids; multi-label: a 0/1 row per text
    logger.info("data: %s; %d classes; rows %s", stats.source, len(names), stats.rows)

    tokenizer = load_tokenizer(model_path, model_args.trust_remote_code)
    train_texts, train_pairs = [r["text"] for r in splits["train"]], pair_texts(splits["train"])
    data_args = decide_long_text(options, data_args, tokenizer, train_texts, pairs=train_pairs)  # pairs: head
    policy = (data_args.max_length, data_args.long_text, data_args.stride, data_args.max_chunks)

    def preprocess(batch, indices, split):
        enc = encode_texts(tokenizer, batch["text"], *policy, pairs=batch.get("text_pair"))
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
    model.config.problem_type = "multi_label_classification" if multi else None  # BCE for label lists
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
        if multi:  # each label at its F1-best threshold on these rows, as the tuning after training sets it
            probs = sigmoid(logits)
            scores = decision_scores(labels, probs, len(names), tune_thresholds(probs, labels))
        else:
            scores = decision_scores(labels, logits, len(names))  # accuracy and F1 of the most probable class
        # Reported as eval_loss: Trainer's own counts the rows a multi-process run repeats as padding.
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
        callbacks=callbacks,
        compute_loss_func=multi_label_loss(data_args.pos_weight, target["train"], names, training_args),
    )

    # ---- Train, evaluate, test -----------------------------------------------------------------
    # [shared: train]
    checkpoint = resume_checkpoint(run_args.resume, training_args.output_dir)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    results = dict(train_result.metrics)
    results.update(train_token_stats(trainer, results["train_runtime"], resumed_from=checkpoint))
    # [end shared]
    final, thresholds = {}, None
    for split, prefix in (("validation", "eval"), ("test", "test")):
        out = predict_in_row_order(trainer, ds[split], metric_key_prefix=prefix)
        results.update(out.metrics)  # loss and speed per row; the scores below replace the per-row ones
        final[prefix] = pool_probabilities(out.predictions, ds[split]["text_index"], multi)
        if multi and prefix == "eval":  # per-label thresholds from the validation rows only; test reuses them
            thresholds = tune_thresholds(final[prefix], target[split])
        scores = decision_scores(np.asarray(target[split]), final[prefix], len(names), thresholds)
        results |= {f"{prefix}_{k}": v for k, v in scores.items()}
    results |= baseline(splits, task, results)  # TF-IDF + a linear model on the same rows
    results.update({f"{split}_truncated": n for split, n in truncated.items()})
    if data_args.long_text == "chunks":
        results.update({f"{split}_chunk_rows": len(ds[split]) for split in ds})
    results.update({**stats.as_results(), "added_labels": added_labels, **speed, **augmented})

    # ---- Save the run directory (main process only) ---------------------------------------------
    info = {"task": task, "max_length": data_args.max_length, "long_text": data_args.long_text}
    info |= {"stride": data_args.stride, "max_chunks": data_args.max_chunks, "labels": names}
    info |= stats.columns  # sentence pairs: the text and pair columns, for ftkit predict
    info |= {"thresholds": dict(zip(names, thresholds.tolist(), strict=True))} if multi else {}
    probs, gold, test_rows = final["test"], np.asarray(target["test"]), splits["test"]
    preds = probs >= thresholds if multi else probs.argmax(-1)
    save_run(
        run_dir, trainer, tokenizer, options=options,
        args=(source, data_args, aug_args, model_args, speed_args, run_args, training_args),
        info=info, results=results,
        predictions=prediction_rows(
            [r["origin"] for r in test_rows], [r["text"] for r in test_rows], probs, info, label_names(gold, names),
            pairs=pair_texts(test_rows),
        ),
        report=per_class_report(gold.astype(int), preds.astype(int), names),
        confusion=None if multi else (confusion(gold, preds, len(names)), names),
        curve_metric="macro_f1",
        fingerprint=fingerprint(splits),
        title=f"Text classification: {stats.source}",
        data=stats.card(classes=", ".join(names)),
    )  # fmt: skip
    logger.info(
        "test %s %.4f, macro-F1 %.4f; run directory: %s",  # accuracy; multi-label: micro-F1
        MAIN_METRIC[task][0], results[f"test_{MAIN_METRIC[task][0]}"], results["test_macro_f1"], run_dir,
    )  # fmt: skip
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
