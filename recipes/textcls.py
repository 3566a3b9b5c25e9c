"""Fine-tune an encoder for text classification (news topics, 20 Newsgroups, any labelled texts).

Copy-paste commands:

    make recipe TASK=textcls                                   # BBC News + all-MiniLM-L6-v2, offline
    python recipes/textcls.py --train_file train.csv --validation_file dev.csv --text_column body --label_column topic
    python recipes/textcls.py --data_dir 20news-bydate.tar.gz --encoding latin-1 --max_length 256
    python recipes/textcls.py --dataset_name SetFit/20_newsgroups --model_name_or_path bert-base-uncased  # online
    python recipes/textcls.py --config recipes/configs/textcls_lora.yaml --merge_lora
    accelerate launch --multi_gpu --num_processes 2 recipes/textcls.py --max_steps 50   # 2 CPU ranks (gloo)

The run directory (runs/textcls/<timestamp>/) holds the model (safetensors), tokenizer, adapter for
LoRA runs, all_results.json, per-class report, test predictions, plots, model card and manifest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

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
from ftkit.data import check_labels, fingerprint, label_maps, load_text_splits, to_datasets
from ftkit.metrics import classification_scores, confusion, per_class_report, softmax
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
from ftkit.text import encode_texts

logger = logging.getLogger("textcls")
TASK = "text-classification"


@dataclass
class DataArguments:
    """Where the texts and labels come from, and how long texts are cut."""

    dataset_name: str = field(
        default="bbc-news",
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
            "help": "What to keep of longer texts: head, or head_tail (first 1/4 + last 3/4).",
            "choices": ["head", "head_tail"],
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


def main(argv: list[str] | None = None) -> dict:
    data_args, model_args, training_args = parse_args(
        (DataArguments, ModelArguments, TrainingArguments),
        argv,
        defaults=TRAINING_DEFAULTS,
        description=__doc__,
    )
    setup_logging(training_args.should_log)
    run_dir = make_run_dir("textcls", training_args.output_dir, resume=bool(data_args.resume))
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
    label2id, _ = label_maps([r["label"] for r in splits["train"]])
    added_labels = check_labels(splits, label2id, data_args.add_unseen_labels)
    names = list(label2id)
    logger.info("data: %s; %d classes; rows %s", stats.source, len(names), stats.rows)

    tokenizer = load_tokenizer(model_path, model_args.trust_remote_code)

    def preprocess(batch):
        enc = encode_texts(tokenizer, batch["text"], data_args.max_length, data_args.long_text)
        enc["labels"] = [label2id[label] for label in batch["label"]]
        return enc

    with training_args.main_process_first(desc="tokenize"):
        ds = to_datasets(splits).map(
            preprocess, batched=True, remove_columns=["text", "label"], desc="Tokenizing"
        )
    truncated = {split: int(sum(ds[split]["truncated"])) for split in ds}
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
        TASK,
        label2id,
        model_args.trust_remote_code,
        attention_dropout=model_args.attention_dropout,
        linear_backend=model_args.linear_backend,
    )
    model = add_lora(model, lora_config(model_args, TASK))

    # Checkpoints count only once complete; a NaN/Inf loss or gradient stops the run (NonFiniteError).
    callbacks = [CrashSafeCheckpoints(), NonFiniteGuard()]
    if training_args.load_best_model_at_end:  # early stopping needs per-epoch eval and best-model tracking
        callbacks.append(EarlyStoppingCallback(data_args.early_stopping_patience))

    def compute_metrics(pred):
        logits, labels = pred
        scores = classification_scores(labels, logits.argmax(-1), len(names))
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
    )

    # ---- Train, evaluate, test -----------------------------------------------------------------
    checkpoint = resume_checkpoint(data_args.resume, training_args.output_dir)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    results = dict(train_result.metrics)
    results.update(train_token_stats(trainer, results["train_runtime"], resumed_from=checkpoint))
    results.update(trainer.evaluate(metric_key_prefix="eval"))
    # group_by_length also reorders evaluation batches; predict the test set in row order so that
    # each prediction lines up with its input row in test_predictions.jsonl.
    sampling, trainer.args.train_sampling_strategy = trainer.args.train_sampling_strategy, "random"
    test = trainer.predict(ds["test"], metric_key_prefix="test")
    trainer.args.train_sampling_strategy = sampling  # config.yaml records what training used
    results.update(test.metrics)
    results.update({f"{split}_truncated": n for split, n in truncated.items()})
    results.update(stats.as_results())
    results["added_labels"] = added_labels

    # ---- Save the run directory (main process only) ---------------------------------------------
    if trainer.is_world_process_zero():
        run_info = {
            "task": TASK,
            "base_model": model_args.model_name_or_path,  # None: the embedded default
            "lora": model_args.use_lora,
            "merged": model_args.merge_lora,
            "max_length": data_args.max_length,
            "long_text": data_args.long_text,
            "labels": names,
        }
        write_json(run_dir / RUN_FILE, run_info)
        save_model(trainer.model, tokenizer, run_dir, model_args.merge_lora)
        write_json(run_dir / "all_results.json", results)
        probs = softmax(test.predictions)
        preds = probs.argmax(-1)
        report, report_text = per_class_report(test.label_ids, preds, names)
        write_json(run_dir / "test_report.json", report)
        (run_dir / "test_report.txt").write_text(report_text, encoding="utf-8")
        rows = prediction_rows(ds["test"]["origin"], [r["text"] for r in splits["test"]], probs, run_info)
        write_rows(
            [{"gold": names[g], **row} for g, row in zip(test.label_ids, rows, strict=True)],
            run_dir / "test_predictions.jsonl",
        )
        plot_confusion(confusion(test.label_ids, preds, len(names)), names, run_dir / "confusion_matrix.png")
        plot_curves(trainer.state.log_history, run_dir / "training_curves.png", "macro_f1")
        config = to_dict(data_args, model_args, training_args)
        write_config(run_dir, config)
        write_manifest(run_dir, seed=training_args.seed, data_fingerprint=fingerprint(splits))
        write_model_card(
            run_dir,
            title=f"Text classification: {stats.source}",
            base_model=model_path,
            data={
                "source": stats.source,
                **stats.rows,
                "split": stats.split_made or "as given",
                "duplicates removed": stats.duplicates_removed,
                "classes": ", ".join(names),
            },
            config=config,
            results=results,
            report_text=report_text,
            usage=f"ftkit predict {run_dir} --input texts.txt\n# or: transformers.pipeline('text-classification', model='{run_dir}')",
        )
        logger.info(
            "test accuracy %.4f, macro-F1 %.4f; run directory: %s",
            results["test_accuracy"],
            results["test_macro_f1"],
            run_dir,
        )
    return results


if __name__ == "__main__":
    try:
        main()
    except (DataError, NonFiniteError) as err:
        raise SystemExit(f"error: {err}") from None
    # Close a multi-process run's process group here: left to interpreter exit, gloo's threads can
    # abort a rank that did everything right ("terminate called without an active exception").
    PartialState().destroy_process_group()
