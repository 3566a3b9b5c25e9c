"""The baseline: minimal Trainer scripts with the defaults of the Hugging Face example scripts.

Written here from scratch to mirror, run with their defaults,
- `examples/pytorch/text-classification/run_classification.py`: inputs padded to `max_seq_length`
  128 (`pad_to_max_length` is on by default) and collated with `default_data_collator`;
- `examples/pytorch/token-classification/run_ner.py`: one sentence per row, the label on the first
  sub-token of each word (`label_all_tokens` off), dynamic padding (`DataCollatorForTokenClassification`);
and for both the TrainingArguments defaults: random batches (no length grouping), per-device batch 8
for training and evaluation, AdamW at 5e-5 with a linear decay and no warm-up, no weight decay,
3 epochs, seed 42, checkpoints every 500 steps. The data is ftkit's (`load_text_splits`,
`load_tagged_splits`), so both sides train and validate on identical rows, and the metric is
computed by the same functions as ftkit's (accuracy; entity F1 over words, seqeval strict IOB2).

Two shortcuts save the benchmark's wall time and leave training untouched: text-classification
validation rows are padded per batch instead of to 128 (validation is not timed, and padding changes
a row's logits by rounding only; with short texts it was 80% of the baseline's validation time), and
a validation pass that Trainer already ran at the last step is not run a second time.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    DataCollatorForTokenClassification,
    DataCollatorWithPadding,
    TrainingArguments,
    set_seed,
)

from ftkit.conll import load_tagged_splits
from ftkit.data import label_key, load_text_splits
from ftkit.metrics import classification_scores
from ftkit.ner import entity_metrics, label_list
from ftkit.packages import default_model_path

# The example scripts' defaults (run_classification.py and TrainingArguments).
EXAMPLE_DEFAULTS = {
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 8,
    "learning_rate": 5e-5,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "num_train_epochs": 3,
    "save_steps": 500,
    "logging_steps": 500,
    "seed": 42,
}
MAX_SEQ_LENGTH = 128


def train_and_validate(trainer) -> dict:
    """Train, then the final validation metrics (reused when Trainer validated at the last step)."""
    metrics = dict(trainer.train().metrics)
    last = [
        e for e in trainer.state.log_history if "eval_loss" in e and e["step"] == trainer.state.global_step
    ]
    metrics.update(
        {k: v for k, v in last[-1].items() if k.startswith("eval_")} if last else trainer.evaluate()
    )
    return metrics


def textcls(trainer_cls, output_dir: str, dataset_name: str = "bbc-news", **overrides) -> dict:
    """Train and validate the baseline text classifier; `overrides` go to TrainingArguments."""
    splits, _ = load_text_splits(dataset_name=dataset_name, split_seed=42)
    labels = sorted({label_key(r["label"]) for r in splits["train"]})  # the example sorts label names
    label2id = {name: i for i, name in enumerate(labels)}
    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def preprocess(batch, padding):
        enc = tokenizer(batch["text"], padding=padding, max_length=MAX_SEQ_LENGTH, truncation=True)
        enc["label"] = [label2id[label_key(x)] for x in batch["label"]]
        return enc

    paddings = {"train": "max_length", "validation": False}
    ds = {
        split: Dataset.from_dict(
            {"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]}
        ).map(preprocess, batched=True, remove_columns=["text"], fn_kwargs={"padding": paddings[split]})
        for split, rows in splits.items()
        if split in paddings
    }
    set_seed(EXAMPLE_DEFAULTS["seed"])  # as the example scripts do before the model: the new head is random
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path,
        num_labels=len(labels),
        label2id=label2id,
        id2label={i: n for n, i in label2id.items()},
        use_safetensors=True,
    )

    def compute_metrics(pred):
        logits, gold = pred
        return classification_scores(gold, np.argmax(logits, axis=-1), len(labels))

    args = TrainingArguments(output_dir=output_dir, report_to="none", **{**EXAMPLE_DEFAULTS, **overrides})
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=ds["train"],
        eval_dataset=ds["validation"],
        processing_class=tokenizer,
        # Training rows are all MAX_SEQ_LENGTH already (default_data_collator's batches); this pads
        # only the validation batches.
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )
    return train_and_validate(trainer)


def ner(trainer_cls, output_dir: str, dataset_name: str = "conll2003", **overrides) -> dict:
    """Train and validate the baseline tagger (one sentence per row); `overrides` go to TrainingArguments."""
    splits, _ = load_tagged_splits(dataset_name=dataset_name, split_seed=42)
    names = label_list([s for split in splits.values() for s in split])
    label2id = {name: i for i, name in enumerate(names)}
    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def preprocess(batch):
        enc = tokenizer(batch["tokens"], truncation=True, is_split_into_words=True)
        enc["labels"] = []
        for i, tags in enumerate(batch["tags"]):
            previous, labels = None, []
            for word in enc.word_ids(i):
                labels.append(-100 if word is None or word == previous else label2id[tags[word]])
                previous = word
            enc["labels"].append(labels)
        return enc

    ds = {
        split: Dataset.from_dict({"tokens": [s.tokens for s in rows], "tags": [s.tags for s in rows]}).map(
            preprocess, batched=True, remove_columns=["tokens", "tags"]
        )
        for split, rows in splits.items()
        if split in ("train", "validation")
    }
    set_seed(EXAMPLE_DEFAULTS["seed"])  # as the example scripts do before the model: the new head is random
    model = AutoModelForTokenClassification.from_pretrained(
        model_path,
        num_labels=len(names),
        label2id=label2id,
        id2label=dict(enumerate(names)),
        use_safetensors=True,
    )
    gold = [s.tags for s in splits["validation"]]

    def compute_metrics(pred):
        # First sub-token of each word carries the prediction; words cut off by truncation get "O".
        logits, labels = pred
        tags = []
        for sentence, row_logits, row_labels in zip(gold, logits, labels, strict=True):
            words = [names[k] for k in row_logits[row_labels != -100].argmax(-1)]
            tags.append((words + ["O"] * len(sentence))[: len(sentence)])
        return entity_metrics(gold, tags)

    args = TrainingArguments(output_dir=output_dir, report_to="none", **{**EXAMPLE_DEFAULTS, **overrides})
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=ds["train"],
        eval_dataset=ds["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=compute_metrics,
    )
    return train_and_validate(trainer)


TASKS = {"textcls": textcls, "ner": ner}
