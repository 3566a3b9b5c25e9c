"""A run directory from someone else: loading it never runs its code, never prompts, never unpickles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ftkit import DataError
from ftkit.cli import main as ftkit_main
from ftkit.compress import load_compressed
from ftkit.predict import load_run


def fake_run(tiny_model: str, path: Path) -> Path:
    """The tiny model as a text-classification run directory (a fresh head: enough to load)."""
    shutil.copytree(tiny_model, path)
    info = {"format_version": 1, "task": "text-classification", "labels": ["a", "b"], "max_length": 16}
    (path / "ftkit_run.json").write_text(json.dumps(info))
    return path


def test_a_config_naming_python_files_is_refused_without_a_prompt(tiny_model, tmp_path, monkeypatch):
    run = fake_run(tiny_model, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"})
    (run / "config.json").write_text(json.dumps(config))
    (run / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    asked = []
    monkeypatch.setattr("builtins.input", lambda *a: asked.append(a) or "y")  # a user who says yes
    for load in (load_run, load_compressed):
        with pytest.raises(DataError, match="without running code"):
            load(run)
    (run / "compress.json").write_text(json.dumps({"format": "onnx", "file": "model.onnx"}))
    txt = tmp_path / "in.txt"
    txt.write_text("hello\n")
    assert ftkit_main(["predict", str(run), "--input", str(txt)]) == 2
    assert not asked and not (tmp_path / "ran").exists()


def test_compress_record_cannot_point_outside_the_run(tiny_model, tmp_path):
    run = fake_run(tiny_model, tmp_path / "run")
    (tmp_path / "elsewhere.onnx").write_bytes(b"x")
    for name in ("../elsewhere.onnx", str(tmp_path / "elsewhere.onnx"), "missing.onnx", None):
        (run / "compress.json").write_text(json.dumps({"format": "onnx", "file": name}))
        with pytest.raises(DataError, match="not a file inside"):
            load_compressed(run)


def test_pickled_weights_are_refused_plainly(tiny_model, tmp_path):
    run = fake_run(tiny_model, tmp_path / "run")
    (run / "model.safetensors").unlink()
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    torch.save({}, run / "adapter" / "adapter_model.bin")
    with pytest.raises(DataError, match="adapter_model.bin: pickled weights are not loaded"):
        load_run(run)
