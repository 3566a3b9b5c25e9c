"""Multi-task tagging: one shared encoder, one token-classification head per tag layer (NER, POS, chunk).

Every head reads the same encoder pass, so a three-head model costs one encoder's time and size plus
three small linear layers. Words are aligned, windowed and merged exactly as in `ftkit.ner` (labels on
each word's first sub-token, one prediction per word); here a row's label at a sub-token is a list of
ids, one per head (-100 where a head has no label).

A head is a name, a label list and a scheme: "IOB2" heads (entities, chunks) are scored with seqeval
and decoded without invalid transitions; "none" heads (POS tags) are scored by word accuracy. Heads
that label the whole sequence (topic, polarity) would be one more kind of head in `TagHeads`; the
recipe's shape does not depend on how many heads there are or of which kind.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ftkit import DataError
from ftkit.conll import PLAIN, SCHEMES, Sentence
from ftkit.metrics import softmax
from ftkit.ner import (
    Features,
    decode_tags,
    encode_pieces,
    entity_spans,
    group_sentences,
    label_list,
    merge_windows,
    prediction_windows,
    split_words,
    word_pieces,
    word_shape,
)
from ftkit.text import pad_batch, special_tokens_template

logger = logging.getLogger(__name__)

TASK = "multi-task"


@dataclass
class HeadArguments:
    """The tagging heads: one per tag column of the CoNLL files, each with its own loss weight."""

    heads: list[str] = field(
        default_factory=lambda: ["ner", "pos", "chunk"],
        metadata={"help": "Head names (they prefix the metric keys: test_ner_f1, test_pos_accuracy)."},
    )
    head_columns: list[int] = field(
        default_factory=lambda: [3, 1, 2],
        metadata={"help": "CoNLL column of each head's tags (0 = the word). CoNLL-2003: word POS chunk NER."},
    )
    head_schemes: list[str] = field(
        default_factory=lambda: ["auto", "none", "auto"],
        metadata={
            "help": "Tag scheme of each head's column: auto, IOB2, IOB1, BIOES (chunks, read as IOB2), or "
            "none for tags without chunks (POS)."
        },
    )
    loss_weights: list[float] = field(
        default_factory=lambda: [1.0, 1.0, 1.0],
        metadata={
            "help": "Weight of each head's loss (mean cross-entropy over its labelled words) in the "
            "training loss, their weighted sum. Default 1 each: every head counts the same."
        },
    )

    def columns(self) -> dict[str, tuple[int, str]]:
        """{head: (column, scheme)} for `ftkit.conll.read_conll(columns=...)`; checks the lists agree."""
        sizes = {len(self.heads), len(self.head_columns), len(self.head_schemes), len(self.loss_weights)}
        if len(sizes) != 1:
            raise DataError(
                "heads, head_columns, head_schemes and loss_weights need one entry per head, got "
                f"{len(self.heads)}, {len(self.head_columns)}, {len(self.head_schemes)}, {len(self.loss_weights)}"
            )
        if len(set(self.heads)) != len(self.heads):
            raise DataError(f"head names must differ, got {self.heads}")
        for s in self.head_schemes:
            if s not in ("auto", PLAIN, *SCHEMES):
                raise DataError(f"unknown head scheme {s!r}; use auto, none, {', '.join(SCHEMES)}")
        return {h: (c, s) for h, c, s in zip(self.heads, self.head_columns, self.head_schemes, strict=True)}


def head_labels(
    splits: dict[str, Sequence[Sentence]], columns: dict[str, tuple[int, str]]
) -> dict[str, list[str]]:
    """Each head's label names from every split: O then B-/I- per type for IOB heads (`label_list`),
    the sorted tags for plain heads."""
    sentences = [s for split in splits.values() for s in split]
    out = {}
    for head, (_, scheme) in columns.items():
        if scheme == PLAIN:
            out[head] = sorted({t for s in sentences for t in s.layers[head]})
        else:
            out[head] = label_list([Sentence(s.tokens, s.layers[head]) for s in sentences])
    return out


def encode_multitask_splits(
    tokenizer,
    splits: dict[str, Sequence[Sentence]],
    labels: dict[str, list[str]],
    max_length: int,
    stride: int,
    context: str,
    case_feature: bool,
) -> dict[str, Features]:
    """Windowed rows of every split (see `ftkit.ner.encode_pieces`); a word's label is the list of
    its ids under each head, in the order of `labels`."""
    ids = {h: {n: i for i, n in enumerate(names)} for h, names in labels.items()}
    specials = special_tokens_template(tokenizer)
    out = {}
    for split, sentences in splits.items():
        word_labels = [
            [list(t) for t in zip(*(map(ids[h].__getitem__, s.layers[h]) for h in labels), strict=True)]
            for s in sentences
        ]
        out[split] = encode_pieces(
            word_pieces(tokenizer, [s.tokens for s in sentences]),
            group_sentences([s.doc_id for s in sentences], context),
            specials,
            max_length,
            stride,
            word_labels,
            [[word_shape(w) for w in s.tokens] for s in sentences] if case_feature else None,
        )
    logger.info("windows %s; case feature %s", {s: len(f.windows) for s, f in out.items()}, case_feature)
    return out


def head_logits(predictions) -> tuple[np.ndarray, ...]:
    """Trainer's predictions as one logits array per head: a model with a single head gets its logits
    back bare, not as a 1-tuple (Trainer unwraps one-element outputs)."""
    return tuple(predictions) if isinstance(predictions, tuple | list) else (predictions,)


def head_view(features: Features, h: int) -> Features:
    """`features` with head `h`'s labels only, as `ftkit.ner.merge_windows` and `split_of` take them."""
    rows = dict(features.rows, labels=[[x[h] for x in row] for row in features.rows["labels"]])
    return Features(rows, features.windows, features.groups, features.sentence_lengths, features.n_long)


class TagHeads(nn.Module):
    """One linear layer per head on the shared hidden states; returns the logits of every head, in order.

    One module (not one per head) so that LoRA's `modules_to_save=["heads"]` trains and saves them all.
    """

    def __init__(self, hidden_size: int, sizes: dict[str, int], dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linears = nn.ModuleDict({h: nn.Linear(hidden_size, n) for h, n in sizes.items()})

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = self.dropout(hidden)
        return tuple(linear(hidden) for linear in self.linears.values())


class MultiTaskTagger(nn.Module):
    """A shared encoder (`transformers.AutoModel`) with one token-classification head per tag layer.

    `labels` is {head: label names}; `loss_weights` {head: weight} (default 1 each). `forward` takes
    `labels` of shape (batch, tokens, heads), -100 where a head has no label, and returns a dict with
    the weighted sum of the heads' mean cross-entropies as `loss`, each head's own as `loss_<head>`
    only when asked (`head_losses`), and `logits_<head>` (batch, tokens, labels of that head).
    """

    def __init__(
        self, encoder: nn.Module, labels: dict[str, list[str]], loss_weights: dict[str, float] | None = None
    ):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config  # peft, Trainer and the speed options read the encoder's config
        self.labels = {h: list(v) for h, v in labels.items()}
        self.loss_weights = {h: 1.0 for h in labels} | dict(loss_weights or {})
        # The heads' dropout is BERT's classifier dropout, as AutoModelForTokenClassification uses.
        config = encoder.config
        dropout = getattr(config, "classifier_dropout", None)
        dropout = dropout if dropout is not None else getattr(config, "hidden_dropout_prob", 0.1)
        self.heads = TagHeads(config.hidden_size, {h: len(v) for h, v in labels.items()}, dropout)
        self.accepts_loss_kwargs = False  # the loss is a per-batch mean (see ftkit.models.load_model)

    @classmethod
    def from_encoder(cls, name_or_path: str, labels: dict[str, list[str]], trust_remote_code: bool = False):
        """The pretrained encoder at `name_or_path` (safetensors only) with fresh heads drawn from the global RNG."""
        from transformers import AutoModel

        try:
            encoder = AutoModel.from_pretrained(
                name_or_path, use_safetensors=True, trust_remote_code=trust_remote_code
            )
        except OSError as err:
            raise DataError(f"cannot load model weights (safetensors) from {name_or_path!r}: {err}") from None
        return cls(_without_pooler(encoder), labels)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        head_losses: bool = False,
    ) -> dict[str, torch.Tensor]:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
        out = {f"logits_{h}": z for h, z in zip(self.labels, self.heads(hidden), strict=True)}
        if labels is not None:
            total = 0.0
            for k, h in enumerate(self.labels):
                z = out[f"logits_{h}"]
                loss = nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), labels[..., k].reshape(-1))
                total = total + self.loss_weights[h] * loss
                if head_losses:
                    out[f"loss_{h}"] = loss
            out = {"loss": total, **out}
        return out

    def save_pretrained(
        self, out_dir: str | Path, safe_serialization: bool = True, state_dict: dict | None = None
    ) -> None:
        """config.json (the encoder's) and model.safetensors (encoder.* and heads.*); the heads' label
        lists are in the run's ftkit_run.json, which `load_multitask` reads with them. `state_dict`:
        the full weights when the model's own are sharded (FSDP, see `ftkit.models.save_model`)."""
        from safetensors.torch import save_file

        if not safe_serialization:
            raise ValueError("ftkit saves safetensors only")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(out_dir)
        weights = self.state_dict() if state_dict is None else state_dict
        state = {k: v.detach().contiguous() for k, v in weights.items()}
        save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})


def _without_pooler(encoder: nn.Module) -> nn.Module:
    """Drop BERT's sequence pooler: tagging heads never use it, and an unused parameter would need
    DDP's find_unused_parameters (a search over the graph every step) in a multi-process run."""
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


def load_multitask(run_dir: str | Path, info: dict, base_path: str) -> nn.Module:
    """A multi-task run's model in eval mode: model.safetensors (full or merged runs), else the base
    encoder at `base_path` + the run's adapter (which carries the trained heads and case types)."""
    from safetensors.torch import load_file
    from transformers import AutoModel

    from ftkit.ner import add_case_types

    run_dir = Path(run_dir)
    labels = info["heads"]
    if (run_dir / "model.safetensors").is_file():
        from ftkit.predict import run_config  # never runs code named by the run's config.json

        encoder = _without_pooler(AutoModel.from_config(run_config(run_dir)))
        model = MultiTaskTagger(encoder, labels, info.get("loss_weights"))
        model.load_state_dict(load_file(run_dir / "model.safetensors"))
        return model.eval()
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        raise DataError(f"{run_dir}: no model.safetensors and no adapter/ folder: nothing to load")
    from peft import PeftModel

    model = MultiTaskTagger.from_encoder(base_path, labels)
    if info.get("case_feature"):
        add_case_types(model.encoder)
    return PeftModel.from_pretrained(model, run_dir / "adapter").eval()


def collate(tokenizer):
    """Batches of windowed rows: input_ids, token_type_ids and labels (tokens x heads) right-padded."""

    def collate_rows(rows: list[dict]) -> dict[str, torch.Tensor]:
        keys = [k for k in ("input_ids", "token_type_ids") if k in rows[0]]
        batch = pad_batch({k: [r[k] for r in rows] for k in keys}, tokenizer.pad_token_id)
        if "labels" in rows[0]:
            width, heads = batch["input_ids"].shape[1], len(rows[0]["labels"][0])
            pad = [[-100] * heads]
            batch["labels"] = torch.tensor(
                [list(r["labels"]) + pad * (width - len(r["labels"])) for r in rows]
            )
        return batch

    return collate_rows


def head_metrics(
    gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], scheme: str
) -> dict[str, float]:
    """Entity/chunk metrics (`ftkit.ner.entity_metrics`) for an IOB head; word accuracy for a plain one."""
    from ftkit.ner import entity_metrics

    if scheme != PLAIN:
        return entity_metrics(gold, pred)
    words = sum(len(g) for g in gold)
    correct = sum(a == b for g, p in zip(gold, pred, strict=True) for a, b in zip(g, p, strict=True))
    return {"accuracy": correct / max(words, 1), "words": float(words)}


def predict_head_logits(
    model,
    tokenizer,
    word_lists: Sequence[Sequence[str]],
    heads: Sequence[str],
    max_length: int,
    stride: int,
    batch_size: int = 32,
    case_feature: bool = False,
    groups: Sequence[Sequence[int]] | None = None,
) -> dict[str, list[np.ndarray]]:
    """{head: logits (words x labels) of every word of every word list}, from one encoder pass per
    batch of length-sorted windows (as `ftkit.ner.predict_word_logits`, `groups` the same)."""
    features = prediction_windows(tokenizer, word_lists, max_length, stride, groups, case_feature)
    keys = ["input_ids", "token_type_ids"] if case_feature else ["input_ids"]
    rows: dict[str, list] = {h: [] for h in heads}
    model.eval()
    with torch.inference_mode():
        for b in range(0, len(features.windows), batch_size):
            inputs = pad_batch(
                {k: features.rows[k][b : b + batch_size] for k in keys}, tokenizer.pad_token_id
            )
            out = model(**inputs)
            for h in heads:
                rows[h] += list(out[f"logits_{h}"].float().cpu().numpy())
    return {
        h: [np.stack(v) if v else np.zeros((0, 0)) for v in merge_windows(features, rows[h])] for h in heads
    }


def predict_multitask(
    model, tokenizer, texts: Sequence[str], origins: Sequence[str], info: dict, batch_size: int = 32
) -> list[dict]:
    """`ftkit predict` rows for a multi-task run, every head from one encoder pass: {"origin", "text",
    "words": [{"text", "start", "end"}], "tags": {head: one tag per word}, "spans": {IOB head: [{"type",
    "text", "start", "end", "score"}]}}, character offsets into the text as `ftkit.ner.find_entities`."""
    words = [split_words(t) for t in texts]
    heads, schemes = info["heads"], info["head_schemes"]
    logits = predict_head_logits(
        model, tokenizer, [[w for w, _, _ in ws] for ws in words], list(heads), info["max_length"],
        info["stride"], batch_size, info.get("case_feature", False),
    )  # fmt: skip
    out = []
    for i, (origin, text, ws) in enumerate(zip(origins, texts, words, strict=True)):
        row: dict = {
            "origin": origin,
            "text": text,
            "words": [{"text": w, "start": a, "end": b} for w, a, b in ws],
        }
        row["tags"], row["spans"] = {}, {}
        for h, names in heads.items():
            lg = logits[h][i]
            iob = schemes[h] != PLAIN
            tags = (
                decode_tags(lg, names, info.get("decode", "viterbi") if iob else "argmax") if len(ws) else []
            )
            row["tags"][h] = tags
            if iob:
                probs = softmax(lg) if len(ws) else lg
                ids = np.array([names.index(t) for t in tags], dtype=int)
                row["spans"][h] = [
                    {"type": typ, "text": text[ws[a][1] : ws[b - 1][2]], "start": ws[a][1], "end": ws[b - 1][2],
                     "score": round(float(probs[np.arange(a, b), ids[a:b]].mean()), 4)}
                    for typ, a, b in entity_spans(tags)
                ]  # fmt: skip
        out.append(row)
    return out
