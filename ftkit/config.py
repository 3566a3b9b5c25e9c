"""Argument parsing: typed dataclasses + `TrainingArguments`, optional YAML defaults, CLI wins."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from ftkit import DataError


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take `--config FILE` (or `--config=FILE`) out of argv."""
    rest, config = [], None
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            config = next(it, None)
            if config is None:
                raise DataError("--config needs a file name")
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return config, rest


def load_yaml_config(path: str | Path, known: set[str]) -> dict[str, Any]:
    """Read a flat YAML mapping of option -> value; keys that no dataclass field knows are an error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise DataError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
    unknown = sorted(set(values) - known)
    if unknown:
        raise DataError(f"{path}: unknown option(s) {', '.join(unknown)} (see --help for the valid ones)")
    return values


def cpu_only() -> bool:
    """True when torch sees no GPU (CUDA/ROCm, XPU or Apple MPS): training runs on the CPU."""
    import torch

    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return not (torch.cuda.is_available() or xpu or torch.backends.mps.is_available())


def parse_args(
    types: tuple[type, ...],
    argv: list[str] | None = None,
    defaults: dict[str, Any] | None = None,
    description: str | None = None,
) -> tuple[Any, ...]:
    """Parse argv into one instance per dataclass in `types`.

    Precedence, lowest first: dataclass defaults, `defaults` (the recipe's own choices for
    `TrainingArguments`), the YAML file given with `--config`, then the command line.
    Unknown keys fail both in YAML and on the command line.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(types, description=description)
    parser.add_argument("--config", metavar="FILE", help="YAML file of option: value defaults; CLI wins")
    known = {f.name for t in types for f in dataclasses.fields(t)}
    config_path, rest = _split_config_flag(argv)
    merged = dict(defaults or {})
    if config_path:
        merged.update(load_yaml_config(config_path, known))
    # Values go through argparse as strings, so YAML and CLI give identical types and validation.
    # A bool flag needs an explicit value (`--flag false`) for HfArgumentParser.
    yaml_argv: list[str] = []
    for key, value in merged.items():
        if value is None:
            continue
        if isinstance(value, list):
            yaml_argv += [f"--{key}", *map(str, value)]
        else:
            yaml_argv += [f"--{key}", str(value)]
    *parsed, remaining = parser.parse_args_into_dataclasses(
        args=yaml_argv + rest, return_remaining_strings=True
    )
    if remaining:
        raise DataError(f"unknown option(s) on the command line: {' '.join(remaining)} (see --help)")
    return tuple(p for p in parsed if dataclasses.is_dataclass(p))


def to_dict(*args: Any) -> dict[str, Any]:
    """Flatten parsed dataclasses into one plain dict (for config.yaml in the run directory)."""
    out: dict[str, Any] = {}
    for a in args:
        d = a.to_dict() if hasattr(a, "to_dict") else dataclasses.asdict(a)
        out.update({k: v for k, v in d.items() if not k.startswith("_")})
    return out
