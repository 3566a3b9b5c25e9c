"""The recipes keep one shape: short enough to read, shared blocks identical, run files with stable keys."""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("textcls", "sentiment", "ratings", "ner")
# Recipes newer than the run-file key snapshot below: same shape and shared blocks, their own keys.
ALL_RECIPES = (*RECIPES, "multitask")
sys.path.insert(0, str(ROOT / "recipes"))

# Which shared blocks each recipe must carry. A block is the text between `# [shared: NAME]` and
# `# [end shared]`; every copy of a block must be identical (accelerate's examples are kept the same way).
EXPECTED_BLOCKS = {
    "start": ALL_RECIPES,
    "model": ALL_RECIPES,
    "train": ALL_RECIPES,
    "main-guard": ALL_RECIPES,
    "classification-callbacks": ("textcls", "sentiment", "ratings"),
}
_BLOCK = re.compile(r"^[ \t]*# \[shared: ([\w-]+)\]\n(.*?)^[ \t]*# \[end shared\]", re.M | re.S)


def shared_blocks(source: str) -> dict[str, str]:
    """Name -> text of each shared block of one recipe's source."""
    return {m.group(1): m.group(2) for m in _BLOCK.finditer(source)}


def block_problems(sources: dict[str, str]) -> list[str]:
    """Missing blocks, and blocks whose copies differ, as one message each (empty: all in order)."""
    blocks = {name: shared_blocks(src) for name, src in sources.items()}
    problems = []
    for block, owners in EXPECTED_BLOCKS.items():
        copies = {r: blocks[r].get(block) for r in owners if r in blocks}
        problems += [f"{r}: no shared block {block!r}" for r, text in copies.items() if text is None]
        texts = {text for text in copies.values() if text is not None}
        if len(texts) > 1:
            problems.append(f"shared block {block!r} differs between {', '.join(sorted(copies))}")
    return problems


def read_sources() -> dict[str, str]:
    return {r: (ROOT / "recipes" / f"{r}.py").read_text(encoding="utf-8") for r in ALL_RECIPES}


def test_shared_blocks_are_identical_in_every_recipe():
    assert block_problems(read_sources()) == []


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_editing_a_shared_block_in_one_recipe_fails_the_check(recipe):
    sources = read_sources()
    block = shared_blocks(sources[recipe])["train"]
    sources[recipe] = sources[recipe].replace(block, block.replace("results = ", "results  = ", 1))
    assert block_problems(sources) == [
        f"shared block 'train' differs between {', '.join(sorted(ALL_RECIPES))}"
    ]
    sources = read_sources()
    sources[recipe] = sources[recipe].replace("# [shared: model]", "# model")
    assert f"{recipe}: no shared block 'model'" in block_problems(sources)


@pytest.mark.parametrize("recipe", ALL_RECIPES)
def test_recipe_reads_in_a_few_minutes(recipe):
    source = (ROOT / "recipes" / f"{recipe}.py").read_text(encoding="utf-8")
    main = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert len(source.splitlines()) <= 300
    assert main.end_lineno - main.lineno + 1 <= 130


# all_results.json and ftkit_run.json keys as the recipes wrote them before the skeleton change (tiny
# model, the fixtures below, one epoch). They keep their names; new keys may be added.
OLD_RESULT_KEYS = {
    "textcls": """train_runtime train_samples_per_second train_steps_per_second train_loss epoch
        train_real_tokens_per_second train_pad_share eval_loss eval_accuracy eval_macro_f1 eval_weighted_f1
        eval_runtime eval_samples_per_second eval_steps_per_second test_loss test_accuracy test_macro_f1
        test_weighted_f1 test_runtime test_samples_per_second test_steps_per_second train_truncated
        validation_truncated test_truncated data_source data_train_rows data_validation_rows data_test_rows
        data_duplicates_removed data_duplicate_label_conflicts data_train_test_overlap
        data_decoded_with_fallback added_labels""",
    "sentiment": """train_runtime train_samples_per_second train_steps_per_second train_loss epoch
        train_real_tokens_per_second train_pad_share eval_loss eval_accuracy eval_macro_f1 eval_weighted_f1
        eval_roc_auc eval_ece eval_nll eval_runtime eval_samples_per_second eval_steps_per_second test_loss
        test_accuracy test_macro_f1 test_weighted_f1 test_roc_auc test_ece test_nll test_runtime
        test_samples_per_second test_steps_per_second calibration_temperature eval_ece_uncalibrated
        test_ece_uncalibrated train_truncated test_truncated validation_truncated data_source data_train_rows
        data_test_rows data_validation_rows data_duplicates_removed data_duplicate_label_conflicts
        data_train_test_overlap data_decoded_with_fallback data_split_made added_labels""",
    "ratings": """train_runtime train_samples_per_second train_steps_per_second train_loss epoch
        train_real_tokens_per_second train_pad_share eval_loss eval_mae eval_rmse eval_pearson eval_spearman
        eval_runtime eval_samples_per_second eval_steps_per_second test_loss test_mae test_rmse test_pearson
        test_spearman test_runtime test_samples_per_second test_steps_per_second train_truncated
        test_truncated validation_truncated data_source data_train_rows data_test_rows data_validation_rows
        data_duplicates_removed data_duplicate_label_conflicts data_train_test_overlap
        data_decoded_with_fallback data_split_made added_labels""",
    "ner": """train_runtime train_samples_per_second train_steps_per_second train_loss epoch
        train_real_tokens_per_second train_pad_share eval_loss eval_precision eval_recall eval_f1
        eval_LOC_precision eval_LOC_recall eval_LOC_f1 eval_LOC_support eval_MISC_precision eval_MISC_recall
        eval_MISC_f1 eval_MISC_support eval_ORG_precision eval_ORG_recall eval_ORG_f1 eval_ORG_support
        eval_PER_precision eval_PER_recall eval_PER_f1 eval_PER_support eval_accuracy eval_invalid_sequences
        eval_words eval_argmax_f1 eval_argmax_invalid_sequences eval_runtime eval_samples_per_second
        eval_steps_per_second test_loss test_precision test_recall test_f1 test_LOC_precision test_LOC_recall
        test_LOC_f1 test_LOC_support test_MISC_precision test_MISC_recall test_MISC_f1 test_MISC_support
        test_ORG_precision test_ORG_recall test_ORG_f1 test_ORG_support test_PER_precision test_PER_recall
        test_PER_f1 test_PER_support test_accuracy test_invalid_sequences test_words test_argmax_f1
        test_argmax_invalid_sequences test_runtime test_samples_per_second test_steps_per_second
        train_windowed_sentences validation_windowed_sentences test_windowed_sentences data_source
        data_train_sentences data_validation_sentences data_test_sentences""",
}
OLD_RUN_KEYS = {
    "textcls": "task base_model lora merged max_length long_text labels",
    "sentiment": "task base_model lora merged max_length long_text stride labels temperature",
    "ratings": "task base_model lora merged max_length long_text stride labels temperature",
    "ner": "task base_model lora merged max_length long_text stride context decode case_feature labels",
}


def recipe_argv(recipe: str, tiny_model: str, fixtures: Path, out: Path) -> list[str]:
    common = ["--model_name_or_path", tiny_model, "--num_train_epochs", "1", "--disable_tqdm", "true"]
    common += ["--per_device_train_batch_size", "8", "--output_dir", str(out)]
    if recipe == "textcls":
        names = ("train_file", "validation_file", "test_file")
        files = [x for n, f in zip(names, ("train", "validation", "test"), strict=True) for x in
                 (f"--{n}", str(fixtures / "textcls" / f"{f}.csv"))]  # fmt: skip
        return common + files
    if recipe == "ner":
        names = ("train_file", "validation_file", "test_file")
        files = [x for n, f in zip(names, ("train", "valid", "test"), strict=True) for x in
                 (f"--{n}", str(fixtures / "ner" / f"{f}.conll"))]  # fmt: skip
        return common + files + ["--max_length", "64"]
    data = "polarity.csv" if recipe == "sentiment" else "ratings.csv"
    return common + ["--train_file", str(fixtures / "sentiment" / data)]


@pytest.mark.parametrize("recipe", RECIPES)
def test_run_files_keep_their_keys_and_a_format_version(recipe, tiny_model, fixtures, tmp_path):
    import importlib

    from ftkit.run import FORMAT_VERSION

    out = tmp_path / recipe
    importlib.import_module(recipe).main(recipe_argv(recipe, tiny_model, fixtures, out))
    results = json.loads((out / "all_results.json").read_text())
    assert set(OLD_RESULT_KEYS[recipe].split()) <= set(results)
    info = json.loads((out / "ftkit_run.json").read_text())
    old = ["format_version", *OLD_RUN_KEYS[recipe].split()]
    assert [k for k in info if k in old] == old  # old keys keep their names and order; new ones may follow
    assert info["format_version"] == FORMAT_VERSION
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["set_by_user"]["num_train_epochs"] == {"value": 1.0, "origin": "cli"}
    assert manifest["options"]["decided"]["output_dir"]["value"] == str(out / "checkpoints")


def test_predict_refuses_a_run_of_a_newer_format(tmp_path):
    from ftkit import DataError
    from ftkit.run import FORMAT_VERSION, read_run_info

    (tmp_path / "ftkit_run.json").write_text(json.dumps({"format_version": FORMAT_VERSION + 1, "task": "x"}))
    with pytest.raises(DataError, match="newer ftkit"):
        read_run_info(tmp_path)
    (tmp_path / "ftkit_run.json").write_text(json.dumps({"task": "text-classification", "labels": []}))
    assert read_run_info(tmp_path)["task"] == "text-classification"  # older runs: format 1
