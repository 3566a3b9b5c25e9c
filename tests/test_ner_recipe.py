"""The NER recipe end to end on the tiny model: run directory, word-level metrics, LoRA, 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForTokenClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
import ner  # noqa: E402

from ftkit import DataError  # noqa: E402
from ftkit.conll import read_conll  # noqa: E402
from ftkit.ner import decode_tags, encode_sentences, entity_metrics, predict_entities, predict_word_logits  # noqa: E402
from ftkit.predict import load_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "fixtures" / "ner"


def recipe_args(tiny_model: str, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", tiny_model,
        "--train_file", str(DATA / "train.conll"),
        "--validation_file", str(DATA / "valid.conll"),
        "--test_file", str(DATA / "test.conll"),
        "--output_dir", str(out),
        "--max_length", "32",  # the long fixture sentences need several windows
        "--stride", "8",
        "--num_train_epochs", "8",
        "--learning_rate", "5e-3",
        "--per_device_train_batch_size", "8",
        "--logging_steps", "5",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def n_words(split: str) -> int:
    return sum(len(s.tokens) for s in read_conll(DATA / f"{split}.conll"))


@pytest.fixture(scope="module")
def full_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ner") / "full"
    return out, ner.main(recipe_args(tiny_model, out))


def test_run_directory_and_word_level_results(full_run):
    out, results = full_run
    for name in (
        "model.safetensors", "config.json", "tokenizer.json", "ftkit_run.json", "all_results.json",
        "test_report.txt", "test_predictions.jsonl", "test_predictions.conll", "training_curves.png",
        "README.md", "config.yaml", "manifest.json",
    ):  # fmt: skip
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["test_f1"] == results["test_f1"] and saved["eval_f1"] == results["eval_f1"]
    # Every word of validation and test was scored exactly once, long sentences included.
    assert saved["eval_words"] == n_words("valid") and saved["test_words"] == n_words("test")
    assert saved["train_windowed_sentences"] == 1 and saved["test_windowed_sentences"] == 1
    assert saved["train_real_tokens_per_second"] > 0 and 0 <= saved["train_pad_share"] < 1
    assert saved["test_invalid_sequences"] == 0  # Viterbi decoding allows no I- after O
    for key in (
        "eval_f1",
        "test_f1",
        "test_argmax_f1",
        "test_precision",
        "test_recall",
        "test_PER_f1",
        "test_accuracy",
    ):
        assert 0 <= saved[key] <= 1, key
    # The fixture's recurring names are learnable: a model that learned nothing scores 0.
    assert saved["test_f1"] > 0.5, saved["test_f1"]
    info = json.loads((out / "ftkit_run.json").read_text())
    assert info["task"] == "token-classification" and info["context"] == "document" and info["stride"] == 8
    assert info["case_feature"] is True  # auto: the tiny tokenizer lowercases, as MiniLM's does
    config = (out / "config.yaml").read_text()
    assert "case_feature: 'on'" in config and "use_cpu" not in config
    assert info["labels"] == ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    assert "test_f1" in (out / "README.md").read_text()


def test_predictions_file_gives_the_reported_metrics(full_run):
    out, results = full_run
    rows = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    sentences = read_conll(DATA / "test.conll")
    assert [r["tokens"] for r in rows] == [s.tokens for s in sentences]
    assert all(len(r["pred"]) == len(r["tokens"]) for r in rows)
    assert rows[0]["origin"].endswith("test.conll:3")
    again = entity_metrics([r["gold"] for r in rows], [r["pred"] for r in rows])
    assert again["f1"] == pytest.approx(results["test_f1"])
    # word gold pred lines (conlleval's input); raw predictions may be invalid IOB2, so read them as text.
    lines = [x.split() for x in (out / "test_predictions.conll").read_text().splitlines()]
    assert [x[2] for x in lines if x and x[0] != "-DOCSTART-"] == [t for r in rows for t in r["pred"]]


def test_training_changed_the_encoder(full_run, tiny_model):
    out, _ = full_run
    before = load_file(Path(tiny_model) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(before[key], after["bert." + key])
    model = AutoModelForTokenClassification.from_pretrained(out)
    assert model.config.id2label[7] == "B-PER" and model.config.num_labels == 9
    # The case types started as copies of type 0 and learned something of their own.
    types = after["bert.embeddings.token_type_embeddings.weight"]
    assert types.shape[0] == model.config.type_vocab_size == 4
    assert all(not torch.allclose(types[k], types[0]) for k in (1, 2))


def test_predict_entities_on_raw_text(full_run):
    out, _ = full_run
    model, tok, info = load_run(out)
    texts = ["Anna Berg works for Acme Corp in Berlin .", "Police in Tokyo said Ken Mori was arrested ."]
    rows = predict_entities(model, tok, texts, ["a:1", "a:2"], info)
    assert [r["origin"] for r in rows] == ["a:1", "a:2"]
    found = [e for r in rows for e in r["entities"]]
    assert found, "the trained model finds entities in sentences like its training data"
    for r in rows:
        assert all(r["text"][e["start"] : e["end"]] == e["text"] for e in r["entities"])
    # The tags behind predict equal the recipe's own test predictions (same windows, same model).
    first = json.loads((out / "test_predictions.jsonl").read_text().splitlines()[0])
    logits = predict_word_logits(
        model, tok, [first["tokens"]], info["max_length"], info["stride"], case_feature=info["case_feature"]
    )
    assert decode_tags(logits[0], info["labels"], info["decode"]) == first["pred"]
    # Without the word shapes the same model sees other inputs: the case feature is really used.
    blind = predict_word_logits(model, tok, [first["tokens"]], info["max_length"], info["stride"])
    assert not np.allclose(blind[0], logits[0])


def test_lora_sentence_context_reloads_identically(tiny_model, tmp_path):
    out = tmp_path / "lora"
    extra = (
        "--use_lora",
        "--lora_r",
        "4",
        "--merge_lora",
        "--context",
        "sentence",
        "--num_train_epochs",
        "2",
    )
    results = ner.main(recipe_args(tiny_model, out, *extra))
    assert results["eval_words"] == n_words("valid")
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in adapter) and any("classifier" in k for k in adapter)
    assert not any(k.endswith("query.base_layer.weight") for k in adapter), "base weights stay out"
    assert any("token_type_embeddings" in k for k in adapter), "the case types train with the adapter"
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "lora_B starts at 0"
    base = load_file(Path(tiny_model) / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    assert torch.equal(
        base["embeddings.word_embeddings.weight"], merged["bert.embeddings.word_embeddings.weight"]
    )

    (out / "model.safetensors").rename(out / "merged.bak")
    adapter_model, tok, info = load_run(out)  # base + adapter
    (out / "merged.bak").rename(out / "model.safetensors")
    merged_model, _, _ = load_run(out)
    words = [["Anna", "Berg", "visited", "Tokyo", "."], ["Reuters", "said", "so"]]
    a = predict_word_logits(adapter_model, tok, words, info["max_length"], info["stride"], case_feature=True)
    m = predict_word_logits(merged_model, tok, words, info["max_length"], info["stride"], case_feature=True)
    for x, y in zip(a, m, strict=True):
        torch.testing.assert_close(torch.from_numpy(x), torch.from_numpy(y), atol=1e-5, rtol=0)
    rows = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    again = predict_word_logits(
        adapter_model, tok, [r["tokens"] for r in rows], info["max_length"], info["stride"], case_feature=True
    )
    assert [decode_tags(x, info["labels"], info["decode"]) for x in again] == [r["pred"] for r in rows]


def test_bad_training_file_names_file_and_line(tiny_model, tmp_path):
    bad = tmp_path / "bad.conll"
    bad.write_text("EU NNP B-ORG\nrejects VBZ\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.conll:2: found 2 columns, expected 3"):
        ner.main(recipe_args(tiny_model, tmp_path / "out", "--train_file", str(bad)))


def test_ftkit_predict_cli_writes_entities(full_run, tmp_path):
    from ftkit.cli import main as cli

    out, _ = full_run
    texts = tmp_path / "texts.txt"
    texts.write_text(
        "Anna Berg works for Acme Corp in Berlin.\n\nReuters said Tokyo beat Paris 2-1.\n", encoding="utf-8"
    )
    assert cli(["predict", str(out), "--input", str(texts), "--output", str(tmp_path / "pred.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [r["origin"] for r in rows] == [f"{texts}:1", f"{texts}:3"]
    assert any(r["entities"] for r in rows)
    assert all(r["text"][e["start"] : e["end"]] == e["text"] for r in rows for e in r["entities"])


@pytest.mark.slow  # multi-process or kill/resume run: make test-slow keeps make test under 5 minutes
def test_two_processes_train_one_model_and_eval_sees_every_word_once(tiny_model, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate CLI not installed"
    out = tmp_path / "ddp"
    # Odd row counts in validation and test: the second rank gets a padded duplicate to drop. The tiny
    # vocabulary follows the fixtures, so look for a stride that gives them.
    tok = AutoTokenizer.from_pretrained(tiny_model)
    sentences = [read_conll(DATA / f"{split}.conll") for split in ("valid", "test")]
    stride = next(
        s
        for s in range(4, 16)
        if all(len(encode_sentences(tok, x, 32, s, "document").windows) % 2 for x in sentences)
    )
    args = recipe_args(tiny_model, out, "--stride", str(stride), "--max_steps", "4")
    args += ["--save_strategy", "steps", "--save_steps", "4", "--eval_strategy", "steps", "--eval_steps", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += [
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(ROOT / "tests" / "ner_two_ranks.py"),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = out / "checkpoints" / "checkpoint-4"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()
    # Both ranks trained one DDP model: same weights at the end (unsynced ranks would differ).
    ranks = [json.loads((out / "checkpoints" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert (
        ranks[0]["world_size"] == ranks[1]["world_size"] == 2 and ranks[0]["ddp"] == "DistributedDataParallel"
    )
    assert ranks[0]["weights"] == ranks[1]["weights"]
    results = json.loads((out / "all_results.json").read_text())
    # Padding duplicates are dropped: every validation and test word is scored exactly once.
    assert results["eval_words"] == n_words("valid") and results["test_words"] == n_words("test")
    rows = (out / "test_predictions.jsonl").read_text().splitlines()
    assert len(rows) == len(read_conll(DATA / "test.conll"))


def test_case_feature_off_keeps_the_pretrained_token_types(tiny_model, tmp_path):
    out = tmp_path / "off"
    ner.main(recipe_args(tiny_model, out, "--case_feature", "off", "--max_steps", "2"))
    assert json.loads((out / "ftkit_run.json").read_text())["case_feature"] is False
    assert AutoModelForTokenClassification.from_pretrained(out).config.type_vocab_size == 2


def test_seed_fixes_the_new_head(tiny_model, tmp_path):
    # learning_rate 0: the saved weights are the initial ones, so only the seeding is compared.
    def head(name: str, seed: str) -> torch.Tensor:
        out = tmp_path / name
        ner.main(recipe_args(tiny_model, out, "--seed", seed, "--max_steps", "1", "--learning_rate", "0"))
        return load_file(out / "model.safetensors")["classifier.weight"]

    first, again, other = head("a", "42"), head("b", "42"), head("c", "7")
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
