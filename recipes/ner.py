"""Fine-tune an encoder for named-entity recognition (CoNLL-2003 by default), scored per word.

Copy-paste commands:

    make recipe TASK=ner                                       # CoNLL-2003 + all-MiniLM-L6-v2, offline
    python recipes/ner.py --train_file my_train.conll --validation_file my_dev.conll   # test: 10% of train documents
    python recipes/ner.py --train_file train.jsonl --tag_scheme BIOES --context sentence
    python recipes/ner.py --dataset_name eriktks/conll2003 --model_name_or_path bert-base-cased  # online
    python recipes/ner.py --config recipes/configs/ner_lora.yaml --merge_lora
    accelerate launch --multi_gpu --num_processes 2 recipes/ner.py --max_steps 50   # 2 CPU ranks (gloo)
    ftkit predict runs/ner/<run> --input texts.txt             # entities with type, text, character offsets

On a CPU-only machine `accelerate launch --cpu --num_processes 2` silently runs ONE process: use
`--multi_gpu` (gloo) or `torchrun --nproc_per_node 2`.

Labels sit on the first sub-token of each word; a word sequence longer than `max_length` is split
into overlapping windows (never cut), and evaluation merges the windows back so that every word gets
exactly one predicted tag. With `--context document` the sentences of one document share windows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets
import numpy as np
from accelerate import PartialState
from transformers import DataCollatorForTokenClassification, Trainer, TrainingArguments, set_seed

from ftkit import DataError
from ftkit.config import cpu_only, parse_args, to_dict
from ftkit.conll import SCHEMES, load_tagged_splits, write_conll
from ftkit.data import fingerprint
from ftkit.models import (
    ModelArguments,
    add_lora,
    load_model,
    load_tokenizer,
    lora_config,
    resolve_model_path,
    save_model,
)
from ftkit.ner import (
    CONTEXTS,
    add_case_types,
    decode_tags,
    encode_sentences,
    entity_metrics,
    entity_report,
    label_list,
    merge_windows,
    use_case_feature,
)
from ftkit.predict import write_rows
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
    plot_curves,
    setup_logging,
    train_token_stats,
    write_config,
    write_json,
    write_manifest,
    write_model_card,
)

logger = logging.getLogger("ner")
TASK = "token-classification"


@dataclass
class DataArguments:
    """Where the tagged sentences come from, and how they are cut into model windows."""

    dataset_name: str = field(
        default="conll2003",
        metadata={
            "help": "Built-in conll2003 (offline) or a hub dataset with tokens/ner_tags. Used when no train_file is given."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_file: str | None = field(
        default=None, metadata={"help": "CoNLL column file, or JSON/JSONL with tokens and tags lists."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Same format. Default: 10%% of train documents."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Same format. Default: 10%% of train documents."}
    )
    tag_column: int = field(
        default=-1, metadata={"help": "Column of the tag in CoNLL files (0 = the word; -1 = last)."}
    )
    tag_scheme: str = field(
        default="auto", metadata={"help": "Tag scheme of the files.", "choices": ["auto", *SCHEMES]}
    )
    holdout_fraction: float = field(
        default=0.1, metadata={"help": "Share of train documents held out for a missing split."}
    )
    max_length: int = field(default=256, metadata={"help": "Sub-tokens per window, special tokens included."})
    stride: int = field(
        default=64, metadata={"help": "Sub-tokens shared by consecutive windows of a long sequence."}
    )
    decode: str = field(
        default="viterbi",
        metadata={
            "help": "viterbi: best tag sequence without invalid IOB2 transitions; argmax: best tag per word.",
            "choices": ["viterbi", "argmax"],
        },
    )
    case_feature: str = field(
        default="auto",
        metadata={
            "help": "auto, on or off: give the model each word's capitalization (token types: no capital, "
            "Capitalized, ALL CAPS, miXed). auto: on when the tokenizer lowercases (an uncased model) and "
            "the model has token types."
        },
    )
    context: str = field(
        default="document",
        metadata={
            "help": "document: pack neighbouring sentences of a document into each window.",
            "choices": list(CONTEXTS),
        },
    )
    resume: str | None = field(
        default=None,
        metadata={
            "help": "auto: continue from the last complete checkpoint in <output_dir>/checkpoints (partial "
            "ones are skipped; none: start fresh); or the path of one checkpoint."
        },
    )


# The recipe's own TrainingArguments defaults (= recipes/configs/ner.yaml); a --config YAML and the CLI override them.
TRAINING_DEFAULTS = {
    # 3 epochs: test F1 0.879 -> with the case feature 0.894, in 9 minutes on 2 cores (recipes/README.md).
    "num_train_epochs": 3,
    "learning_rate": 2e-4,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 32,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.1,
    "weight_decay": 0.01,
    # One evaluation at the end: on a CPU a validation pass costs as much as ~10% of an epoch.
    "eval_strategy": "no",
    "save_strategy": "no",
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
    run_dir = make_run_dir("ner", training_args.output_dir, resume=bool(data_args.resume))
    training_args.output_dir = str(run_dir / "checkpoints")
    model_path = resolve_model_path(model_args.model_name_or_path)

    # ---- Data: load (IOB2), label set --------------------------------------------------------------
    splits, source = load_tagged_splits(
        **{
            k: getattr(data_args, k)
            for k in ("dataset_name", "dataset_config", "train_file", "validation_file", "test_file")
        },
        tag_column=data_args.tag_column,
        tag_scheme=data_args.tag_scheme,
        holdout_fraction=data_args.holdout_fraction,
        seed=training_args.seed,
    )
    # Entity types from every split: a type missing from train is still scored (recall 0), not an error.
    names = label_list([s for split in splits.values() for s in split])
    label2id = {name: i for i, name in enumerate(names)}
    rows = {split: len(sentences) for split, sentences in splits.items()}
    logger.info("data: %s; sentences %s; labels %s", source, rows, names)

    # ---- Tokenizer, model (+ case types), windows of sub-tokens ----------------------------------
    tokenizer = load_tokenizer(model_path, model_args.trust_remote_code)
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
    # An uncased tokenizer turns "Paris" into "paris" and drops NER's strongest cue. Each word's shape
    # goes back in through the token-type embeddings (measured on CoNLL-2003: see recipes/README.md).
    case_feature = use_case_feature(data_args.case_feature, tokenizer, model)
    data_args.case_feature = "on" if case_feature else "off"  # config.yaml and the model card say which
    if case_feature:
        add_case_types(model)
    features = {
        split: encode_sentences(
            tokenizer,
            sentences,
            data_args.max_length,
            data_args.stride,
            data_args.context,
            label2id,
            case_feature,
        )
        for split, sentences in splits.items()
    }
    ds = {split: datasets.Dataset.from_dict(f.rows) for split, f in features.items()}
    windowed = {split: f.n_long for split, f in features.items()}
    logger.info(
        "sentences longer than one window of %d (split into windows, stride %d): %s; windows %s; "
        "case feature %s",
        data_args.max_length,
        data_args.stride,
        windowed,
        {split: len(f.windows) for split, f in features.items()},
        case_feature,
    )

    # ---- LoRA and Trainer -------------------------------------------------------------------------
    peft_config = lora_config(model_args, TASK)
    if peft_config and case_feature:  # the new token types train (and are saved) with the adapter
        peft_config.modules_to_save.append("token_type_embeddings")
    model = add_lora(model, peft_config)

    # Checkpoints count only once complete; a NaN/Inf loss or gradient stops the run (NonFiniteError).
    callbacks = [CrashSafeCheckpoints(), NonFiniteGuard()]

    def word_tags(split, pred, method) -> list[list[str]]:
        """One tag per word of every sentence of `split`: windows merged back, then decoded."""
        word_logits = merge_windows(features[split], pred.predictions, pred.label_ids)
        return [
            decode_tags(np.stack(x) if x else np.zeros((0, len(names))), names, method) for x in word_logits
        ]

    def metrics_for(split):
        def compute_metrics(pred):
            gold = [s.tags for s in splits[split]]
            metrics = entity_metrics(gold, word_tags(split, pred, data_args.decode))
            if data_args.decode != "argmax":  # what the constrained decoding repairs
                argmax = entity_metrics(gold, word_tags(split, pred, "argmax"))
                metrics |= {
                    "argmax_f1": argmax["f1"],
                    "argmax_invalid_sequences": argmax["invalid_sequences"],
                }
            # Reported as eval_loss: Trainer's own counts the rows a multi-process run repeats as padding.
            return {**metrics, "loss": exact_eval_loss(pred.predictions, pred.label_ids)}

        return compute_metrics

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=ds["train"],
        eval_dataset=ds["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=metrics_for("validation"),
        callbacks=callbacks,
    )

    # ---- Train, evaluate, test -----------------------------------------------------------------
    checkpoint = resume_checkpoint(data_args.resume, training_args.output_dir)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    results = dict(train_result.metrics)
    results.update(train_token_stats(trainer, results["train_runtime"], resumed_from=checkpoint))
    results.update(trainer.evaluate(metric_key_prefix="eval"))
    trainer.compute_metrics = metrics_for("test")
    test = trainer.predict(ds["test"], metric_key_prefix="test")
    results.update(test.metrics)
    results.update({f"{split}_windowed_sentences": n for split, n in windowed.items()})
    results.update({"data_source": source, **{f"data_{split}_sentences": n for split, n in rows.items()}})

    # ---- Save the run directory (main process only) ---------------------------------------------
    if trainer.is_world_process_zero():
        run_info = {
            "task": TASK,
            "base_model": model_args.model_name_or_path,  # None: the embedded default
            "lora": model_args.use_lora,
            "merged": model_args.merge_lora,
            "max_length": data_args.max_length,
            "long_text": "chunks",  # long inputs become overlapping windows, merged back per word
            "stride": data_args.stride,
            "context": data_args.context,
            "decode": data_args.decode,
            "case_feature": case_feature,  # ftkit predict passes word shapes as token_type_ids
            "labels": names,
        }
        write_json(run_dir / RUN_FILE, run_info)
        save_model(trainer.model, tokenizer, run_dir, model_args.merge_lora)
        write_json(run_dir / "all_results.json", results)
        gold = [s.tags for s in splits["test"]]
        pred = word_tags("test", test, data_args.decode)
        report_text = entity_report(gold, pred)
        (run_dir / "test_report.txt").write_text(report_text, encoding="utf-8")
        write_rows(
            [
                {"origin": s.origin, "tokens": s.tokens, "gold": s.tags, "pred": p}
                for s, p in zip(splits["test"], pred, strict=True)
            ],
            run_dir / "test_predictions.jsonl",
        )
        write_conll(
            run_dir / "test_predictions.conll", splits["test"], pred
        )  # word gold pred: conlleval input
        plot_curves(trainer.state.log_history, run_dir / "training_curves.png", "f1")
        config = to_dict(data_args, model_args, training_args)
        write_config(run_dir, config)
        as_rows = {
            k: [{"text": " ".join(s.tokens), "label": " ".join(s.tags)} for s in v] for k, v in splits.items()
        }
        write_manifest(run_dir, seed=training_args.seed, data_fingerprint=fingerprint(as_rows))
        write_model_card(
            run_dir,
            title=f"Named-entity recognition: {source}",
            base_model=model_path,
            data={"source": source, **rows, "labels": ", ".join(names), "windowed sentences": windowed},
            config=config,
            results=results,
            report_text=report_text,
            usage=f"ftkit predict {run_dir} --input texts.txt"
            + (
                "\n# It passes each word's shape as token_type_ids (ftkit.ner.word_shape), as in training;"
                "\n# transformers.pipeline would not."
                if case_feature
                else ""
            ),
        )
        logger.info(
            "test entity F1 %.4f (P %.4f, R %.4f); run directory: %s",
            results["test_f1"],
            results["test_precision"],
            results["test_recall"],
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
