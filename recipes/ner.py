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

from ftkit import DataError, error_exit
from ftkit.augment import AugmentArguments, augment_sentences
from ftkit.baseline import baseline
from ftkit.config import TRAINER_DEFAULTS, parse_args
from ftkit.conll import TaggedSource, load_tagged_splits, tagged_fingerprint, write_conll
from ftkit.metrics import exact_eval_loss
from ftkit.models import ModelArguments, add_lora, load_model, load_tokenizer, lora_config, resolve_model_path
from ftkit.ner import (
    CONTEXTS,
    add_case_types,
    decode_tags,
    encode_splits,
    entity_metrics,
    entity_report,
    label_list,
    merge_windows,
    split_of,
    use_case_feature,
)
from ftkit.reliability import CrashSafeCheckpoints, NonFiniteError, NonFiniteGuard, resume_checkpoint
from ftkit.run import RunArguments, save_run, start_run
from ftkit.speed import SpeedArguments, speed_up
from ftkit.training import decide_training, early_stopping, train_token_stats

NAME, TASK = "ner", "token-classification"
logger = logging.getLogger(NAME)


@dataclass
class DataArguments:
    """How sentences become model windows, and how word tags are decoded."""

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
    early_stopping_patience: int = field(
        default=2, metadata={"help": "Evaluations without entity-F1 improvement before stopping."}
    )


# The recipe's defaults (= recipes/configs/ner.yaml); a --config YAML and the command line override them.
DEFAULTS = {
    **TRAINER_DEFAULTS,
    # 3 epochs (more on a small set: ftkit.training.decide_training): test F1 0.894 with the case feature
    # on CoNLL-2003, in 9 minutes on 2 cores (recipes/README.md, evaluating at the end only).
    "num_train_epochs": 3,
    "learning_rate": 2e-4,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 32,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.1,
    "weight_decay": 0.01,
    # Evaluate every epoch and keep the best model (a validation pass costs ~10% of an epoch on a CPU);
    # checkpoints every epoch let --resume auto continue a crashed run.
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,
    "load_best_model_at_end": True,
    "metric_for_best_model": "f1",
    "logging_steps": 20,
}

ARGUMENTS = (TaggedSource, DataArguments, AugmentArguments, ModelArguments, SpeedArguments, RunArguments,
             TrainingArguments)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args, options = parse_args(ARGUMENTS, argv, defaults=DEFAULTS, description=__doc__)
    source, data_args, aug_args, model_args, speed_args, run_args, training_args = args
    # [shared: start]
    run_dir, training_args = start_run(NAME, training_args, run_args, options)
    model_path = resolve_model_path(model_args.model_name_or_path)
    # [end shared]

    # ---- Data: load (IOB2), label set --------------------------------------------------------------
    splits, data_source = load_tagged_splits(**vars(source))
    # Entity types from every split: a type missing from train is still scored (recall 0), not an error.
    names = label_list([s for split in splits.values() for s in split])
    label2id = {name: i for i, name in enumerate(names)}
    rows = {split: len(sentences) for split, sentences in splits.items()}
    logger.info("data: %s; sentences %s; labels %s", data_source, rows, names)
    # Training sentences only; the counts above stay those of the data as loaded.
    splits["train"], augmented = augment_sentences(splits["train"], aug_args, training_args.seed)

    # ---- Tokenizer, model (+ case types), windows of sub-tokens ----------------------------------
    tokenizer = load_tokenizer(model_path, model_args.trust_remote_code)
    # [shared: model]
    # The new head is drawn from the global RNG; Trainer seeds only after the model exists.
    set_seed(training_args.seed)
    model = load_model(model_path, TASK, label2id, model_args.trust_remote_code)
    # CPU speed options and the precision, by measurement (recipes/README.md, "Speed on a CPU")
    speed, training_args = speed_up(model, speed_args, training_args, options)
    # [end shared]
    # An uncased tokenizer turns "Paris" into "paris" and drops NER's strongest cue. Each word's shape
    # goes back in through the token-type embeddings (measured on CoNLL-2003: see recipes/README.md).
    case_feature = use_case_feature(data_args.case_feature, tokenizer, model)
    data_args = options.decide(
        data_args, "auto: uncased tokenizer + token types", case_feature="on" if case_feature else "off"
    )
    if case_feature:
        add_case_types(model)
    features = encode_splits(
        tokenizer, splits, data_args.max_length, data_args.stride, data_args.context, label2id, case_feature
    )
    ds = {split: datasets.Dataset.from_dict(f.rows) for split, f in features.items()}

    # ---- LoRA and Trainer -------------------------------------------------------------------------
    peft_config = lora_config(model_args, TASK)
    if peft_config and case_feature:  # the new token types train (and are saved) with the adapter
        peft_config.modules_to_save.append("token_type_embeddings")
    model = add_lora(model, peft_config)
    training_args = decide_training(options, training_args, model_args, len(ds["train"]))
    # [shared: classification-callbacks]
    # Checkpoints count only once complete; a NaN/Inf loss or gradient stops the run (NonFiniteError).
    callbacks = [CrashSafeCheckpoints(), NonFiniteGuard()]
    if training_args.load_best_model_at_end:  # early stopping needs per-epoch eval and best-model tracking
        callbacks.append(early_stopping(data_args.early_stopping_patience, options))
    # [end shared]

    def word_tags(split, pred, method) -> list[list[str]]:
        """One tag per word of every sentence of `split`: windows merged back, then decoded."""
        word_logits = merge_windows(features[split], pred.predictions, pred.label_ids)
        return [
            decode_tags(np.stack(x) if x else np.zeros((0, len(names))), names, method) for x in word_logits
        ]

    def compute_metrics(pred):
        split = split_of(features, pred.label_ids)  # validation during training, then test
        gold = [s.tags for s in splits[split]]
        metrics = entity_metrics(gold, word_tags(split, pred, data_args.decode))
        if data_args.decode != "argmax":  # what the constrained decoding repairs
            argmax = entity_metrics(gold, word_tags(split, pred, "argmax"))
            metrics |= {"argmax_f1": argmax["f1"], "argmax_invalid_sequences": argmax["invalid_sequences"]}
        # Reported as eval_loss: Trainer's own counts the rows a multi-process run repeats as padding.
        return {**metrics, "loss": exact_eval_loss(pred.predictions, pred.label_ids)}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=ds["train"],
        eval_dataset=ds["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )

    # ---- Train, evaluate, test -----------------------------------------------------------------
    # [shared: train]
    checkpoint = resume_checkpoint(run_args.resume, training_args.output_dir)
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    results = dict(train_result.metrics)
    results.update(train_token_stats(trainer, results["train_runtime"], resumed_from=checkpoint))
    # [end shared]
    results.update(trainer.evaluate(metric_key_prefix="eval"))
    test = trainer.predict(ds["test"], metric_key_prefix="test")
    results.update(test.metrics)
    results |= baseline(splits, TASK, results)  # each word's most frequent training tag
    results.update({f"{split}_windowed_sentences": f.n_long for split, f in features.items()} | augmented)
    results.update(
        {"data_source": data_source, **{f"data_{s}_sentences": n for s, n in rows.items()}, **speed}
    )

    # ---- Save the run directory (main process only) ---------------------------------------------
    info = {
        "task": TASK, "max_length": data_args.max_length, "long_text": "chunks", "stride": data_args.stride,
        "context": data_args.context, "decode": data_args.decode, "case_feature": case_feature, "labels": names,
    }  # fmt: skip
    pred = word_tags("test", test, data_args.decode)
    gold = [s.tags for s in splits["test"]]
    save_run(
        run_dir, trainer, tokenizer, options=options,
        args=(source, data_args, aug_args, model_args, speed_args, run_args, training_args),
        info=info, results=results,
        predictions=[
            {"origin": s.origin, "tokens": s.tokens, "gold": s.tags, "pred": p}
            for s, p in zip(splits["test"], pred, strict=True)
        ],
        report=(None, entity_report(gold, pred)),
        curve_metric="f1",
        fingerprint=tagged_fingerprint(splits),
        title=f"Named-entity recognition: {data_source}",
        data={
            "source": data_source, **rows, "labels": ", ".join(names),
            "windowed sentences": {split: f.n_long for split, f in features.items()},
        },
    )  # fmt: skip
    if trainer.is_world_process_zero():  # word gold pred per line: conlleval's input
        write_conll(run_dir / "test_predictions.conll", splits["test"], pred)
    logger.info(
        "test entity F1 %.4f (P %.4f, R %.4f); run directory: %s",
        results["test_f1"], results["test_precision"], results["test_recall"], run_dir,
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
