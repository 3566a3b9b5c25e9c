"""The run directory: results, resolved config, manifest, model card and plots (same shape for every task)."""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import shutil
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

# The distributed types for which accelerate 1.15 enables FSDP (AcceleratorState.__init__).
FSDP_TYPES = frozenset(
    f"MULTI_{name}" for name in ("GPU", "MLU", "SDAA", "MUSA", "NPU", "XPU", "HPU", "NEURON")
)

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
    "long_text", "stride", "max_chunks", "context", "decode", "case_feature", "class_weights", "calibrate", "multi_label",
    "pos_weight", "lr_scheduler_type",
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
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Replace the run in a used --output_dir (its model, checkpoints and results are deleted "
            "first). Without it (or --resume) a non-empty --output_dir is refused."
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

    # Milliseconds and the process id: two runs started in the same second get different folders.
    now = time.time()
    name = [f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{int(now % 1 * 1000):03d}-{os.getpid()}"]
    if PartialState().num_processes > 1:
        broadcast_object_list(name)  # ranks start apart and have their own pids: use rank 0's name
    return Path("runs") / task / name[0]


# What ftkit writes into a run directory (`save_run`, `ftkit predict`, Trainer's checkpoints). `--overwrite`
# deletes these and nothing else, so an --output_dir pointed at the wrong folder loses no foreign file.
RUN_OUTPUTS = (
    "checkpoints", "adapter", RUN_FILE, "all_results.json", "test_report.json", "test_report.txt",
    "test_predictions.jsonl", "test_predictions.csv", "confusion_matrix.png", "training_curves.png",
    "README.md", "config.yaml", "manifest.json", "config.json", "generation_config.json", "compress.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "added_tokens.json",
    "chat_template.jinja", "test_predictions.conll",
)  # fmt: skip
# Model weights of either kind, in every name transformers and peft give them: before the final save
# they are all removed, so no model of another run stays beside the new one (load_run would prefer it).
MODEL_FILES = (
    "model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
    "pytorch_model.bin.index.json", "*.onnx", "*.onnx.data", "adapter_model.*", "adapter_config.json",
)  # fmt: skip


def remove_outputs(run_dir: Path, patterns: tuple[str, ...]) -> list[str]:
    """Delete the files and folders of `run_dir` whose names match `patterns`; return their names."""
    removed = []
    for pattern in patterns:
        for path in sorted(run_dir.glob(pattern)):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path.name)
    return removed


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a used run directory unless the run continues it (`resume`) or replaces it (`overwrite`).

    A missing or empty folder is unused. With `overwrite` the previous run's files (`RUN_OUTPUTS`, the
    model files and `predictions-*`) are deleted on the main process; other files are left and listed.
    """
    if resume and overwrite:
        raise DataError("--resume and --overwrite contradict each other: continue the run or replace it")
    if resume or not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: --output_dir exists and is not a folder")
    used = sorted(p.name for p in run_dir.iterdir())
    if not used:
        return
    if not overwrite:
        shown = ", ".join(used[:5]) + (", ..." if len(used) > 5 else "")
        raise DataError(
            f"{run_dir}: --output_dir is not empty ({shown}); pass --resume auto to continue that run, "
            "--overwrite to replace it, or choose a new folder"
        )
    if RUN_FILE not in used and "checkpoints" not in used:
        raise DataError(
            f"{run_dir}: --overwrite replaces only an ftkit run directory (with {RUN_FILE} or checkpoints/), "
            "and this folder has neither: choose a new --output_dir"
        )
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()  # every rank has looked before the main process deletes
    if state.is_main_process:
        removed = remove_outputs(run_dir, (*RUN_OUTPUTS, *MODEL_FILES, "predictions-*"))
        logger.warning("--overwrite: deleted %d entries of the previous run in %s", len(removed), run_dir)
        left = sorted(p.name for p in run_dir.iterdir())
        if left:
            logger.warning("--overwrite: left %s in %s (not written by ftkit)", ", ".join(left), run_dir)
    state.wait_for_everyone()


def start_run(name: str, training_args, run_args: RunArguments, options: Options):
    """Logging, the run directory (see `make_run_dir`) and checkpoints inside it, for a recipe's main.

    Returns (run_dir, training_args): a new TrainingArguments whose output_dir is `run_dir/checkpoints`.
    """
    setup_logging(training_args.should_log)  # should_log sets up accelerate's PartialState
    check_engine(training_args)
    run_dir = make_run_dir(name, training_args.output_dir, resume=bool(run_args.resume))
    check_run_dir(run_dir, bool(run_args.resume), run_args.overwrite)
    why = "checkpoints live in the run directory"
    training_args = options.decide(
        training_args, why, override_user=True, output_dir=str(run_dir / "checkpoints")
    )
    return run_dir, training_args


def check_engine(training_args) -> None:
    """Refuse a launch that asks for FSDP or DeepSpeed where accelerate would not run it.

    accelerate 1.15 turns FSDP on only for GPU-class distributed types (CUDA/ROCm, XPU, NPU, ...) and
    DeepSpeed only off the CPU; elsewhere it trains with plain DDP and says nothing. `accelerate
    launch` tells the processes through ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED; a recipe's
    `--fsdp` option asks the same through TrainingArguments.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType, str_to_bool

    def env_flag(name: str) -> bool:
        return bool(str_to_bool(os.environ.get(name, "false")))

    kind = PartialState().distributed_type
    if (env_flag("ACCELERATE_USE_FSDP") or training_args.fsdp_plugin_args is not None) and (
        kind.value not in FSDP_TYPES
    ):
        engine = "FSDP"
    elif env_flag("ACCELERATE_USE_DEEPSPEED") and kind != DistributedType.DEEPSPEED:
        engine = "DeepSpeed"
    else:
        return
    raise DataError(
        f"the launch asks for {engine}, which accelerate runs only on GPU-class devices (started by "
        f"accelerate launch); here (distributed type {kind.value}) it would silently train without it: "
        "without GPUs use recipes/accelerate/cpu.yaml"
    )


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
        *([f"**Warning:** {results['baseline_warning']}\n"] if results.get("baseline_warning") else []),
        table({k: v for k, v in results.items() if k.startswith(("eval_", "test_", "train_", "baseline_"))}),
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
    if info.get("text_pair_column"):  # sentence pairs: a table with both texts, no .txt
        columns = f"{info.get('text_column') or 'text'}, {info['text_pair_column']}"
        text = f"ftkit predict {run_dir} --input pairs.csv  # columns {columns}, as in training"
    text += f"\n# or: transformers.pipeline('text-classification', model='{run_dir}'"
    if info["task"] == "regression":
        text += ", function_to_apply='none')  # the rating"
    elif info.get("thresholds"):  # multi-label
        text += ", top_k=None)  # each label's probability; ftkit predict applies the run's thresholds"
    else:
        text += ")"
    if info.get("text_pair_column"):
        text += "\n#     called with {'text': first, 'text_pair': second} per input"
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
    # FSDP shards the weights over the ranks: all of them take part in gathering the full state dict.
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if not trainer.is_world_process_zero():
        return
    model_args = next(a for a in args if hasattr(a, "merge_lora"))
    run_info = {
        "format_version": FORMAT_VERSION,
        "task": info["task"],
        "base_model": model_args.model_name_or_path,  # None: the embedded default
        "lora": model_args.use_lora,
        # What save_model writes: FSDP's sharded adapter is saved unmerged (it says so in the log).
        "merged": model_args.use_lora and model_args.merge_lora and state_dict is None,
        **{k: v for k, v in info.items() if k != "task"},
    }
    # A resumed run (or one that crashed after a final save) may find model files in the folder: a full
    # model beside a new adapter would be the one `load_run` serves. Only this run's save remains.
    remove_outputs(run_dir, MODEL_FILES + ("adapter",))
    write_json(run_dir / RUN_FILE, run_info)
    save_model(trainer.model, tokenizer, run_dir, model_args.merge_lora, state_dict)
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
