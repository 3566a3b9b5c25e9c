"""Fine-tune one shared encoder with several tagging heads (CoNLL-2003 by default: NER + POS + chunking).

Copy-paste commands:

    make recipe TASK=multitask                                 # CoNLL-2003 + all-MiniLM-L6-v2, offline
    python recipes/multitask.py --loss_weights 1 0.5 0.5       # NER counts twice as much as POS or chunks
    python recipes/multitask.py --train_file my.conll --heads ner pos --head_columns 3 1 --head_schemes auto none --loss_weights 1 1
    python recipes/multitask.py --config recipes/configs/multitask.yaml --use_lora --merge_lora
    accelerate launch --multi_gpu --num_processes 2 recipes/multitask.py --max_steps 50   # 2 CPU ranks (gloo)
    ftkit predict runs/multitask/<run> --input texts.txt       # every head from one encoder pass

On a CPU-only machine `accelerate launch --cpu --num_processes 2` silently runs ONE process: use
`--multi_gpu` (gloo) or `torchrun --nproc_per_node 2`.

The CoNLL-2003 files carry POS and chunk tags beside the entity tags (word POS chunk NER): each tag
column gets its own head on the same encoder, trained on the weighted sum of the heads' losses. Words,
windows and merging are the NER recipe's (one prediction per word); metric keys carry the head's name
(test_ner_f1, test_pos_accuracy, test_chunk_f1; eval_* the same).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets
import numpy as np
from accelerate import PartialState
from transformers import Trainer, TrainingArguments, set_seed

from ftkit import DataError, error_exit
from ftkit.config import TRAINER_DEFAULTS, parse_args
from ftkit.conll import PLAIN, Sentence, load_tagged_splits, tagged_fingerprint
from ftkit.metrics import exact_eval_loss
from ftkit.models import ModelArguments, add_lora, load_model, load_tokenizer, lora_config, resolve_model_path
from ftkit.multitask import (
    HeadArguments,
    collate,
    encode_multitask_splits,
    head_labels,
    head_logits,
    head_metrics,
    head_view,
)
from ftkit.ner import (
    CONTEXTS,
    add_case_types,
    decode_tags,
    entity_report,
    merge_windows,
    split_of,
    use_case_feature,
)
from ftkit.reliability import CrashSafeCheckpoints, NonFiniteError, NonFiniteGuard, resume_checkpoint
from ftkit.run import RunArguments, save_run, start_run
from ftkit.speed import SpeedArguments, speed_up
from ftkit.training import train_token_stats

NAME, TASK = "multitask", "multi-task"
logger = logging.getLogger(NAME)


@dataclass
class DataSource:
    """Where the sentences come from: the built-in CoNLL-2003, or CoNLL column files."""

    dataset_name: str = field(
        default="conll2003",
        metadata={"help": "Built-in conll2003 (offline), used when no train_file is given."},
    )
    train_file: str | None = field(
        default=None, metadata={"help": "CoNLL column file with one column per head."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Same format. Default: 10%% of train documents."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Same format. Default: 10%% of train documents."}
    )
    holdout_fraction: float = field(
        default=0.1, metadata={"help": "Share of train documents held out for a missing split."}
    )
    split_seed: int = field(default=42, metadata={"help": "Seed of the held-out split (not of training)."})


@dataclass
class DataArguments:
    """How sentences become model windows, and how IOB heads are decoded."""

    max_length: int = field(default=256, metadata={"help": "Sub-tokens per window, special tokens included."})
    stride: int = field(
        default=64, metadata={"help": "Sub-tokens shared by consecutive windows of a long sequence."}
    )
    decode: str = field(
        default="viterbi",
        metadata={
            "help": "IOB heads: viterbi (no invalid IOB2 transitions) or argmax.",
            "choices": ["viterbi", "argmax"],
        },
    )
    case_feature: str = field(
        default="auto",
        metadata={"help": "auto, on or off: word capitalization as token types (see recipes/ner.py)."},
    )
    context: str = field(default="document", metadata={"help": "document: neighbouring sentences share windows.", "choices": list(CONTEXTS)})  # fmt: skip


# The recipe's defaults (= recipes/configs/multitask.yaml); a --config YAML and the command line override them.
DEFAULTS = {
    **TRAINER_DEFAULTS,
    # The NER recipe's schedule: 3 epochs at 2e-4 (recipes/README.md has the measured runs).
    "num_train_epochs": 3,
    "learning_rate": 2e-4,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 32,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0.1,
    "weight_decay": 0.01,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 20,
}

ARGUMENTS = (
    DataSource,
    HeadArguments,
    DataArguments,
    ModelArguments,
    SpeedArguments,
    RunArguments,
    TrainingArguments,
)


def main(argv: list[str] | None = None) -> dict:
    args, options = parse_args(ARGUMENTS, argv, defaults=DEFAULTS, description=__doc__)
    source, head_args, data_args, model_args, speed_args, run_args, training_args = args
    # [shared: start]
    run_dir, training_args = start_run(NAME, training_args, run_args, options)
    model_path = resolve_model_path(model_args.model_name_or_path)
    # [end shared]

    # ---- Data: one tag column per head (IOB heads as IOB2), label sets --------------------------
    columns = head_args.columns()
    splits, data_source = load_tagged_splits(
        dataset_name=source.dataset_name, train_file=source.train_file, validation_file=source.validation_file,
        test_file=source.test_file, holdout_fraction=source.holdout_fraction, split_seed=source.split_seed, columns=columns,
    )  # fmt: skip
    heads = head_labels(splits, columns)  # from every split: a tag missing from train is still scored
    schemes = {h: PLAIN if s == PLAIN else "IOB2" for h, (_, s) in columns.items()}
    key_metric = {h: f"{h}_accuracy" if schemes[h] == PLAIN else f"{h}_f1" for h in heads}
    methods = {h: "argmax" if schemes[h] == PLAIN else data_args.decode for h in heads}
    rows = {split: len(sentences) for split, sentences in splits.items()}
    logger.info("data: %s; sentences %s; heads %s", data_source, rows, {h: len(v) for h, v in heads.items()})

    # ---- Tokenizer, model (+ case types), windows of sub-tokens ----------------------------------
    tokenizer = load_tokenizer(model_path, model_args.trust_remote_code)
    label2id = {h: {n: i for i, n in enumerate(names)} for h, names in heads.items()}
    # [shared: model]
    # The new head is drawn from the global RNG; Trainer seeds only after the model exists.
    set_seed(training_args.seed)
    model = load_model(model_path, TASK, label2id, model_args.trust_remote_code)
    # CPU speed options and the precision, by measurement (recipes/README.md, "Speed on a CPU")
    speed, training_args = speed_up(model, speed_args, training_args, options)
    # [end shared]
    model.loss_weights = weights = dict(zip(head_args.heads, head_args.loss_weights, strict=True))
    case_feature = use_case_feature(data_args.case_feature, tokenizer, model.encoder)
    data_args = options.decide(
        data_args, "auto: uncased tokenizer + token types", case_feature="on" if case_feature else "off"
    )
    if case_feature:
        add_case_types(model.encoder)
    features = encode_multitask_splits(
        tokenizer, splits, heads, data_args.max_length, data_args.stride, data_args.context, case_feature
    )
    ds = {split: datasets.Dataset.from_dict(f.rows) for split, f in features.items()}
    # Every head labels every word and the pooler is gone: each step reaches every parameter, so DDP
    # needs no search for unused ones (a head trained on another corpus's batches would need it).
    training_args = options.decide(
        training_args, "every parameter gets a gradient", ddp_find_unused_parameters=False
    )

    # ---- LoRA and Trainer -------------------------------------------------------------------------
    peft_config = lora_config(model_args, TASK)
    if peft_config and case_feature:  # the new token types train (and are saved) with the adapter
        peft_config.modules_to_save.append("token_type_embeddings")
    model = add_lora(model, peft_config)

    def word_tags(split, pred, h, method) -> list[list[str]]:
        """Head h's tag per word of every sentence of `split`: windows merged back, then decoded."""
        word_logits = merge_windows(
            head_view(features[split], h), head_logits(pred.predictions)[h], pred.label_ids[..., h]
        )
        names = heads[list(heads)[h]]
        return [
            decode_tags(np.stack(x) if x else np.zeros((0, len(names))), names, method) for x in word_logits
        ]

    def compute_metrics(pred):
        split = split_of({s: head_view(f, 0) for s, f in features.items()}, pred.label_ids[..., 0])
        metrics, losses = {}, []
        for h, head in enumerate(heads):
            gold = [s.layers[head] for s in splits[split]]
            scores = head_metrics(gold, word_tags(split, pred, h, methods[head]), schemes[head])
            # Per-head loss: mean cross-entropy over the words, each row once (see exact_eval_loss).
            scores["loss"] = exact_eval_loss(head_logits(pred.predictions)[h], pred.label_ids[..., h])
            losses.append(weights[head] * scores["loss"])
            metrics |= {f"{head}_{k}": v for k, v in scores.items()}
        return {**metrics, "loss": sum(losses)}  # the training objective: the weighted sum

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=ds["train"],
        eval_dataset=ds["validation"],
        processing_class=tokenizer,
        data_collator=collate(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=[CrashSafeCheckpoints(), NonFiniteGuard()],  # complete checkpoints; stop on NaN/Inf
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
    results.update({f"{split}_windowed_sentences": f.n_long for split, f in features.items()})
    results.update({"data_source": data_source, **{f"data_{s}_sentences": n for s, n in rows.items()}, **speed})  # fmt: skip

    # ---- Save the run directory (main process only) ---------------------------------------------
    info = {
        "task": TASK, "max_length": data_args.max_length, "long_text": "chunks", "stride": data_args.stride,
        "context": data_args.context, "decode": data_args.decode, "case_feature": case_feature,
        "heads": heads, "head_schemes": schemes, "loss_weights": weights,
    }  # fmt: skip
    pred = {head: word_tags("test", test, h, methods[head]) for h, head in enumerate(heads)}
    iob = [h for h in heads if schemes[h] != PLAIN]
    save_run(
        run_dir, trainer, tokenizer, options=options,
        args=(source, head_args, data_args, model_args, speed_args, run_args, training_args),
        info=info, results=results,
        predictions=[
            {"origin": s.origin, "tokens": s.tokens, "gold": s.layers, "pred": {h: pred[h][i] for h in heads}}
            for i, s in enumerate(splits["test"])
        ],
        report=(None, "".join(f"[{h}]\n{entity_report([s.layers[h] for s in splits['test']], pred[h])}\n" for h in iob)),
        curve_metric=key_metric[head_args.heads[0]],
        fingerprint=tagged_fingerprint({k: [_joined(s) for s in v] for k, v in splits.items()}),
        title=f"Multi-task tagging ({', '.join(heads)}): {data_source}",
        data={"source": data_source, **rows, **{f"{h} labels": len(v) for h, v in heads.items()}},
    )  # fmt: skip
    scores = ", ".join(f"{key_metric[h]} {results['test_' + key_metric[h]]:.4f}" for h in heads)
    logger.info("test %s; run directory: %s", scores, run_dir)
    return results


def _joined(s: Sentence) -> Sentence:
    """The sentence with every head's tags in one tag per word, for the data fingerprint."""
    return Sentence(s.tokens, ["|".join(t) for t in zip(*s.layers.values(), strict=True)], s.doc_id)


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
