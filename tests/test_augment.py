"""Augmentation: NER tags stay aligned, the same seed gives the same rows, the global RNGs are untouched,
and in the recipes only the training rows change (validation and test byte-identical), recorded in the run."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
import ner  # noqa: E402
import sentiment  # noqa: E402
import textcls  # noqa: E402
from test_ner_recipe import recipe_args as ner_args  # noqa: E402
from test_textcls import recipe_args as textcls_args  # noqa: E402

from ftkit import DataError  # noqa: E402
from ftkit.augment import (  # noqa: E402
    TEXT_METHODS,
    AugmentArguments,
    augment_sentences,
    augment_texts,
    replace_mentions,
    replace_tokens,
    roget_synonyms,
)
from ftkit.conll import Sentence, tagged_fingerprint  # noqa: E402
from ftkit.data import fingerprint  # noqa: E402
from ftkit.ner import count_invalid, entity_spans  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
TYPES = ("PER", "ORG", "LOC")


# ---- NER: tags aligned by construction --------------------------------------------------------------
@st.composite
def sentences(draw) -> Sentence:
    """A sentence of IOB2 tags: O words and entities of 1-3 words, each word tagged once."""
    tokens, tags = [], []
    for _ in range(draw(st.integers(0, 6))):
        typ = draw(st.sampled_from((None, *TYPES)))
        n = 1 if typ is None else draw(st.integers(1, 3))
        tokens += [
            draw(st.sampled_from(("the", "a", "Paris", "Acme", "Ann", "New", "York", ","))) for _ in range(n)
        ]
        tags += ["O"] if typ is None else [f"B-{typ}"] + [f"I-{typ}"] * (n - 1)
    return Sentence(tokens, tags, draw(st.integers(0, 2)), list(range(1, len(tokens) + 1)), "t.conll")


def aligned(s: Sentence) -> bool:
    return len(s.tokens) == len(s.tags) == len(s.lines) and count_invalid([s.tags]) == 0


@settings(max_examples=30, deadline=None)
@given(st.lists(sentences(), min_size=1, max_size=8), st.floats(0.05, 1.0), st.integers(0, 2**16))
def test_ner_augmentation_keeps_tags_aligned_valid_and_typed(train, rate, seed):
    args = AugmentArguments("mention,token", rate, 2)
    out, record = augment_sentences(train, args, seed)
    assert out[: len(train)] == train and len(out) == len(train) + record["augment_rows_added"]
    assert all(aligned(s) for s in out)
    assert {t for s in out for t, _, _ in entity_spans(s.tags)} <= {
        t for s in train for t, _, _ in entity_spans(s.tags)
    }
    mentions = {(t, tuple(s.tokens[a:b])) for s in train for t, a, b in entity_spans(s.tags)}
    out, _ = augment_sentences(train, AugmentArguments("mention", rate, 2), seed)
    assert {(t, tuple(s.tokens[a:b])) for s in out for t, a, b in entity_spans(s.tags)} <= mentions

    # Per sentence: mention replacement keeps the sequence of entity types, token replacement every tag.
    rng = np.random.default_rng(seed)
    pool = {t: sorted({m for u, m in mentions if u == t}) for t in TYPES}
    by_tag = {tag: [w for s in train for w, g in zip(s.tokens, s.tags, strict=True) if g == tag] for tag in
              {g for s in train for g in s.tags}}  # fmt: skip
    for s in train:
        m = replace_mentions(s, rate, pool, rng)
        assert aligned(m) and [t for t, _, _ in entity_spans(m.tags)] == [
            t for t, _, _ in entity_spans(s.tags)
        ]
        t = replace_tokens(s, rate, by_tag, rng)
        assert aligned(t) and t.tags == s.tags
        assert all(w in by_tag[g] for w, g in zip(t.tokens, t.tags, strict=True))


def test_ner_copies_are_documents_of_their_own():
    train = [Sentence(["Ann", "met", "Bob"], ["B-PER", "O", "B-PER"], d, [1, 2, 3], "t") for d in (0, 0, 1)]
    out, record = augment_sentences(train, AugmentArguments("mention", 1.0, 1), 0)
    assert record["augment_rows_added"] == sum(s.tokens != ["Ann", "met", "Bob"] for s in out[3:])
    assert all(s.doc_id >= 2 for s in out[3:])  # copy k of document d is document d + k * 2


# ---- Texts: seeded, own generator, unchanged rows skipped --------------------------------------------
ROWS = [
    {"text": f"The {w} market said strong profits came in a good year for the company", "label": y, "origin": f"f:{i}"}
    for i, (w, y) in enumerate([("stock", "business"), ("film", "entertainment"), ("vote", "politics")] * 4)
]  # fmt: skip


def test_same_seed_same_rows_and_the_global_rngs_are_untouched():
    args = AugmentArguments(",".join(TEXT_METHODS), 0.2, 2)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    first, record = augment_texts(ROWS, args, 7)
    assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])
    assert augment_texts(ROWS, args, 7)[0] == first
    assert augment_texts(ROWS, args, 8)[0] != first
    assert first[: len(ROWS)] == ROWS and record["augment_rows_added"] == len(first) - len(ROWS) > 0
    assert sum(record["augment_rows_by_method"].values()) == record["augment_rows_added"]
    assert all(r["label"] == ROWS[int(r["origin"].split(":")[1].split()[0])]["label"] for r in first)


def test_in_place_edits_count_changed_rows_and_bad_options_fail():
    out, record = augment_texts(ROWS, AugmentArguments("delete", 0.3, 0), 0)
    assert len(out) == len(ROWS) and record["augment_rows_changed"] == len(ROWS)
    assert record["augment_rows_added"] == 0
    assert augment_texts(ROWS, AugmentArguments(), 0) == (ROWS, {})  # off by default
    with pytest.raises(DataError, match="unknown method.*mention"):
        augment_texts(ROWS, AugmentArguments("delete,mention"), 0)
    with pytest.raises(DataError, match="augment_rate"):
        augment_texts(ROWS, AugmentArguments("swap", 0.0), 0)


def test_synonyms_come_from_roget_and_keep_case_and_punctuation():
    synonyms = roget_synonyms()
    assert "big" in synonyms["great"] and "fog" not in synonyms.get("film", ())
    out, _ = augment_texts(
        [{"text": "Film, film!", "label": "x", "origin": "f:1"}], AugmentArguments("synonym", 1.0), 0
    )
    first, second = out[1]["text"].split()
    assert (
        first[0].isupper() and first.endswith(",") and second.endswith("!") and first[:-1].lower() != "film"
    )


# ---- Recipes: only training rows change, recorded in the run ----------------------------------------------
def spy(monkeypatch, module, name: str) -> dict:
    """Record the splits the recipe fingerprints: the rows it trained and scored on."""
    seen, real = {}, getattr(module, name)
    real = getattr(real, "__wrapped__", real)  # a spy set before: record only in the new one

    def recording(splits):
        seen["splits"] = splits
        return real(splits)

    recording.__wrapped__ = real
    monkeypatch.setattr(module, name, recording)
    return seen


def held_out_fingerprint(splits) -> str:
    held = {s: splits[s] for s in ("validation", "test")}
    return tagged_fingerprint(held) if isinstance(held["test"][0], Sentence) else fingerprint(held)


def rows_of(split) -> str:
    return json.dumps(
        [dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r for r in split], sort_keys=True
    )


RECIPE_RUNS = {
    "textcls": (textcls, "fingerprint", "delete,swap,insert,synonym",
                lambda model, out: textcls_args(model, FIXTURES, out, "--max_steps", "2")),
    "sentiment": (sentiment, "fingerprint", "swap,synonym", lambda model, out: [
        "--model_name_or_path", model, "--train_file", str(FIXTURES / "sentiment" / "polarity.csv"),
        "--output_dir", str(out), "--max_steps", "2", "--disable_tqdm", "true"]),
    "ner": (ner, "tagged_fingerprint", "mention,token",
            lambda model, out: ner_args(model, out, "--max_steps", "2", "--num_train_epochs", "1")),
}  # fmt: skip


@pytest.mark.parametrize("recipe", list(RECIPE_RUNS))
def test_recipe_augments_training_rows_only_and_records_it(recipe, tiny_model, tmp_path, monkeypatch):
    module, fp_name, methods, make_args = RECIPE_RUNS[recipe]
    plain = spy(monkeypatch, module, fp_name)
    module.main(make_args(tiny_model, tmp_path / "plain"))
    augmented = spy(monkeypatch, module, fp_name)
    results = module.main(
        make_args(tiny_model, tmp_path / "aug") + ["--augment", methods, "--augment_copies", "2"]
    )
    before, after = plain["splits"], augmented["splits"]
    for split in ("validation", "test"):
        assert rows_of(after[split]) == rows_of(before[split])
    assert held_out_fingerprint(after) == held_out_fingerprint(before)
    assert after["train"][: len(before["train"])] == before["train"]
    added = len(after["train"]) - len(before["train"])
    saved = json.loads((tmp_path / "aug" / "all_results.json").read_text())
    assert added > 0 and saved["augment_rows_added"] == results["augment_rows_added"] == added
    assert saved["augment_methods"] == methods and saved["augment_copies"] == 2
    assert "augment_rows_added" not in json.loads((tmp_path / "plain" / "all_results.json").read_text())
    assert yaml.safe_load((tmp_path / "aug" / "config.yaml").read_text())["augment"] == methods
