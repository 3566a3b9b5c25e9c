"""Defaults decided from the data: training length, LoRA's learning rate, long-text policy, baselines."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerControl

from ftkit.config import parse_args
from ftkit.models import ModelArguments
from ftkit.training import MIN_STEPS, EarlyStopping, decide_training, early_stopping, training_epochs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
import ner  # noqa: E402
import textcls  # noqa: E402


def parsed(argv, recipe=textcls):
    args, options = parse_args(recipe.ARGUMENTS, argv, defaults=recipe.DEFAULTS)
    model = next(a for a in args if isinstance(a, ModelArguments))
    return model, args[-1], options


def test_a_tiny_training_set_gets_the_step_minimum():
    epochs, why = training_epochs(rows=200, batch_size=16, epochs=2)
    assert epochs * 13 >= MIN_STEPS and epochs == 20 and "under the minimum" in why
    assert training_epochs(rows=20_000, batch_size=16, epochs=2)[0] == 2  # a large set keeps the default
    assert training_epochs(rows=10, batch_size=16, epochs=2)[0] == 20  # capped


def test_decide_training_changes_only_what_the_user_did_not_set():
    model, train, options = parsed([])
    out = decide_training(options, train, model, train_rows=300)
    steps_per_epoch = -(-300 // 16)
    assert out.num_train_epochs * steps_per_epoch >= MIN_STEPS and "num_train_epochs" in options.decided
    model, train, options = parsed(["--num_train_epochs", "1"])
    assert decide_training(options, train, model, train_rows=300).num_train_epochs == 1
    model, train, options = parsed(["--max_steps", "5"])
    assert decide_training(options, train, model, train_rows=300).num_train_epochs == 2


def test_lora_gets_its_learning_rate_unless_the_user_set_one():
    default_yaml = str(ROOT / "recipes" / "configs" / "textcls.yaml")
    model, train, options = parsed(["--config", default_yaml, "--use_lora", "true"])  # the README's example
    assert decide_training(options, train, model, 10_000).learning_rate == 5e-4
    assert options.decided["learning_rate"]["was"] == 1e-4
    model, train, options = parsed(["--use_lora", "true", "--learning_rate", "2e-4"])
    assert decide_training(options, train, model, 10_000).learning_rate == 2e-4
    model, train, options = parsed([])
    assert decide_training(options, train, model, 10_000).learning_rate == 1e-4


def test_ner_evaluates_keeps_the_best_model_and_saves_checkpoints_by_default():
    _, train, _ = parsed([], recipe=ner)
    assert train.eval_strategy == "epoch" and train.save_strategy == "epoch"
    assert train.load_best_model_at_end and train.metric_for_best_model == "f1"


def test_early_stopping_waits_only_when_ftkit_chose_the_length():
    assert early_stopping(2, parsed([])[2]).min_steps == MIN_STEPS
    assert early_stopping(2, parsed(["--num_train_epochs", "4"])[2]).min_steps == 0
    restored = EarlyStopping(**EarlyStopping(2, min_steps=7).state()["args"])  # as a resumed run rebuilds it
    assert restored.min_steps == 7 and restored.early_stopping_patience == 2


@pytest.mark.parametrize("step, stops", [(MIN_STEPS - 1, False), (MIN_STEPS, True)])
def test_early_stopping_waits_for_the_step_minimum(step, stops):
    stopper = EarlyStopping(early_stopping_patience=1)
    args = SimpleNamespace(metric_for_best_model="f1", greater_is_better=True, load_best_model_at_end=True)
    control = TrainerControl()
    state = SimpleNamespace(global_step=step, best_metric=0.0)
    stopper.on_evaluate(args, state, control, {"eval_f1": 0.0})  # no improvement: patience used up
    assert control.should_training_stop is stops


@pytest.mark.parametrize(
    "value, rows, kept_later",
    [
        (0.979, 213, True),  # BBC seed 42: 0.986 at epoch 1, 0.979 at epoch 3, one standard error 0.008
        (0.979, 5000, False),  # the same gap on a large validation set is real: the earlier best stays
        (0.986, 213, True),  # a tie goes to the later checkpoint
        (0.990, 213, False),  # a new best is Trainer's own business
    ],
)
def test_best_checkpoint_is_the_latest_within_one_standard_error(value, rows, kept_later):
    args = SimpleNamespace(
        metric_for_best_model="macro_f1", greater_is_better=True, save_strategy="epoch", save_steps=500
    )
    state = SimpleNamespace(global_step=321, best_metric=0.986, best_global_step=107)
    loader = SimpleNamespace(dataset=[None] * rows)
    assert EarlyStopping.prefer_later(args, state, {"eval_macro_f1": value}, loader) is kept_later
    assert state.best_global_step == (321 if kept_later else 107)


def test_an_evaluation_after_training_moves_no_checkpoint():
    stopper = EarlyStopping(early_stopping_patience=2, min_steps=0)
    args = SimpleNamespace(
        metric_for_best_model="f1", greater_is_better=True, load_best_model_at_end=True,
        save_strategy="epoch", save_steps=500,
    )  # fmt: skip
    state = SimpleNamespace(global_step=300, best_metric=0.9, best_global_step=200)
    loader = SimpleNamespace(dataset=[None] * 100)
    stopper.on_train_end(args, state, TrainerControl())
    stopper.on_evaluate(args, state, TrainerControl(), {"eval_f1": 0.9}, eval_dataloader=loader)
    assert state.best_global_step == 200  # the final validation pass of the loaded best model


def test_best_checkpoint_rule_leaves_losses_and_unsaved_steps_alone():
    loader = SimpleNamespace(dataset=[None] * 100)
    state = SimpleNamespace(global_step=30, best_metric=0.5, best_global_step=10)
    loss = SimpleNamespace(
        metric_for_best_model="rmse", greater_is_better=False, save_strategy="epoch", save_steps=1
    )
    assert not EarlyStopping.prefer_later(loss, state, {"eval_rmse": 0.5}, loader)
    unsaved = SimpleNamespace(
        metric_for_best_model="f1", greater_is_better=True, save_strategy="steps", save_steps=20
    )
    assert not EarlyStopping.prefer_later(unsaved, state, {"eval_f1": 0.5}, loader)  # step 30: no checkpoint
    assert state.best_global_step == 10


# ---------------------------------------------------------------------------------------------
# --long_text auto


def test_auto_long_text_picks_head_for_short_texts_and_more_for_long_ones():
    from ftkit.text import choose_long_text

    assert choose_long_text([40] * 100 + [200] * 3, 128)["long_text"] == "head"
    news = choose_long_text([400] * 100, 128)  # BBC-like: fits mostly in 256 tokens
    assert news["long_text"] == "head_tail" and news["max_length"] == 256
    reviews = choose_long_text([1500] * 100, 128)  # several windows per text
    assert reviews["long_text"] == "chunks" and reviews["max_length"] == 256 and reviews["max_chunks"] == 0
    assert choose_long_text([400] * 100, 128, may_grow=False)["max_length"] == 128  # the user's length stays
    capped = choose_long_text([5000] * 2000, 128)  # over the time budget: windows per text capped
    assert capped["max_chunks"] == 2  # 2000 texts x 2 windows x 256 tokens is already over the budget
    assert "windows per text" in capped["why"] and "min" in capped["why"]


def test_capped_chunks_spread_over_the_text():
    from ftkit.text import chunk_tokens

    ids = list(range(100))
    all_windows = chunk_tokens(ids, 10, 2)
    three = chunk_tokens(ids, 10, 2, max_chunks=3)
    assert len(three) == 3 and three[0] == all_windows[0] and three[-1] == all_windows[-1]


def test_auto_is_recorded_and_an_explicit_policy_wins(tiny_model):
    from transformers import AutoTokenizer

    from ftkit.text import decide_long_text

    tok = AutoTokenizer.from_pretrained(tiny_model)
    long_texts = [" ".join(["sports"] * 600)] * 4
    (_s, data, *_), options = parse_args(textcls.ARGUMENTS, [], defaults=textcls.DEFAULTS)
    out = decide_long_text(options, data, tok, long_texts)
    assert out.long_text == "chunks" and options.decided["long_text"]["why"].startswith("--long_text auto")
    (_s, data, *_), options = parse_args(
        textcls.ARGUMENTS, ["--long_text", "head"], defaults=textcls.DEFAULTS
    )
    assert decide_long_text(options, data, tok, long_texts).long_text == "head" and not options.decided


# ---------------------------------------------------------------------------------------------
# Baselines


def rows(pairs, name):
    return [{"text": t, "label": y, "origin": f"{name}:{i}"} for i, (t, y) in enumerate(pairs)]


def test_baseline_scores_the_same_rows_as_the_test_figures():
    from ftkit.baseline import baseline

    train = rows([("goal match team", "sports"), ("cpu chip code", "tech")] * 10, "train")
    test = rows([("goal team", "sports"), ("chip code", "tech")], "test")
    # Test labels flipped: a baseline scored on these rows gets everything wrong.
    flipped = [{**r, "label": "tech" if r["label"] == "sports" else "sports"} for r in test]
    splits = {"train": train, "validation": test, "test": flipped}
    out = baseline(splits, "text-classification", {"test_accuracy": 0.5})
    assert out["baseline_eval_accuracy"] == 1.0 and out["baseline_test_accuracy"] == 0.0
    assert out["baseline_test_rows"] == 2 and out["baseline_beaten"] and "baseline_warning" not in out
    out = baseline(splits | {"test": test}, "text-classification", {"test_accuracy": 0.5})
    assert not out["baseline_beaten"] and "does not beat the baseline" in out["baseline_warning"]


def test_ratings_and_ner_baselines():
    from ftkit.baseline import baseline, most_frequent_tags
    from ftkit.conll import Sentence

    train = [{"text": t, "label": y, "origin": "x"} for t, y in [("great", 4.0), ("awful", -4.0)] * 10]
    out = baseline({"train": train, "validation": train, "test": train}, "regression", {"test_rmse": 9.0})
    assert (
        out["baseline_test_pearson"] > 0.99
        and out["baseline_test_rmse"] < 1
        and out["baseline_beaten"] is False
    )

    def sent(tokens, tags):
        return Sentence(tokens=tokens, tags=tags)

    train = [sent(["John", "lives", "in", "Paris"], ["B-PER", "O", "O", "B-LOC"])] * 3
    test = [sent(["Paris", "John", "York"], ["B-LOC", "B-PER", "O"])]
    assert most_frequent_tags(train, test) == [["B-LOC", "B-PER", "O"]]
    out = baseline(
        {"train": train, "validation": test, "test": test}, "token-classification", {"test_f1": 0.5}
    )
    assert out["baseline_test_f1"] == 1.0 and out["baseline_warning"]


def test_seed_spread_summary():
    sys.path.insert(0, str(ROOT / "bench"))
    from seeds import summarize

    runs = [{"test_accuracy": 0.98, "test_runtime": 3.0, "baseline_test_accuracy": 0.9, "eval_accuracy": 1}]
    runs.append(
        {"test_accuracy": 0.96, "test_runtime": 4.0, "baseline_test_accuracy": 0.9, "eval_accuracy": 1}
    )
    out = summarize(runs)
    assert set(out) == {"test_accuracy", "baseline_test_accuracy"}
    assert out["test_accuracy"]["mean"] == pytest.approx(0.97) and out["test_accuracy"][
        "sd"
    ] == pytest.approx(0.01414, abs=1e-4)


def test_seed_runs_compare_prediction_by_prediction(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from seeds import agree, agreement, kept_predictions, sidecar

    def conll(name, tags):  # two sentences after a document marker, as the NER recipe writes them
        d = tmp_path / name
        d.mkdir()
        words = ["EU", "rejects", "it", "Peter", "Blackburn"]
        lines = ["-DOCSTART- O O", ""]
        for i, (w, t) in enumerate(zip(words, tags, strict=True)):
            lines += [f"{w} O {t}"] + ([""] if i in (2, 4) else [])
        (d / "test_predictions.conll").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return kept_predictions(d)

    a = conll("a", ["B-ORG", "O", "O", "B-PER", "I-PER"])
    b = conll("b", ["B-ORG", "O", "O", "B-PER", "O"])
    assert a == {"sentences": [["B-ORG", "O", "O"], ["B-PER", "I-PER"]]}
    rows = tmp_path / "c"
    rows.mkdir()
    lines = [{"gold": "pos", "text": "fine", "label": "pos", "p_pos": 0.9}, {"gold": "neg", "label": "pos"}]
    (rows / "test_predictions.jsonl").write_text("\n".join(map(json.dumps, lines)), encoding="utf-8")
    assert kept_predictions(rows) == {"rows": ["pos", "pos"]}
    assert agreement({"rows": [1.0, 2.5]}, {"rows": [1.5, 2.5]}) == {"mean_abs_diff": 0.25}
    for name, preds in (("a", a), ("b", b)):
        sidecar(tmp_path / f"{name}.json").write_bytes(gzip.compress(json.dumps({"42": preds}).encode()))
    out = agree(str(tmp_path / "a.json"), str(tmp_path / "b.json"))
    assert out == {"42": {"sentences": 0.5, "words": 0.8}}


def test_the_split_has_its_own_seed(fixtures):
    from ftkit.data import load_text_splits

    def split(*argv):
        train = ["--train_file", str(fixtures / "textcls" / "train.csv")]
        (source, *_), _ = parse_args(textcls.ARGUMENTS, [*train, *argv], defaults=textcls.DEFAULTS)
        splits, _ = load_text_splits(**vars(source))
        return [r["origin"] for r in splits["test"]]

    assert split("--seed", "1") == split("--seed", "2")
    assert split("--split_seed", "1") != split("--split_seed", "2")
