"""A used run directory: refused unless resumed or overwritten; never two runs' files in one folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from peft import PeftModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
import textcls  # noqa: E402

from ftkit import DataError  # noqa: E402
from ftkit.predict import load_run  # noqa: E402
from ftkit.run import make_run_dir  # noqa: E402


def quick(tiny_model: str, fixtures: Path, out: Path, *extra: str) -> list[str]:
    data = fixtures / "textcls"
    return [
        "--model_name_or_path", tiny_model, "--train_file", str(data / "train.csv"), "--output_dir", str(out),
        "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--disable_tqdm", "true", *extra,
    ]  # fmt: skip


def test_a_used_output_dir_is_refused_and_overwrite_leaves_only_the_new_run(tiny_model, fixtures, tmp_path):
    out = tmp_path / "run"
    out.mkdir()  # an existing empty folder counts as unused
    textcls.main(quick(tiny_model, fixtures, out))
    assert (out / "model.safetensors").is_file()
    with pytest.raises(DataError, match="not empty.*--resume auto.*--overwrite"):
        textcls.main(quick(tiny_model, fixtures, out, "--use_lora", "true"))
    (out / "predictions-old.jsonl").write_text("{}\n")  # `ftkit predict` output of the first run
    textcls.main(quick(tiny_model, fixtures, out, "--use_lora", "true", "--overwrite", "true"))
    # Only the LoRA run remains: the first run's full model would otherwise be what load_run serves.
    assert not (out / "model.safetensors").exists() and not (out / "predictions-old.jsonl").exists()
    model, _, info = load_run(out)
    assert isinstance(model, PeftModel) and info["lora"] is True


def test_overwrite_refuses_a_folder_that_is_not_a_run_directory(tiny_model, fixtures, tmp_path):
    (tmp_path / "notes.md").write_text("mine")
    with pytest.raises(DataError, match="only an ftkit run directory"):
        textcls.main(quick(tiny_model, fixtures, tmp_path, "--overwrite", "true"))
    assert (tmp_path / "notes.md").read_text() == "mine"


def test_default_run_directories_of_one_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.time", lambda: 1_800_000_000.25)  # two processes started at the same instant
    first = make_run_dir("textcls", None)
    monkeypatch.setattr("os.getpid", lambda: 1)
    second = make_run_dir("textcls", None)
    assert first != second and first.parent == second.parent == Path("runs") / "textcls"
