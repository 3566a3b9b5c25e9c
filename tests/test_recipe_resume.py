"""Kill a recipe (SIGKILL) mid-epoch, mid-save or inside the completion marker write, resume with
`--resume auto`: the final weights, the training log and the early-stopping point equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftkit.reliability import MARKER_TMP

DRIVER = str(Path(__file__).with_name("recipe_kill.py"))
FIXTURES = Path(__file__).parent / "fixtures" / "textcls"
# 42 rows, batch 8: 6 steps per epoch. Macro-F1 never improves after epoch 1 on this data, so patience 2
# stops the run after epoch 3 (step 18) of 8; a resume that forgot the patience counter trains on.
LOG_KEYS = ("step", "epoch", "loss", "grad_norm", "learning_rate", "eval_loss", "eval_macro_f1")


def run(
    tiny_model: str, out: Path, where: str, *extra: str, ranks: int = 1, recipe: str = "textcls"
) -> subprocess.CompletedProcess:
    args = [
        "--model_name_or_path", tiny_model, "--output_dir", str(out), "--logging_steps", "1",
        "--per_device_train_batch_size", str(8 // ranks), "--disable_tqdm", "true",
        # auto times oneDNN against torch in each process: under load two processes can choose differently,
        # and the two fp32 paths differ in the last bits.
        "--linear_backend", "torch",
    ]  # fmt: skip
    if recipe == "textcls":
        args += [
            "--train_file", str(FIXTURES / "train.csv"), "--validation_file", str(FIXTURES / "validation.csv"),
            "--test_file", str(FIXTURES / "test.csv"), "--num_train_epochs", "8", "--learning_rate", "1e-3",
            "--early_stopping_patience", "2",
        ]  # fmt: skip
    else:  # ner: checkpoints (and evaluations) every 4 steps over 12 instead of every epoch
        ner = FIXTURES.parent / "ner"
        args += [
            "--train_file", str(ner / "train.conll"), "--validation_file", str(ner / "valid.conll"),
            "--test_file", str(ner / "test.conll"), "--max_length", "32", "--stride", "8",
            "--learning_rate", "5e-3", "--max_steps", "12", "--save_strategy", "steps", "--save_steps", "4",
            "--eval_strategy", "steps", "--eval_steps", "4",  # keeping the best model needs them to match
        ]  # fmt: skip
    args += extra
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [*launcher, DRIVER, recipe, where, *args], capture_output=True, text=True, timeout=900, env=env
    )


def training_log(out: Path) -> list[dict]:
    last = max((out / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((last / "trainer_state.json").read_text())["log_history"]
    return [{k: h[k] for k in LOG_KEYS if k in h} for h in history]


def assert_same_run(reference: Path, out: Path, last_epoch: float | None = 3) -> None:
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights differ"
    assert training_log(out) == training_log(reference)
    if last_epoch is not None:
        assert training_log(out)[-1]["epoch"] == last_epoch  # early stopping stopped both at the same point


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = run(tiny_model, out, "none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def kill_and_resume(
    tiny_model: str, out: Path, where: str, ranks: int = 1, recipe: str = "textcls", resumes_from: int = 12
) -> None:
    killed = run(tiny_model, out, where, ranks=ranks, recipe=recipe)
    assert killed.returncode != 0, killed.stderr[-3000:]
    if ranks == 1:  # torchrun reports a killed rank with a traceback of its own and status 1
        assert killed.returncode == -signal.SIGKILL and "Traceback" not in killed.stderr, killed.stderr[
            -3000:
        ]
    resumed = run(tiny_model, out, "none", "--resume", "auto", ranks=ranks, recipe=recipe)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {out / 'checkpoints' / f'checkpoint-{resumes_from}'}" in resumed.stderr


@pytest.mark.slow  # multi-process or kill/resume run: make test-slow keeps make test under 5 minutes
def test_killed_inside_the_marker_write_then_resumed_equals_the_uninterrupted_run(
    reference, tiny_model, tmp_path
):
    out = tmp_path / "run"
    kill_and_resume(tiny_model, out, "marker:18")  # checkpoint-12 holds the patience counter at 1
    assert not (out / "checkpoints" / "checkpoint-18" / MARKER_TMP).exists()
    assert_same_run(reference, out)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["step:15", "save:18"])
def test_killed_mid_epoch_or_mid_save_then_resumed_equals_the_uninterrupted_run(
    reference, tiny_model, tmp_path, where
):
    kill_and_resume(tiny_model, tmp_path / "run", where)
    assert_same_run(reference, tmp_path / "run")


@pytest.mark.slow
def test_two_rank_recipe_killed_mid_epoch_then_resumed_equals_the_uninterrupted_run(tiny_model, tmp_path):
    reference = tmp_path / "reference"
    proc = run(tiny_model, reference, "none", ranks=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kill_and_resume(tiny_model, tmp_path / "run", "step:15", ranks=2)
    assert_same_run(reference, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["step:10", "save:8", "marker:8"])
def test_ner_recipe_killed_then_resumed_equals_the_uninterrupted_run(tiny_model, tmp_path, where):
    reference = tmp_path / "reference"
    proc = run(tiny_model, reference, "none", recipe="ner")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumes_from = 8 if where == "step:10" else 4
    kill_and_resume(tiny_model, tmp_path / "run", where, recipe="ner", resumes_from=resumes_from)
    assert_same_run(reference, tmp_path / "run", last_epoch=None)
