"""Crash-safe checkpoints, exact resume, NaN/Inf guard, determinism, disk bound, distributed eval.

Processes that get SIGKILLed run tests/reliability_train.py as a real subprocess; the runs that finish
normally run the same code in-process (much cheaper than importing transformers again).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import random
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from reliability_train import build_trainer, evaluate_sizes
from reliability_train import main as train_main
from safetensors.torch import load_file
from transformers import TrainerCallback
from transformers.trainer_pt_utils import safe_globals

from ftkit import DataError
from ftkit.metrics import exact_eval_loss
from ftkit.reliability import (
    MARKER,
    MARKER_TMP,
    CrashSafeCheckpoints,
    NonFiniteError,
    NonFiniteGuard,
    incomplete_reason,
    list_checkpoints,
    mark_complete,
    prune_checkpoints,
    resolve_resume,
    resume_checkpoint,
)

SCRIPT = str(Path(__file__).with_name("reliability_train.py"))
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "textcls.py"
TOTAL_STEPS = 24  # 48 rows / 4 per step * 2 epochs


def run_script(*args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return subprocess.run([*launcher, SCRIPT, *args], capture_output=True, text=True, timeout=600)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def losses(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "result.json").read_text())["losses"]


def assert_same_run(a: Path, b: Path, context: str) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{context}: weights differ in {different[:3]}"
    assert losses(a) == losses(b), context
    assert len(losses(a)) == TOTAL_STEPS


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Like the subprocesses (reliability_train.py): one thread is 10x faster for the tiny model here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    """An uninterrupted run, seed 0."""
    out = tmp_path_factory.mktemp("reference")
    assert train_main(["--model", tiny_model, "--output_dir", str(out)]) == 0
    return out


# ---- resolve_resume / mark_complete / prune_checkpoints ---------------------------------------------------


def fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"x" * step)
    (ckpt / "trainer_state.json").write_text("{}")
    if complete:
        mark_complete(ckpt)
    return ckpt


@pytest.mark.parametrize("make", [False, True], ids=["missing", "empty"])
def test_resume_without_checkpoint_starts_fresh(tmp_path, caplog, make):
    out = tmp_path / "checkpoints"
    if make:
        out.mkdir()
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(out) is None
    assert "starting fresh" in caplog.text


def test_resume_skips_partial_and_damaged_checkpoints(tmp_path, caplog):
    good = fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20, complete=False)  # killed before the marker
    truncated = fake_checkpoint(tmp_path, 30)
    (truncated / "model.safetensors").write_bytes(b"x")
    (tmp_path / "checkpoint-40").mkdir()  # killed right after mkdir
    with caplog.at_level(logging.WARNING):
        assert resolve_resume(tmp_path) == str(good)
    assert "checkpoint-40: no ftkit_complete.json" in caplog.text
    assert "checkpoint-30: model.safetensors has 1 bytes, the marker says 30" in caplog.text
    assert "checkpoint-20: no ftkit_complete.json" in caplog.text
    files = json.loads((good / MARKER).read_text())["files"]
    assert {k: v["size"] for k, v in files.items()} == {"model.safetensors": 10, "trainer_state.json": 2}
    assert files["trainer_state.json"]["sha256"] == hashlib.sha256(b"{}").hexdigest()


def test_a_kill_inside_the_marker_write_does_not_spoil_the_next_marker(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 10, complete=False)
    (ckpt / MARKER_TMP).write_text('{"step": 1')  # killed halfway through writing the marker
    mark_complete(ckpt)  # the same folder saved again after a resume
    assert MARKER_TMP not in json.loads((ckpt / MARKER).read_text())["files"]
    assert incomplete_reason(ckpt) is None and not (ckpt / MARKER_TMP).exists()


def test_checksums_catch_a_changed_file_of_the_same_size(tmp_path, monkeypatch):
    ckpt = fake_checkpoint(tmp_path, 10)
    (ckpt / "model.safetensors").write_bytes(b"y" * 10)
    assert "does not match its checksum" in incomplete_reason(ckpt)
    assert incomplete_reason(ckpt, checksums=False) is None  # pruning checks sizes only
    monkeypatch.setattr("ftkit.reliability.HASH_WHOLE", 4)  # big files: their first and last bytes
    monkeypatch.setattr("ftkit.reliability.HASH_END", 2)
    mark_complete(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"yyyyyyyyyz")
    assert "does not match its checksum" in incomplete_reason(ckpt)
    (ckpt / MARKER).write_text(json.dumps({"step": 10, "files": {"model.safetensors": 10}}))
    assert incomplete_reason(ckpt) is None  # a marker of sizes only (older ftkit) still reads


def test_explicit_resume_path_must_be_complete(tmp_path):
    good, partial = fake_checkpoint(tmp_path, 5), fake_checkpoint(tmp_path, 10, complete=False)
    assert resume_checkpoint(str(good), tmp_path) == str(good)
    assert resume_checkpoint(None, tmp_path) is None
    assert resume_checkpoint("auto", tmp_path) == str(good)
    with pytest.raises(
        DataError, match=r"checkpoint-10: cannot resume from this checkpoint: no ftkit_complete"
    ):
        resume_checkpoint(str(partial), tmp_path)


def test_prune_keeps_newest_complete_and_best(tmp_path):
    for step in (5, 10, 15, 20):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 25, complete=False)
    prune_checkpoints(tmp_path, save_total_limit=2, best_checkpoint=str(tmp_path / "checkpoint-5"))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-20"]
    prune_checkpoints(tmp_path, save_total_limit=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-20"]


# ---- SIGKILL and exact resume ----------------------------------------------------------------------------


def test_sigkill_mid_epoch_then_resume_is_exact(reference, tiny_model, tmp_path):
    step = random.randint(1, TOTAL_STEPS - 1)  # any step: before the first checkpoint means a fresh start
    killed = run_script("--model", tiny_model, "--output_dir", str(tmp_path), "--kill_at_step", str(step))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert train_main(["--model", tiny_model, "--output_dir", str(tmp_path), "--resume"]) == 0
    resumed_from = json.loads((tmp_path / "result.json").read_text())["resumed_from"]
    expected = f"checkpoint-{(step - 1) // 5 * 5}" if step > 5 else None  # the kill precedes that step's save
    assert (resumed_from and Path(resumed_from).name) == expected
    assert_same_run(reference, tmp_path, f"killed at step {step}")


@pytest.mark.parametrize("where", ["optimizer", "marker"])
def test_sigkill_during_save_resumes_from_previous_checkpoint(reference, tiny_model, tmp_path, where, caplog):
    """Killed while writing checkpoint-15, with save_total_limit=1: checkpoint-10 must still be there."""
    common = ["--model", tiny_model, "--output_dir", str(tmp_path), "--save_total_limit", "1"]
    killed = run_script(*common, "--kill_in_save", f"15:{where}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    partial = tmp_path / "checkpoints" / "checkpoint-15"
    assert partial.is_dir() and not (partial / MARKER).exists()
    assert (partial / "trainer_state.json").exists() == (where == "marker")
    with caplog.at_level(logging.WARNING):
        assert train_main([*common, "--resume"]) == 0
    assert f"Skipping incomplete checkpoint {partial}" in caplog.text
    assert Path(json.loads((tmp_path / "result.json").read_text())["resumed_from"]).name == "checkpoint-10"
    assert_same_run(reference, tmp_path, f"killed during save ({where})")
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["checkpoint-24"]


def test_resume_from_older_checkpoint_unmarks_newer_ones(tiny_model, tmp_path, caplog):
    """Trainer rewrites checkpoint-10 in place: its old marker must not vouch for half-written files."""
    build_trainer(tiny_model, tmp_path, [CrashSafeCheckpoints()], max_steps=10).train()
    seen = []

    class Look(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seen.append((tmp_path / "checkpoint-10" / MARKER).exists())

    trainer = build_trainer(tiny_model, tmp_path, [CrashSafeCheckpoints(), Look()], max_steps=10)
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    assert "checkpoint-10 is ahead of step 5: no longer resumable" in caplog.text
    assert seen == [False] * 5
    assert resolve_resume(tmp_path) == str(tmp_path / "checkpoint-10")


def test_sigterm_checkpoint_is_marked_complete(tiny_model, tmp_path):
    """`enable_jit_checkpoint` saves outside on_save; the checkpoint still gets its marker."""
    from transformers.trainer_jit_checkpoint import JITCheckpointCallback

    class Sigterm(TrainerCallback):  # what the SIGTERM handler does after its grace period
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                jit.jit_manager.is_checkpoint_requested = True

    callbacks = [Sigterm(), CrashSafeCheckpoints()]
    trainer = build_trainer(tiny_model, tmp_path, callbacks, enable_jit_checkpoint=True, save_steps=100)
    (jit,) = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, JITCheckpointCallback)]
    trainer.train()
    # Trainer saves at the next step begin (still step 3), finishes that step and stops.
    assert trainer.state.global_step == 4
    assert resolve_resume(tmp_path) == str(tmp_path / "checkpoint-3")


def test_same_seed_is_bit_equal_other_seed_differs(reference, tiny_model, tmp_path):
    assert train_main(["--model", tiny_model, "--output_dir", str(tmp_path / "same")]) == 0
    assert_same_run(reference, tmp_path / "same", "same seed")
    assert train_main(["--model", tiny_model, "--output_dir", str(tmp_path / "other"), "--seed", "1"]) == 0
    a, b = weights(reference), weights(tmp_path / "other")
    assert not torch.equal(a["classifier.weight"], b["classifier.weight"])
    assert not torch.equal(
        a["bert.encoder.layer.0.attention.self.query.weight"],
        b["bert.encoder.layer.0.attention.self.query.weight"],
    )


# ---- NaN / Inf guard -------------------------------------------------------------------------------------


def test_plain_trainer_hides_nan_at_huge_lr(tiny_model, tmp_path):
    """Why the guard exists: transformers 5.23 alone logs loss 0.0 and ends normally with NaN weights."""
    trainer = build_trainer(tiny_model, tmp_path, learning_rate=1e9, max_steps=3, save_steps=3)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["loss"] for e in logged[1:]] == [0.0, 0.0]
    assert all(math.isnan(e["grad_norm"]) for e in logged[1:])
    saved = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    assert not torch.isfinite(saved["classifier.weight"]).any()


def test_guard_stops_huge_lr_before_nonfinite_weights_are_saved(tiny_model, tmp_path):
    callbacks = [CrashSafeCheckpoints(), NonFiniteGuard()]
    trainer = build_trainer(tiny_model, tmp_path, callbacks, learning_rate=1e9, save_steps=1)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient norm \(nan\) at step 2") as err:
        trainer.train()
    assert err.value.step == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert resolve_resume(tmp_path) == str(tmp_path / "checkpoint-1")
    saved = load_file(tmp_path / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the NaN step was not applied


def test_guard_catches_infinite_loss_with_finite_gradients(tiny_model, tmp_path):
    """A constant inf added to the loss leaves gradients finite; only the (unfiltered) logged loss shows it."""
    trainer = build_trainer(tiny_model, tmp_path, [NonFiniteGuard()], logging_steps=2, save_strategy="no")
    ce = torch.nn.functional.cross_entropy
    trainer.compute_loss_func = lambda out, labels, num_items_in_batch=None: ce(out.logits, labels) + math.inf
    with pytest.raises(NonFiniteError, match=r"training loss \(inf\) at step 2; averaged over steps 1-2"):
        trainer.train()


def test_guard_refuses_to_save_nonfinite_weights(tiny_model, tmp_path):
    class Poison(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:  # the step being finished is step 3
                model.classifier.bias.data[0] = math.inf

    callbacks = [Poison(), CrashSafeCheckpoints(), NonFiniteGuard()]
    trainer = build_trainer(tiny_model, tmp_path, callbacks, save_steps=3)
    with pytest.raises(NonFiniteError, match=r"weight classifier.bias \(inf\) at step 3"):
        trainer.train()
    assert list_checkpoints(tmp_path) == []


# ---- disk ------------------------------------------------------------------------------------------------


def test_failed_save_leaves_previous_checkpoint_resumable(reference, tiny_model, tmp_path, monkeypatch):
    real_save = torch.save

    def disk_full_at_10(obj, f, *args, **kwargs):
        if "checkpoint-10" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_10)
    with pytest.raises(OSError, match="No space left"):
        train_main(["--model", tiny_model, "--output_dir", str(tmp_path), "--save_total_limit", "1"])
    monkeypatch.setattr(torch, "save", real_save)
    assert resolve_resume(tmp_path / "checkpoints") == str(tmp_path / "checkpoints" / "checkpoint-5")
    assert train_main(["--model", tiny_model, "--output_dir", str(tmp_path), "--resume"]) == 0
    assert_same_run(reference, tmp_path, "after ENOSPC")


@pytest.mark.parametrize("limit,best", [(2, False), (1, True)])
def test_checkpoint_folders_never_exceed_limit_plus_one(tiny_model, tmp_path, limit, best):
    counts = {"peak": [], "after": []}

    class Count(TrainerCallback):
        def __init__(self, key):
            self.key = key

        def on_save(self, args, state, control, **kwargs):
            counts[self.key].append(len(list_checkpoints(tmp_path)))

    evaluation = {}
    if best:  # a metric that only gets worse: the first checkpoint stays the best one to the end
        evaluation = dict(
            eval_strategy="steps", eval_steps=5, load_best_model_at_end=True, metric_for_best_model="rank"
        )
    callbacks = [Count("peak"), CrashSafeCheckpoints(), Count("after"), NonFiniteGuard()]
    trainer = build_trainer(tiny_model, tmp_path, callbacks, save_total_limit=limit, **evaluation)
    evals = iter(range(100))
    trainer.compute_metrics = lambda pred: {"rank": -next(evals)}
    trainer.train()
    assert trainer.args.save_total_limit == limit  # handed back after training
    assert len(counts["peak"]) == 5
    assert max(counts["peak"]) == limit + 1 + best
    assert max(counts["after"]) == limit + best
    remaining = list_checkpoints(tmp_path)
    assert resolve_resume(tmp_path) == str(remaining[-1])
    assert remaining[-1].name == "checkpoint-24"
    if best:
        assert str(remaining[0]) == trainer.state.best_model_checkpoint != str(remaining[-1])


# ---- two ranks (gloo on CPU) -----------------------------------------------------------------------------


@pytest.mark.slow  # multi-process or kill/resume run: make test-slow keeps make test under 5 minutes
def test_two_rank_evaluation_sees_every_sample_once(tiny_model, tmp_path):
    sizes = ["7", "40", "101"]
    evaluate_sizes(tiny_model, tmp_path / "one", [int(n) for n in sizes])
    proc = run_script(
        "--model", tiny_model, "--output_dir", str(tmp_path / "two"), "--eval_sizes", ",".join(sizes), ranks=2
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "eval_result.json").read_text())
    two = json.loads((tmp_path / "two" / "eval_result.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for n in sizes:
        ids = two[n]["ids"]
        assert sorted(ids) == list(range(int(n))), n  # each sample once: no padding repeats, none dropped
        by_id = dict(zip(one[n]["ids"], one[n]["preds"], strict=True))
        assert all(
            math.isclose(p, by_id[i], rel_tol=1e-5, abs_tol=1e-6)
            for i, p in zip(ids, two[n]["preds"], strict=True)
        )
        true_mse = sum((p - i) ** 2 for i, p in zip(ids, two[n]["preds"], strict=True)) / int(n)
        assert math.isclose(two[n]["eval_loss"], true_mse, rel_tol=1e-5), n
        assert math.isclose(two[n]["eval_loss"], one[n]["eval_loss"], rel_tol=1e-5), n


def test_exact_eval_loss_token_classification_ignores_padding():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 3.0], [-100.0, -100.0]]])
    labels = torch.tensor([[0, -100], [1, -100]])
    expected = torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 1]))
    assert math.isclose(exact_eval_loss(logits.numpy(), labels.numpy()), expected.item(), rel_tol=1e-6)


@pytest.mark.slow
def test_two_rank_sigkill_then_resume_is_exact(tiny_model, tmp_path):
    ref = run_script("--model", tiny_model, "--output_dir", str(tmp_path / "ref"), ranks=2)
    assert ref.returncode == 0, ref.stderr[-3000:]
    step = random.randint(6, TOTAL_STEPS - 1)
    run = ["--model", tiny_model, "--output_dir", str(tmp_path / "run")]
    killed = run_script(*run, "--kill_at_step", str(step), ranks=2)
    assert killed.returncode != 0
    ckpt = Path(resolve_resume(tmp_path / "run" / "checkpoints"))
    with safe_globals():  # the states hold numpy arrays
        rng = [torch.load(ckpt / f"rng_state_{r}.pth", weights_only=True)["cpu"] for r in (0, 1)]
    assert not torch.equal(*rng)  # each rank has its own stream, so swapping them would show
    resumed = run_script(*run, "--resume", ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["world_size"] == 2
    assert_same_run(tmp_path / "ref", tmp_path / "run", f"2 ranks, killed at step {step}")


# ---- the textcls recipe ----------------------------------------------------------------------------------


def recipe_argv(tiny_model: str, fixtures: Path, out: Path, *extra: str) -> list[str]:
    data = fixtures / "textcls"
    return [
        "--model_name_or_path", tiny_model,
        "--train_file", str(data / "train.csv"),
        "--validation_file", str(data / "validation.csv"),
        "--test_file", str(data / "test.csv"),
        "--output_dir", str(out),
        "--num_train_epochs", "2",
        "--per_device_train_batch_size", "8",
        "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def test_recipe_exits_with_the_step_when_training_diverges(
    tiny_model, fixtures, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    argv = recipe_argv(
        tiny_model, fixtures, out, "--learning_rate", "1e9", "--load_best_model_at_end", "false"
    )
    monkeypatch.setattr(sys, "argv", [str(RECIPE), *argv, "--save_strategy", "steps", "--save_steps", "1"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(RECIPE), run_name="__main__")
    assert exit_.value.code == 3  # its own status: a diverged run, not a failure of the machine or data
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: non-finite gradient norm (nan) at step ")
    step = int(message.split("at step ")[1].split(";")[0])
    saved = list_checkpoints(out / "checkpoints")
    assert [p.name for p in saved] == [f"checkpoint-{s}" for s in range(1, step)]  # none for the bad step
    assert resolve_resume(out / "checkpoints") == str(saved[-1])
    for checkpoint in saved:
        weights = load_file(checkpoint / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values()), checkpoint.name
    assert not (out / "model.safetensors").exists()  # no final model either


def test_recipe_resume_auto_without_checkpoints_starts_fresh(tiny_model, fixtures, tmp_path, capsys):
    out = tmp_path / "run"
    main = runpy.run_path(str(RECIPE))["main"]
    results = main(recipe_argv(tiny_model, fixtures, out, "--resume", "auto"))
    assert f"No checkpoint in {out / 'checkpoints'}: starting fresh" in capsys.readouterr().err
    assert results["epoch"] == 2 and (out / "model.safetensors").is_file()
    assert resolve_resume(out / "checkpoints") == str(list_checkpoints(out / "checkpoints")[-1])


class FakeScaler:
    """What the guard sees of torch.amp.GradScaler in an fp16 GPU run (accelerate's optimizer holds it)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def is_enabled(self) -> bool:
        return True

    def get_scale(self) -> float:
        return self.scale


def test_guard_lets_the_fp16_loss_scaler_skip_overflow_steps():
    model = torch.nn.Linear(2, 1)
    model.weight.grad = torch.full_like(model.weight, float("inf"))  # an overflowed fp16 backward
    guard, state, control = NonFiniteGuard(), SimpleNamespace(global_step=4), SimpleNamespace()
    for optimizer in (None, SimpleNamespace(scaler=None)):
        with pytest.raises(NonFiniteError, match="gradient norm"):
            guard.on_pre_optimizer_step(None, state, control, model=model, optimizer=optimizer)
    scaled = SimpleNamespace(scaler=FakeScaler(2.0**15))
    guard.on_pre_optimizer_step(None, state, control, model=model, optimizer=scaled)  # skipped by the scaler
    guard.on_log(None, state, control, logs={"loss": 0.7, "grad_norm": float("inf")}, optimizer=scaled)
    with pytest.raises(NonFiniteError, match="training loss"):
        guard.on_log(None, state, control, logs={"loss": float("nan")}, optimizer=scaled)
    with pytest.raises(NonFiniteError, match="loss scale fell to 0.5"):
        guard.on_pre_optimizer_step(
            None, state, control, model=model, optimizer=SimpleNamespace(scaler=FakeScaler(0.5))
        )
