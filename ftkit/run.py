"""The run directory: results, resolved config, manifest, model card and plots (same shape for every task)."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import yaml

logger = logging.getLogger(__name__)

RUN_FILE = "ftkit_run.json"
# The options a model card lists (those a run has); config.yaml in the run directory holds all.
CARD_HYPERPARAMETERS = (
    "task", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "max_length",
    "long_text", "stride", "context", "decode", "case_feature", "class_weights", "calibrate", "lr_scheduler_type",
    "warmup_steps", "weight_decay", "use_lora", "lora_r", "seed",
)  # fmt: skip


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

    `use_cpu` is left out: the recipes derive it from the machine, and a CPU run's config replayed on a
    GPU machine must not pin the CPU.
    """
    clean = json.loads(json.dumps({k: v for k, v in config.items() if k != "use_cpu"}, default=_jsonable))
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


def write_manifest(
    run_dir: Path, *, seed: int, data_fingerprint: str, extra: dict[str, Any] | None = None
) -> None:
    """What produced this run: package versions, git commit, data fingerprint, seed, command line."""
    versions = {}
    for pkg in (
        "ftkit",
        "torch",
        "transformers",
        "datasets",
        "accelerate",
        "peft",
        "tokenizers",
        "safetensors",
        "scikit-learn",
    ):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
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


def pad_stats(dataloader) -> tuple[int, int]:
    """(real tokens, real + pad tokens) over one pass of a dataloader's batches, collation only.

    Used after training on the training dataloader to report the pad share that its sampler and
    collator produce (one epoch's worth; later epochs shuffle the same way).
    """
    real = total = 0
    for batch in dataloader:
        mask = batch["attention_mask"]
        real += int(mask.sum())
        total += mask.numel()
    return real, total


def train_token_stats(trainer, train_runtime: float, resumed_from: str | None = None) -> dict[str, float]:
    """Real (non-pad) training tokens per second over all ranks, and the pad share of the batches.

    Counts one epoch of this rank's training batches (collation only) and scales it to every rank
    and to the epochs this run trained (after a resume, only those since the checkpoint).
    """
    real, total = pad_stats(trainer.get_train_dataloader())
    start = 0.0
    if resumed_from:
        start = json.loads((Path(resumed_from) / "trainer_state.json").read_text(encoding="utf-8"))["epoch"]
    tokens = real * trainer.args.world_size * (trainer.state.epoch - start)
    return {"train_real_tokens_per_second": tokens / train_runtime, "train_pad_share": 1 - real / total}
