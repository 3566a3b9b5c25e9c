"""The run directory: results, resolved config, manifest, model card and plots (same shape for every task)."""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ftkit import DataError
from ftkit.config import Options, to_dict
from ftkit.models import save_model
from ftkit.packages import default_model_path

logger = logging.getLogger(__name__)

RUN_FILE = "ftkit_run.json"
# Version of the ftkit_run.json format; `read_run_info` refuses newer ones. Runs written before it
# existed have the same keys and count as version 1.
FORMAT_VERSION = 1
MANIFEST_PACKAGES = (
    "ftkit", "torch", "transformers", "datasets", "accelerate", "peft", "tokenizers", "safetensors",
    "scikit-learn",
)  # fmt: skip
# The options a model card lists (those a run has); config.yaml in the run directory holds all.
CARD_HYPERPARAMETERS = (
    "task", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "max_length",
    "long_text", "stride", "context", "decode", "case_feature", "class_weights", "calibrate", "lr_scheduler_type",
    "warmup_steps", "weight_decay", "use_lora", "lora_r", "seed",
)  # fmt: skip


@dataclass
class RunArguments:
    """The run directory: a new one per run, or continue one."""

    resume: str | None = field(
        default=None,
        metadata={
            "help": "auto: continue from the last complete checkpoint in <output_dir>/checkpoints (partial "
            "ones are skipped; none: start fresh); or the path of one checkpoint."
        },
    )


def make_run_dir(task: str, output_dir: str | None, resume: bool = False) -> Path:
    """`output_dir` if given, else `runs/<task>/<timestamp>`; every rank of a distributed run gets the same name.

    With `resume` and no `output_dir`, the newest existing `runs/<task>/*` is continued.
    """
    # TrainingArguments turns a missing output_dir into "trainer_output": treat that as not given.
    if output_dir and output_dir != "trainer_output":
        return Path(output_dir)
    previous = sorted(p for p in (Path("runs") / task).glob("*") if p.is_dir())
    if resume and previous:
        logger.info("resuming the newest run of %s: %s", task, previous[-1])
        return previous[-1]
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    name = [time.strftime("%Y%m%d-%H%M%S")]
    if PartialState().num_processes > 1:
        broadcast_object_list(name)  # ranks start a second apart: use rank 0's clock
    return Path("runs") / task / name[0]


def start_run(name: str, training_args, run_args: RunArguments, options: Options):
    """Logging, the run directory (see `make_run_dir`) and checkpoints inside it, for a recipe's main.

    Returns (run_dir, training_args): a new TrainingArguments whose output_dir is `run_dir/checkpoints`.
    """
    setup_logging(training_args.should_log)
    run_dir = make_run_dir(name, training_args.output_dir, resume=bool(run_args.resume))
    why = "checkpoints live in the run directory"
    training_args = options.decide(
        training_args, why, override_user=True, output_dir=str(run_dir / "checkpoints")
    )
    return run_dir, training_args


def setup_logging(is_main: bool) -> None:
    """Info on the main process, warnings only on the others."""
    level = logging.INFO if is_main else logging.WARNING
    # Trainer asks for pinned memory by default; on a CPU-only machine torch warns on every dataloader.
    warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true but no accelerator.*")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity(logging.WARNING if is_main else logging.ERROR)
    datasets.utils.logging.set_verbosity(logging.WARNING)


def write_json(path: str | Path, obj: Any) -> None:
    Path(path).write_text(
        json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n", encoding="utf-8"
    )


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """The resolved options (after defaults, YAML and CLI), reusable with `--config`.

    Left out: `use_cpu`, which the recipes derive from the machine (a CPU run's config replayed on a
    GPU machine must not pin the CPU), and `output_dir`, which is this run's (a replay makes its own).
    """
    skip = ("use_cpu", "output_dir")
    clean = json.loads(json.dumps({k: v for k, v in config.items() if k not in skip}, default=_jsonable))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(clean, sort_keys=True), encoding="utf-8")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions(names: tuple[str, ...] = MANIFEST_PACKAGES) -> dict[str, str | None]:
    """Installed versions of `names` (None for a package that is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_manifest(
    run_dir: Path, *, seed: int, data_fingerprint: str, extra: dict[str, Any] | None = None
) -> None:
    """What produced this run: package versions, git commit, data fingerprint, seed, command line."""
    versions = package_versions()
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
        "seed": seed,
        "data_fingerprint": data_fingerprint,
        **(extra or {}),
    }
    write_json(run_dir / "manifest.json", manifest)


def plot_curves(log_history: list[dict[str, Any]], path: Path, metric: str) -> None:
    """Training loss and validation loss/metric against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"], h.get(f"eval_{metric}")) for h in log_history if "eval_loss" in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        ax1.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax1.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="validation loss")
        if evals[0][2] is not None:
            ax2.plot([e[0] for e in evals], [e[2] for e in evals], "o-", color="tab:green")
    ax1.set(xlabel="step", title="loss")
    ax1.legend()
    ax2.set(xlabel="step", title=f"validation {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, names: list[str], path: Path) -> None:
    """Confusion matrix with counts, rows = true class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.55 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(
                j,
                i,
                str(matrix[i, j]),
                ha="center",
                va="center",
                color="white" if matrix[i, j] > matrix.max() / 2 else "black",
            )
    ax.set(xlabel="predicted", ylabel="true", title="test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_model_card(
    run_dir: Path,
    *,
    title: str,
    base_model: str,
    data: dict[str, Any],
    config: dict[str, Any],
    results: dict[str, Any],
    report_text: str | None = None,
    usage: str | None = None,
    decided: dict[str, dict[str, Any]] | None = None,
) -> None:
    """README.md for the run directory: what was trained on what, how, and how well."""
    hyperparameters = {k: config[k] for k in CARD_HYPERPARAMETERS if k in config}

    def table(d: dict[str, Any]) -> str:
        rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in d.items())
        return "| key | value |\n|---|---|\n" + rows

    parts = [
        f"# {title}\n",
        f"Fine-tuned from `{base_model}` with ftkit.\n",
        "## Data\n",
        table(data),
        "\n## Hyperparameters\n",
        table(hyperparameters),
        *(
            [
                "\n## Decided at run time\n",
                table({k: f"{_fmt(d['value'])}: {d['why']}" for k, d in decided.items()}),
            ]
            if decided
            else []
        ),
        "\n## Results\n",
        table({k: v for k, v in results.items() if k.startswith(("eval_", "test_", "train_"))}),
    ]
    if report_text:
        parts += ["\n## Per-class report (test)\n", "```\n" + report_text + "```"]
    if usage:
        parts += ["\n## Use\n", "```\n" + usage.strip() + "\n```"]
    (run_dir / "README.md").write_text("\n".join(parts) + "\n", encoding="utf-8")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write records as JSONL, or CSV when the name ends in .csv."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """The run's `ftkit_run.json` (task, labels, max_length, long-text policy, LoRA), format checked."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise DataError(f"{run_dir}: not an ftkit run directory (no {RUN_FILE})")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    version = info.get("format_version", 1) if isinstance(info, dict) else None
    if not isinstance(version, int) or not isinstance(info.get("task"), str):
        raise DataError(f"{path}: not an ftkit run file (no task or format_version)")
    if version > FORMAT_VERSION:
        raise DataError(
            f"{path}: written by a newer ftkit (run format {version}); this one reads format "
            f"{FORMAT_VERSION}: upgrade ftkit"
        )
    return info


def usage(run_dir: Path, info: dict[str, Any]) -> str:
    """How to use a run, for its model card."""
    text = f"ftkit predict {run_dir} --input texts.txt"
    if info["task"] in ("token-classification", "multi-task"):
        if info.get("case_feature"):
            text += (
                "\n# It passes each word's shape as token_type_ids (ftkit.ner.word_shape), as in training;"
            )
            text += "\n# transformers.pipeline would not."
        return text
    text += f"\n# or: transformers.pipeline('text-classification', model='{run_dir}'"
    text += ", function_to_apply='none')  # the rating" if info["task"] == "regression" else ")"
    if info.get("temperature", 1) != 1:
        text += f"  # uncalibrated: ftkit predict divides the logits by T={info['temperature']:.3g}"
    return text


def save_run(
    run_dir: Path,
    trainer,
    tokenizer,
    *,
    args: tuple[Any, ...],
    options: Options,
    info: dict[str, Any],
    results: dict[str, Any],
    predictions: list[dict[str, Any]],
    fingerprint: str,
    title: str,
    data: dict[str, Any],
    curve_metric: str,
    report: tuple[dict | None, str] | None = None,
    confusion: tuple[np.ndarray, list[str]] | None = None,
) -> None:
    """Write the run directory on the main process (other ranks return at once), the same for every task.

    `args` are the parsed dataclasses (the one with `use_lora` and `merge_lora` says how the model is
    saved); `info` the task's fields of ftkit_run.json (what `ftkit predict` needs); `predictions` the
    test rows for test_predictions.jsonl; `report` the test report as (JSON or None, text); `confusion`
    (matrix, class names); `data` and `title` go into the model card.
    """
    if not trainer.is_world_process_zero():
        return
    model_args = next(a for a in args if hasattr(a, "merge_lora"))
    run_info = {
        "format_version": FORMAT_VERSION,
        "task": info["task"],
        "base_model": model_args.model_name_or_path,  # None: the embedded default
        "lora": model_args.use_lora,
        "merged": model_args.merge_lora,
        **{k: v for k, v in info.items() if k != "task"},
    }
    write_json(run_dir / RUN_FILE, run_info)
    save_model(trainer.model, tokenizer, run_dir, model_args.merge_lora)
    write_json(run_dir / "all_results.json", results)
    report_text = None
    if report is not None:
        report_json, report_text = report
        if report_json is not None:
            write_json(run_dir / "test_report.json", report_json)
        (run_dir / "test_report.txt").write_text(report_text, encoding="utf-8")
    write_rows(predictions, run_dir / "test_predictions.jsonl")
    if confusion is not None:
        plot_confusion(*confusion, run_dir / "confusion_matrix.png")
    plot_curves(trainer.state.log_history, run_dir / "training_curves.png", curve_metric)
    config = to_dict(*args)
    write_config(run_dir, config)
    write_manifest(
        run_dir,
        seed=trainer.args.seed,
        data_fingerprint=fingerprint,
        extra={"options": options.record(*args)},
    )
    write_model_card(
        run_dir,
        title=title,
        base_model=model_args.model_name_or_path or default_model_path(),
        data=data,
        config=config,
        results=results,
        report_text=report_text,
        usage=usage(run_dir, run_info),
        decided=options.decided,
    )
