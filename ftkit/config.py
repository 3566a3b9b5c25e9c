"""Argument parsing: typed dataclasses + `TrainingArguments`, optional YAML defaults, CLI wins.

`parse_args` returns the parsed dataclasses and an `Options` record of where every value came from
(a dataclass default, the recipe's own defaults, the `--config` YAML file, or the command line).
Parsed arguments are final: a value the recipe decides at run time goes through `Options.decide`,
which returns a new object, applies only where the user set nothing (unless told otherwise), logs
the decision and records it for the run directory.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from transformers import HfArgumentParser
from transformers.hf_argparser import string_to_bool

from ftkit import DataError

logger = logging.getLogger(__name__)

T = TypeVar("T")
USER_ORIGINS = ("config", "cli")
_UNSET = object()


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


def _typed(key: str, value: Any, action, path: Path) -> Any:
    """A YAML value checked and converted as the command line would convert its text, except that
    booleans stay YAML booleans: a bool option takes only true/false, any other option no boolean."""
    if value is None:
        return None
    if action.type is string_to_bool:
        if isinstance(value, bool):
            return value
        raise DataError(f"{path}: {key}: expected true or false, got {value!r}")
    if isinstance(value, bool) and action.choices and {"true", "false"} <= set(action.choices):
        value = str(value).lower()  # a choice named true/false (e.g. --multi_label): the YAML word means it
    if action.nargs == "+" and not isinstance(value, list):
        value = [value]
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, bool):
            word = "yes/no/on/off" if action.choices else str(item).lower()
            raise DataError(
                f"{path}: {key}: got the YAML boolean {str(item).lower()}, which this option does not "
                f"take; quote the value if you meant the text ({word} unquoted are booleans in YAML)"
            )

    def convert(item: Any) -> Any:
        try:
            out = action.type(str(item)) if action.type else item
        except (TypeError, ValueError) as err:
            raise DataError(f"{path}: {key}: {item!r} is not a valid value ({err})") from None
        if action.choices is not None and out not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise DataError(f"{path}: {key}: {item!r} is not one of {choices}")
        return out

    return [convert(v) for v in value] if isinstance(value, list) else convert(value)


def load_yaml_config(path: str | Path, actions: dict[str, Any]) -> dict[str, Any]:
    """Read a flat YAML mapping of option -> value; keys no option knows and ill-typed values are errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(values, dict):
        raise DataError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise DataError(f"{path}: unknown option(s) {', '.join(unknown)} (see --help for the valid ones)")
    return {key: _typed(key, value, actions[key], path) for key, value in values.items()}


def cpu_only() -> bool:
    """True when torch sees no GPU (CUDA/ROCm, XPU or Apple MPS): training runs on the CPU."""
    import torch

    xpu = hasattr(torch, "xpu") and torch.xpu.is_available()
    return not (torch.cuda.is_available() or xpu or torch.backends.mps.is_available())


# TrainingArguments defaults every recipe shares; each recipe adds its own (DEFAULTS = {**TRAINER_DEFAULTS, ...}).
TRAINER_DEFAULTS: dict[str, Any] = {
    "report_to": "none",
    "seed": 42,
    # True (the transformers 5 default) multiplies the loss by the world size for models whose loss
    # takes no token count, BERT heads included: gradients and logged losses come out N times too
    # large in a multi-process run (transformers issue #37474).
    "average_tokens_across_devices": False,
    # Every parameter of the recipes' models gets a gradient at every step (LoRA's frozen base weights
    # are not "unused": DDP skips them as not requiring grad), so DDP need not search the autograd
    # graph for unused ones after each backward (None, the default, searches and warns on every
    # rank). A model whose batches leave some parameters out (a multi-task model fed one task at a
    # time) sets it back to True.
    "ddp_find_unused_parameters": False,
    # A resumed run continues early stopping where it was (its patience counter is in the checkpoint);
    # without it a run killed after a non-improving epoch trains longer than the uninterrupted one.
    "restore_callback_states_from_checkpoint": True,
    # Without a GPU, use_cpu makes accelerate set up a multi-process launch (accelerate --multi_gpu,
    # torchrun) as gloo ranks with DDP (ddp_backend=gloo alone gives ranks that never sync gradients),
    # and lets `--bf16 true` train in bf16 autocast on the CPU.
    "use_cpu": cpu_only(),
}


@dataclass
class Options:
    """Where each option's value came from, and what the recipe decided after parsing.

    `origins[name]` is `default` (the dataclass), `recipe` (the recipe's defaults), `config` (the YAML
    file) or `cli`; `decided[name]` holds `value`, `was`, `origin` (of the value it replaced) and `why`.
    """

    origins: dict[str, str]
    config_file: str | None = None
    decided: dict[str, dict[str, Any]] = field(default_factory=dict)

    def user_set(self, name: str) -> bool:
        """True if the YAML file or the command line gave `name`."""
        return self.origins.get(name) in USER_ORIGINS

    def decide(self, args: T, why: str, *, override_user: bool = False, **values: Any) -> T:
        """A copy of `args` with `values` applied to the options the user did not set (all of them
        with `override_user`), each logged with `why` and recorded in `decided`."""
        changes = {}
        for name, value in values.items():
            was = getattr(args, name)
            if (self.user_set(name) and not override_user) or value == was:
                continue
            changes[name] = value
            self.decided[name] = {"value": value, "was": was, "origin": self.origins[name], "why": why}
            logger.info("%s = %r (was %r, %s): %s", name, value, was, self.origins[name], why)
        return dataclasses.replace(args, **changes) if changes else args

    def record(self, *args: Any) -> dict[str, Any]:
        """For the run directory: the options the user set, with their final values, and the decisions."""
        final = to_dict(*args)
        return {
            "config_file": self.config_file,
            "set_by_user": {
                k: {"value": final.get(k), "origin": o} for k, o in self.origins.items() if o in USER_ORIGINS
            },
            "decided": self.decided,
        }


def parse_args(
    types: tuple[type, ...],
    argv: list[str] | None = None,
    defaults: dict[str, Any] | None = None,
    description: str | None = None,
) -> tuple[tuple[Any, ...], Options]:
    """Parse argv into one instance per dataclass in `types`, plus the `Options` record.

    Precedence, lowest first: dataclass defaults, `defaults` (the recipe's own choices), the YAML
    file given with `--config`, then the command line. Unknown keys fail both in YAML and on the
    command line; YAML values are checked against the option's type (a YAML boolean is a bool).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(types, description=description)
    parser.add_argument("--config", metavar="FILE", help="YAML file of option: value defaults; CLI wins")
    actions: dict[str, Any] = {}
    for action in parser._actions:  # the first action per option: `--no_x` complements come after `--x`
        if action.option_strings and action.dest not in ("help", "config"):
            actions.setdefault(action.dest, action)
    config_path, rest = _split_config_flag(argv)
    if any(arg in ("-h", "--help") for arg in rest):
        parser.set_defaults(**(defaults or {}))  # --help shows the recipe's defaults
        parser.parse_args(["--help"])  # prints and exits

    # Which options the command line gives: parse with every default replaced by a marker.
    parser.set_defaults(**dict.fromkeys(actions, _UNSET))
    namespace, remaining = parser.parse_known_args(rest)
    if remaining:
        raise DataError(f"unknown option(s) on the command line: {' '.join(remaining)} (see --help)")
    cli = {k: v for k, v in vars(namespace).items() if k in actions and v is not _UNSET}

    merged: dict[str, Any] = {}
    origins = dict.fromkeys(actions, "default")
    layers = [("recipe", dict(defaults or {}))]
    if config_path:
        layers.append(("config", load_yaml_config(config_path, actions)))
    layers.append(("cli", cli))
    for origin, values in layers:
        merged.update(values)
        origins.update(dict.fromkeys(values, origin))
    try:
        parsed = parser.parse_dict(merged)
    except ValueError as err:  # the dataclasses' own checks (e.g. TrainingArguments.__post_init__)
        raise DataError(f"invalid options: {err}") from None
    options = Options(origins=origins, config_file=config_path)
    return tuple(parsed), options


def to_dict(*args: Any) -> dict[str, Any]:
    """Flatten parsed dataclasses into one plain dict (for config.yaml in the run directory)."""
    out: dict[str, Any] = {}
    for a in args:
        d = a.to_dict() if hasattr(a, "to_dict") else dataclasses.asdict(a)
        out.update({k: v for k, v in d.items() if not k.startswith("_")})
    return out
