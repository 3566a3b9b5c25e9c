"""The shipped accelerate configs (recipes/accelerate/), and the recipes on several processes and machines.

Fast (`make test`): every config parses with accelerate's own loader, FSDP's wrap class is a class
of the BERT model, FSDP/DeepSpeed are refused where accelerate would silently run plain DDP, and
bench/gpu_check.sh is valid bash whose --dry-run prints its commands.
Slow (`make test-slow`, 1-3 minutes each on 2 shared cores): real `accelerate launch` runs of the text
classification recipe on the tiny model: 2 CPU gloo ranks on one machine (recipes/accelerate/cpu.yaml)
and 2 "machines" of one process each on loopback (--num_machines 2 --machine_rank 0/1) both end with
the weights of a one-process run with the same global batch; a 2-rank LoRA run trains with
ddp_find_unused_parameters=False; FSDP2 sharding on 2 gloo ranks (tests/fsdp_on_cpu.py tells
accelerate they are GPUs): a sharded checkpoint resumes exactly and the run saves one plain model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from ftkit import DataError
from ftkit.run import check_engine

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
sys.path.insert(0, str(ROOT / "recipes"))
import textcls  # noqa: E402

ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))


def test_the_configs_are_the_documented_set_and_ship_in_the_wheel():
    assert {p.stem for p in CONFIGS} == {"cpu", "ddp", "multi_node", "fsdp", "deepspeed_zero2"}
    # `ftkit cp` and a wheel install find them next to the bundled recipes.
    assert '"accelerate/*.yaml"' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_accelerate_config_parses(path):
    config = load_config_from_file(str(path))  # what `accelerate launch --config_file` reads
    assert config.compute_environment.value == "LOCAL_MACHINE" and config.num_processes >= 2
    expected = {
        "cpu": DistributedType.MULTI_GPU,  # MULTI_GPU starts the processes; use_cpu keeps them on the CPU
        "ddp": DistributedType.MULTI_GPU,
        "multi_node": DistributedType.MULTI_GPU,
        "fsdp": DistributedType.FSDP,
        "deepspeed_zero2": DistributedType.DEEPSPEED,
    }[path.stem]
    assert config.distributed_type == expected
    assert config.use_cpu is (path.stem == "cpu")
    if path.stem == "multi_node":
        assert config.num_machines == 2 and config.main_process_ip and config.main_process_port
    if path.stem == "fsdp":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # full shard
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    if path.stem == "deepspeed_zero2":
        assert config.deepspeed_config["zero_stage"] == 2


def test_fsdp_wraps_a_layer_class_of_the_bert_model(tiny_model):
    from accelerate.utils.dataclasses import get_module_class_from_name
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    name = load_config_from_file(str(ROOT / "recipes" / "accelerate" / "fsdp.yaml")).fsdp_config[
        "fsdp_transformer_layer_cls_to_wrap"
    ]
    for auto in (AutoModelForSequenceClassification, AutoModelForTokenClassification):
        model = auto.from_pretrained(tiny_model, num_labels=3)
        # The lookup accelerate's auto-wrap policy does; None would mean no layer gets its own unit.
        cls = get_module_class_from_name(model, name)
        assert cls is not None and sum(isinstance(m, cls) for m in model.modules()) == 2  # 2 layers
    assert get_module_class_from_name(model, "RobertaLayer") is None  # the lookup can fail


def recipe_args(tiny_model: str, fixtures: Path, out: Path, *extra: str) -> list[str]:
    data = fixtures / "textcls"
    return [
        "--model_name_or_path", tiny_model,
        "--train_file", str(data / "train.csv"), "--validation_file", str(data / "validation.csv"),
        "--test_file", str(data / "test.csv"), "--output_dir", str(out), "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def test_recipes_refuse_an_fsdp_launch_where_accelerate_would_run_plain_ddp(
    tiny_model, fixtures, tmp_path, monkeypatch
):
    # What `accelerate launch --config_file recipes/accelerate/fsdp.yaml` sets for each process.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    out = tmp_path / "run"
    with pytest.raises(DataError, match="asks for FSDP, which accelerate runs only on GPU-class.*cpu.yaml"):
        textcls.main(recipe_args(tiny_model, fixtures, out, "--max_steps", "1"))
    assert not out.exists(), "refused before anything was written"


def test_deepspeed_is_refused_off_deepspeed(monkeypatch):
    # Without the deepspeed package TrainingArguments itself fails on ACCELERATE_USE_DEEPSPEED; with
    # it, on a CPU, accelerate runs plain DDP (distributed type not DEEPSPEED): the check refuses.
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(DataError, match="asks for DeepSpeed"):
        check_engine(SimpleNamespace(fsdp_plugin_args=None))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    check_engine(SimpleNamespace(fsdp_plugin_args=None))


def test_recipes_refuse_the_fsdp_option_on_a_cpu(tiny_model, fixtures, tmp_path):
    args = recipe_args(tiny_model, fixtures, tmp_path / "run", "--fsdp", "full_shard")
    with pytest.raises(DataError, match="asks for FSDP"):
        textcls.main(args)


def test_gpu_check_is_valid_bash_and_dry_run_prints_every_step(tmp_path):
    script = ROOT / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_GPUS": "2"}
    proc = subprocess.run(
        ["bash", str(script), "--dry-run", "--out", str(tmp_path / "gc")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for task in ("textcls", "sentiment", "ner"):
        for precision in ("bf16", "fp16"):
            assert any(f"recipes/{task}.py" in line and f"--{precision} true" in line for line in lines), (
                task,
                precision,
            )
    assert any("accelerate/ddp.yaml" in line for line in lines)
    fsdp = [line for line in lines if "accelerate/fsdp.yaml" in line]
    assert len(fsdp) == 2 and "--resume auto" in fsdp[1], "FSDP: a checkpointed run, then its resume"
    assert not (tmp_path / "gc").exists(), "a dry run runs nothing"


# ---- Multi-process runs (slow) ---------------------------------------------------------------------

# Random (not length-grouped) batches: the sampler's order then does not depend on the batch size,
# so global step k sees the same 8 rows whether one process takes 8 or two ranks take 4 each.
EQUAL_RUN = (
    "--max_steps", "4", "--learning_rate", "1e-3", "--train_sampling_strategy", "random",
    "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
    "--linear_backend", "torch", "--logging_steps", "1",
)  # fmt: skip


@pytest.fixture(scope="module")
def no_dropout_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model without dropout: each rank draws its own dropout masks, one process draws others."""
    out = tmp_path_factory.mktemp("tiny-no-dropout")
    shutil.copytree(tiny_model, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:  # fp32 sums in another order (4 + 4 rows all-reduced against 8): rounding only
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def one_process_run(no_dropout_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    fixtures = Path(__file__).parent / "fixtures"
    textcls.main(
        recipe_args(no_dropout_model, fixtures, out, *EQUAL_RUN, "--per_device_train_batch_size", "8")
    )
    return out


@pytest.mark.slow
def test_two_cpu_ranks_end_with_the_weights_of_one_process(
    no_dropout_model, fixtures, tmp_path, one_process_run
):
    out = tmp_path / "ddp"
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu.yaml")]
    cmd += ["--main_process_port", str(free_port()), str(ROOT / "recipes" / "textcls.py")]
    cmd += recipe_args(no_dropout_model, fixtures, out, *EQUAL_RUN, "--per_device_train_batch_size", "4")
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # ddp_find_unused_parameters=False: DDP does not search for unused parameters, nor warn about it.
    assert "find_unused_parameters=True" not in proc.stderr
    results = json.loads((out / "all_results.json").read_text())
    assert results["train_samples_per_second"] > 0 and results["train_loss"] < 1.5  # not 2x ln 3
    assert_same_weights(out, one_process_run)
    original = load_file(Path(no_dropout_model) / "model.safetensors")
    trained = load_file(out / "model.safetensors")
    assert not torch.equal(original["encoder.layer.0.attention.self.query.weight"],
                           trained["bert.encoder.layer.0.attention.self.query.weight"])  # fmt: skip


@pytest.mark.slow
def test_two_machines_on_loopback_end_with_the_weights_of_one_process(
    no_dropout_model, fixtures, tmp_path, one_process_run
):
    out, port = tmp_path / "nodes", free_port()
    procs = []
    for rank in (0, 1):  # what each of two machines runs, both pointing at machine 0
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2"]
        cmd += [
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
        ]
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "recipes" / "textcls.py")]
        cmd += recipe_args(no_dropout_model, fixtures, out, *EQUAL_RUN, "--per_device_train_batch_size", "4")
        procs.append(subprocess.Popen(cmd, env=launch_env(), stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["set_by_user"]["per_device_train_batch_size"]["value"] == 4
    assert_same_weights(out, one_process_run)


@pytest.mark.slow
def test_two_rank_lora_trains_without_the_unused_parameter_search(tiny_model, fixtures, tmp_path):
    # With find_unused_parameters=False DDP raises if a trainable parameter gets no gradient; LoRA's
    # frozen base weights do not count (they do not require grad).
    out = tmp_path / "lora"
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "cpu.yaml")]
    cmd += ["--main_process_port", str(free_port()), str(ROOT / "recipes" / "textcls.py")]
    cmd += recipe_args(
        tiny_model, fixtures, out, "--use_lora", "true", "--max_steps", "4", "--eval_strategy", "no"
    )
    cmd += [
        "--save_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
        "--per_device_train_batch_size",
        "4",
    ]
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "find_unused_parameters=True" not in proc.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_gpu_report_turns_a_run_directory_into_tokens_per_second_and_mfu(one_process_run):
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_report import datasheet_peak, run_row

    assert (
        datasheet_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312 and datasheet_peak("Tesla T4", "bf16") is None
    )
    results = json.loads((one_process_run / "all_results.json").read_text())
    peaks = {"bf16": {"measured": 100.0, "datasheet": None}, "fp16": {"measured": 50.0, "datasheet": 60.0}}
    row = run_row("textcls-ddp2-fp16", 2, one_process_run, peaks)
    assert row["real_tokens_per_s"] == results["train_real_tokens_per_second"]
    assert row["mfu_measured"] == pytest.approx(row["train_tflops"] / 100) and row["mfu_datasheet"] > 0
    assert row["test_accuracy"] == results["test_accuracy"] and row["train_tflops"] > 0


def test_ftkit_cp_copies_the_accelerate_configs(tmp_path):
    from ftkit.cli import main as ftkit_main

    assert ftkit_main(["cp", "accelerate", str(tmp_path / "launch")]) == 0
    assert sorted(p.name for p in (tmp_path / "launch").iterdir()) == sorted(p.name for p in CONFIGS)
    assert ftkit_main(["cp", "accelerate", str(tmp_path / "launch")]) == 2  # exists, no --force


@pytest.mark.slow
def test_sharded_fsdp2_checkpoint_resumes_exactly_and_the_run_saves_one_plain_model(
    tiny_model, fixtures, tmp_path
):
    # Real fully_shard on 2 gloo ranks, with accelerate told they are GPUs (tests/fsdp_on_cpu.py).
    def launch(out: Path, *extra: str) -> None:
        cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp.yaml")]
        cmd += ["--main_process_port", str(free_port()), str(ROOT / "tests" / "fsdp_on_cpu.py")]
        cmd += recipe_args(
            tiny_model, fixtures, out, "--max_steps", "4", "--per_device_train_batch_size", "4"
        )
        cmd += ["--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "no"]
        cmd += ["--load_best_model_at_end", "false", "--linear_backend", "torch", *extra]
        proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Saving model to" in proc.stderr and "pytorch_model_fsdp_0" in proc.stderr

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch(whole)
    step2 = whole / "checkpoints" / "checkpoint-2"
    marker = json.loads((step2 / "ftkit_complete.json").read_text())
    assert {"pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp"} <= set(marker["files"])
    shutil.copytree(step2, resumed / "checkpoints" / "checkpoint-2")
    launch(resumed, "--resume", "auto")
    # The run directory holds one plain, gathered model (not shards), equal to the uninterrupted run's.
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(resumed).num_labels == 3
    wa, wb = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    base = load_file(Path(tiny_model) / "model.safetensors")["encoder.layer.0.attention.self.query.weight"]
    assert not torch.equal(wa["bert.encoder.layer.0.attention.self.query.weight"], base), "it trained"
