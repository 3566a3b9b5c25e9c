"""Training precision chosen by measurement (ftkit.speed), on stubbed probes; saved weights stay fp32."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, TrainingArguments

from ftkit import speed
from ftkit.config import Options
from ftkit.speed import SpeedArguments, speed_up

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))


def _never(*args, **kwargs):
    raise AssertionError("the probe must not run here")


def _decide(tiny_model, monkeypatch, native, probe, precision="auto", origins=None, **training):
    monkeypatch.setattr(speed, "native_bf16", lambda device="cpu": native)
    monkeypatch.setattr(speed, "measure_precision", probe)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    options = Options(origins={"bf16": "default", "fp16": "default", **(origins or {})})
    args = SpeedArguments(linear_backend="torch", precision=precision)
    decision, training_args = speed_up(model, args, TrainingArguments(use_cpu=True, **training), options)
    return decision, training_args, options


def test_auto_takes_bf16_where_the_probe_measures_it_faster(tiny_model, monkeypatch):
    decision, args, options = _decide(
        tiny_model, monkeypatch, "amx_bf16", lambda *a, **k: {"fp32": 300.0, "bf16": 1600.0}
    )
    assert args.bf16 and decision["precision"] == "bf16"
    assert decision["precision_gflops_fp32"] == 300.0 and decision["precision_gflops_bf16"] == 1600.0
    assert "amx_bf16" in decision["precision_why"] and options.decided["bf16"]["value"] is True


def test_auto_keeps_fp32_where_bf16_is_slower_or_not_native(tiny_model, monkeypatch):
    slower = lambda *a, **k: {"fp32": 300.0, "bf16": 310.0}  # noqa: E731  (below the margin)
    decision, args, options = _decide(tiny_model, monkeypatch, "avx512_bf16", slower)
    assert not args.bf16 and decision["precision"] == "fp32" and decision["precision_gflops_bf16"] == 310.0
    decision, args, options = _decide(tiny_model, monkeypatch, None, _never)
    assert not args.bf16 and decision["precision"] == "fp32" and "native" in decision["precision_why"]
    assert "bf16" not in options.decided


def test_the_users_bf16_flag_and_precision_option_win(tiny_model, monkeypatch):
    faster = lambda *a, **k: {"fp32": 300.0, "bf16": 1600.0}  # noqa: E731
    decision, args, _ = _decide(tiny_model, monkeypatch, "amx_bf16", _never, origins={"bf16": "cli"})
    assert not args.bf16 and decision["precision"] == "fp32"  # --bf16 false given
    decision, args, _ = _decide(tiny_model, monkeypatch, "amx_bf16", faster, precision="fp32")
    assert not args.bf16 and decision["precision"] == "fp32"
    decision, args, _ = _decide(tiny_model, monkeypatch, None, _never, precision="bf16")
    assert args.bf16 and decision["precision"] == "bf16"


def test_the_probe_measures_both_precisions():
    figures = speed.measure_precision(16, 32, tokens=32, repeats=1)
    assert set(figures) == {"fp32", "bf16"} and all(v > 0 for v in figures.values())


def test_recipe_trains_in_bf16_and_saves_fp32_weights(tiny_model, fixtures, tmp_path, monkeypatch):
    # The fp32 case is every other recipe test on this suite's machines (no native bf16).
    import textcls
    from test_textcls import recipe_args

    monkeypatch.setattr(speed, "native_bf16", lambda device="cpu": "amx_bf16")
    monkeypatch.setattr(speed, "measure_precision", lambda *a, **k: {"fp32": 100.0, "bf16": 500.0})
    out = tmp_path / "run"
    results = textcls.main(
        recipe_args(
            tiny_model,
            fixtures,
            out,
            "--max_steps",
            "2",
            "--eval_strategy",
            "no",
            "--save_strategy",
            "no",
            "--load_best_model_at_end",
            "false",
        )
    )
    saved = json.loads((out / "all_results.json").read_text())
    assert results["precision"] == saved["precision"] == "bf16"
    assert all(t.dtype == torch.float32 for t in load_file(out / "model.safetensors").values())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["decided"]["bf16"]["value"] is True


def test_cpu_flags_say_where_bf16_is_native(monkeypatch):
    from ftkit import hardware

    amx = "model name\t: Intel(R) Xeon(R) Platinum\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_int8 sse\n"
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: amx)
    assert hardware.native_bf16() == "amx_bf16"
    info = hardware.cpu_info()
    assert info["cpu"] == "Intel(R) Xeon(R) Platinum"
    assert info["cpu_flags"] == ["amx_bf16", "amx_int8", "avx2", "avx512_bf16", "avx512f"]
    assert "cpu_id" not in info  # no family line: nothing made up
    zen3 = "\n".join(
        [
            "vendor_id\t: AuthenticAMD",
            "cpu family\t: 25",
            "model\t\t: 1",
            "model name\t: AMD EPYC",
            "stepping\t: 1",
        ]
        + [
            "flags\t\t: fpu avx2 fma",
            "",
            "processor\t: 1",
            "cpu family\t: 99",
        ]  # the first processor's block counts
    )
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: zen3)
    assert hardware.native_bf16() is None and hardware.cpu_info()["cpu_flags"] == ["avx2", "fma"]
    assert hardware.cpu_info()["cpu_id"] == "AuthenticAMD family 25 model 1 stepping 1"
