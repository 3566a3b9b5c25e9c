"""Config precedence, shipped YAML files, --help, `ftkit cp` and `ftkit predict`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftkit import DataError
from ftkit.cli import main as ftkit_main
from ftkit.config import parse_args

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
import importlib  # noqa: E402

import textcls  # noqa: E402


def parse(argv, recipe=textcls):
    args, _options = parse_args(recipe.ARGUMENTS, argv, defaults=recipe.DEFAULTS)
    _source, data, *_, train = args  # by position: the recipe's own dataclasses sit between
    model = next(a for a in args if hasattr(a, "merge_lora"))
    return data, model, train


def test_recipe_defaults_apply_and_cli_beats_yaml(tmp_path):
    data, model, train = parse([])
    assert train.learning_rate == 1e-4 and train.lr_scheduler_type == "cosine" and data.max_length == 128
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "learning_rate: 3.0e-5\nmax_length: 64\nuse_lora: true\nlora_target_modules: [query, value]\n"
    )
    data, model, train = parse(["--config", str(cfg), "--learning_rate", "2e-5"])
    assert train.learning_rate == 2e-5 and data.max_length == 64
    assert model.use_lora is True and model.lora_target_modules == ["query", "value"]


def test_unknown_keys_fail_in_yaml_and_on_the_command_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 1.0e-4\nleraning_rate: 2\n")
    with pytest.raises(DataError, match=r"c\.yaml: unknown option\(s\) leraning_rate"):
        parse(["--config", str(cfg)])
    with pytest.raises(DataError, match="unknown option.*--no_such_flag"):
        parse(["--no_such_flag", "1"])


@pytest.mark.parametrize(
    "config", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_shipped_config_parses(config):
    recipe = importlib.import_module(config.stem.split("_")[0])
    args, options = parse_args(recipe.ARGUMENTS, ["--config", str(config)], defaults=recipe.DEFAULTS)
    assert options.config_file == str(config) and any(o == "config" for o in options.origins.values())
    if config.stem == recipe.__name__:  # the task's default config spells out the recipe's defaults
        bare, _ = parse_args(recipe.ARGUMENTS, [], defaults=recipe.DEFAULTS)
        assert [a.to_dict() if hasattr(a, "to_dict") else a for a in args] == [
            b.to_dict() if hasattr(b, "to_dict") else b for b in bare
        ]


def test_yaml_values_are_typed_and_checked(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("use_lora: true\nlearning_rate: 1e-4\nmax_length: 64\n")
    data, model, train = parse(["--config", str(cfg)])
    assert model.use_lora is True and train.learning_rate == 1e-4 and data.max_length == 64
    for text, message in (
        ("use_lora: 'yes'\n", "use_lora: expected true or false"),
        ("eval_strategy: no\n", "eval_strategy: got the YAML boolean false"),
        ("long_text: middle\n", "long_text: 'middle' is not one of auto, head, head_tail"),
        ("max_length: many\n", "max_length: 'many' is not a valid value"),
    ):
        cfg.write_text(text)
        with pytest.raises(DataError, match=message):
            parse(["--config", str(cfg)])
    cfg.write_text("multi_label: true\n")  # a choice named true: the YAML boolean means that choice
    args, _ = parse_args(textcls.ARGUMENTS, ["--config", str(cfg)], defaults=textcls.DEFAULTS)
    assert next(a for a in args if hasattr(a, "multi_label")).multi_label == "true"


def test_origins_say_who_set_each_value_and_decisions_spare_user_values(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 3.0e-5\n")
    args, options = parse_args(
        textcls.ARGUMENTS, ["--config", str(cfg), "--max_length", "64"], textcls.DEFAULTS
    )
    assert options.origins["learning_rate"] == "config" and options.origins["max_length"] == "cli"
    assert options.origins["num_train_epochs"] == "recipe" and options.origins["lora_r"] == "default"
    train = args[-1]
    decided = options.decide(train, "a test", learning_rate=1.0, num_train_epochs=7)
    assert decided.learning_rate == 3e-5 and decided.num_train_epochs == 7  # the user's value stays
    assert train.num_train_epochs == 2, "parsed arguments are never changed in place"
    assert options.decided == {
        "num_train_epochs": {"value": 7, "was": 2, "origin": "recipe", "why": "a test"}
    }
    forced = options.decide(train, "paths", override_user=True, learning_rate=1.0)
    assert forced.learning_rate == 1.0 and options.decided["learning_rate"]["origin"] == "config"


def test_default_yaml_equals_the_recipe_defaults():
    assert parse(["--config", str(ROOT / "recipes" / "configs" / "textcls.yaml")]) == parse([])


def test_help_lists_recipe_and_training_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        textcls.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--long_text",
        "--train_file",
        "--use_lora",
        "--learning_rate",
        "--config",
        "--encoding_errors",
    ):
        assert flag in out, flag


def test_recipe_exits_with_a_short_message_on_bad_data(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nok,a\n,b\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "textcls.py"), "--train_file", str(bad)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "bad.csv:3: empty or missing text" in proc.stderr and "Traceback" not in proc.stderr


def test_cp_copies_a_recipe_that_runs_outside_the_repository(tmp_path, tiny_model, fixtures):
    assert ftkit_main(["cp", "textcls", str(tmp_path / "my_task.py")]) == 0
    assert (tmp_path / "my_task.py").is_file() and (tmp_path / "my_task.yaml").is_file()
    assert (tmp_path / "my_task_lora.yaml").is_file()
    assert ftkit_main(["cp", "textcls", str(tmp_path / "my_task.py")]) == 2  # exists, no --force
    data = fixtures / "textcls"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "my_task.py", "--config", "my_task.yaml", "--model_name_or_path", tiny_model,
        "--train_file", str(data / "train.csv"), "--max_steps", "2", "--output_dir", "out", "--disable_tqdm", "true",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_predict_cli_txt_and_csv(tmp_path, tiny_model, fixtures):
    run = tmp_path / "run"
    data = fixtures / "textcls"
    textcls.main(
        [
            "--model_name_or_path",
            tiny_model,
            "--train_file",
            str(data / "train.csv"),
            "--max_steps",
            "2",
            "--output_dir",
            str(run),
            "--disable_tqdm",
            "true",
        ]
    )
    txt = tmp_path / "in.txt"
    txt.write_text("Chef bakes bread.\n\nNew phone chip.\nThe match went on.\n")
    assert ftkit_main(["predict", str(run), "--input", str(txt), "--output", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["origin"] for r in rows] == [f"{txt}:1", f"{txt}:3", f"{txt}:4"]
    assert all(r["label"] in {"food", "sports", "tech"} for r in rows)
    assert all(abs(r["p_food"] + r["p_sports"] + r["p_tech"] - 1) < 1e-4 for r in rows)

    assert (
        ftkit_main(
            ["predict", str(run), "--input", str(data / "test.csv"), "--output", str(tmp_path / "p.csv")]
        )
        == 0
    )
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["origin", "text", "label"] and len(lines) == 13
    assert ftkit_main(["predict", str(tmp_path), "--input", str(txt)]) == 2  # not a run directory


def test_compress_and_predict_cli_on_an_int8_run(tmp_path, tiny_model, fixtures):
    run = tmp_path / "run"
    data = fixtures / "textcls"
    textcls.main(
        [
            "--model_name_or_path",
            tiny_model,
            "--train_file",
            str(data / "train.csv"),
            "--max_steps",
            "2",
            "--output_dir",
            str(run),
            "--disable_tqdm",
            "true",
        ]
    )
    assert ftkit_main(["compress", str(run), "--quantize", "int8", "--out", str(tmp_path / "int8")]) == 0
    assert (
        ftkit_main(["compress", str(run), "--prune-heads", "0.5", "--out", str(tmp_path / "p")]) == 2
    )  # needs --texts
    txt = tmp_path / "in.txt"
    txt.write_text("Chef bakes bread.\nNew phone chip.\n")
    assert (
        ftkit_main(
            ["predict", str(tmp_path / "int8"), "--input", str(txt), "--output", str(tmp_path / "q.jsonl")]
        )
        == 0
    )
    assert ftkit_main(["predict", str(run), "--input", str(txt), "--output", str(tmp_path / "f.jsonl")]) == 0
    q = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    f = [json.loads(line) for line in (tmp_path / "f.jsonl").read_text().splitlines()]
    assert len(q) == 2 and all(r["label"] in {"food", "sports", "tech"} for r in q)
    assert max(abs(a["p_food"] - b["p_food"]) for a, b in zip(q, f, strict=True)) < 0.05  # int8 stays close


def test_cp_keeps_existing_configs_and_takes_only_recipe_names(tmp_path):
    (tmp_path / "my_task.yaml").write_text("learning_rate: 0.5\n")  # the user's tuned config, no recipe yet
    assert ftkit_main(["cp", "textcls", str(tmp_path / "my_task.py")]) == 2
    assert (tmp_path / "my_task.yaml").read_text() == "learning_rate: 0.5\n"
    assert not (tmp_path / "my_task.py").exists()
    assert ftkit_main(["cp", "textcls", str(tmp_path / "my_task.py"), "--force"]) == 0
    outside = tmp_path / "evil.py"
    outside.write_text("print('not a recipe')\n")
    for name in (str(outside.with_suffix("")), f"../../../../../..{outside.with_suffix('')}"):
        assert ftkit_main(["cp", name, str(tmp_path / "copy.py")]) == 2
    assert not (tmp_path / "copy.py").exists()


def test_default_run_directory_is_timestamped_under_runs(tmp_path, monkeypatch):
    from ftkit.run import make_run_dir

    monkeypatch.chdir(tmp_path)
    _, _, train = parse([])  # no --output_dir: TrainingArguments fills in "trainer_output"
    run_dir = make_run_dir("textcls", train.output_dir)
    assert run_dir.parent == Path("runs") / "textcls" and run_dir.name[:8].isdigit()
    (run_dir / "checkpoints").mkdir(parents=True)
    assert make_run_dir("textcls", train.output_dir, resume=True) == run_dir  # --resume continues it
