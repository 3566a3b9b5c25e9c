"""Trials of the sentiment recipe with one change it does not offer, before building the change in.

    python bench/sentiment_trial.py --pooling mean                # seeds 42 43 44, the default command
    python bench/sentiment_trial.py --seeds 42                    # the recipe as it is (the control)
    python bench/sentiment_trial.py --llrd 0.9 -- --learning_rate 2e-4   # recipe options after --

`--pooling mean`: all-MiniLM-L6-v2 was trained as a sentence encoder on the mean of its token vectors;
the recipes' `AutoModelForSequenceClassification` classifies from the pooler (dense + tanh of the first
token). The head reads the masked mean of the last hidden states instead (same dropout, same linear
classifier). Only the in-process test figures count: the saved model would reload with the CLS pooler.

`--llrd DECAY`: layer-wise learning-rate decay. The head and pooler train at the learning rate, each
encoder layer below at DECAY times the rate of the one above, the embeddings last (6 layers and 0.9:
0.9^7 = 0.48 of the rate). Weight decay and the schedule stay Trainer's.

Writes bench/results/<date>-<host>-trial-<change>.json (per seed and mean ± sd).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch.nn.functional as F
from seeds import summarize  # bench/seeds.py, beside this script
from transformers import BertForSequenceClassification, Trainer
from transformers.modeling_outputs import SequenceClassifierOutput

from ftkit.hardware import cpu_info

HERE = Path(__file__).resolve().parent
KEYS = ("test_accuracy", "test_macro_f1", "eval_accuracy", "baseline_test_accuracy")


class MeanPooledBert(BertForSequenceClassification):
    """BertForSequenceClassification whose head reads the masked mean of the last hidden states."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None):
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def llrd_groups(model, lr: float, decay: float, weight_decay: float, decay_names: set[str]) -> list[dict]:
    """Parameter groups with layer-wise learning rates: depth 0 embeddings, 1..L the encoder layers,
    L+1 everything above (pooler, classifier) at `lr`."""
    top = model.config.num_hidden_layers + 1
    groups: dict[tuple[int, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = re.search(r"\.layer\.(\d+)\.", name)
        depth = 0 if ".embeddings." in name else int(layer.group(1)) + 1 if layer else top
        wd = weight_decay if name in decay_names else 0.0
        groups.setdefault((depth, wd), []).append(param)
    return [
        {"params": params, "lr": lr * decay ** (top - depth), "weight_decay": wd}
        for (depth, wd), params in sorted(groups.items())
    ]


def llrd_trainer(decay: float) -> type[Trainer]:
    class LLRDTrainer(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                opt_model = self.model if model is None else model
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                names = set(self.get_decay_parameter_names(opt_model))
                groups = llrd_groups(opt_model, self.args.learning_rate, decay, self.args.weight_decay, names)
                self.optimizer = cls(groups, **kwargs)  # group lrs win over kwargs' lr
            return self.optimizer

    return LLRDTrainer


def run_one(seed: int, pooling: str, llrd: float | None, out: Path, extra: list[str]) -> None:
    sys.path.insert(0, str(HERE.parent / "recipes"))
    import sentiment

    if pooling == "mean":
        load = sentiment.load_model

        def load_mean_pooled(*args, **kwargs):
            model = load(*args, **kwargs)
            if not isinstance(model, BertForSequenceClassification):
                raise SystemExit(f"mean pooling trial: a BERT model is needed, got {type(model).__name__}")
            model.__class__ = MeanPooledBert  # same modules and weights; only forward differs
            return model

        sentiment.load_model = load_mean_pooled
    if llrd is not None:
        sentiment.Trainer = llrd_trainer(llrd)  # the recipe builds its Trainer from this module name
    sentiment.main(["--seed", str(seed), "--output_dir", str(out), "--disable_tqdm", "true", *extra])


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pooling", choices=["mean", "cls"], default="cls")
    parser.add_argument("--llrd", type=float, help="layer-wise learning-rate decay per layer (e.g. 0.9)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one seed in this process
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="result JSON")
    args = parser.parse_args(own)
    if args.one is not None:
        run_one(args.one, args.pooling, args.llrd, Path(args.dir), extra)
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    change = f"pooling-{args.pooling}" + (f"-llrd{args.llrd:g}" if args.llrd is not None else "")
    runs, walls = [], []
    for seed in args.seeds:
        out = HERE / "runs" / f"trial-{change}-{stamp}-{seed}"
        cmd = [sys.executable, __file__, "--pooling", args.pooling, "--one", str(seed), "--dir", str(out)]
        cmd += ["--llrd", str(args.llrd)] if args.llrd is not None else []
        start = time.time()
        subprocess.run([*cmd, "--", *extra], check=True)
        walls.append(round(time.time() - start, 1))
        res = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
        runs.append({"seed": seed, **{k: res.get(k) for k in KEYS}, "precision": res.get("precision")})
        print(json.dumps(runs[-1]), flush=True)
    summary = summarize(runs)  # the test and baseline figures, as bench/seeds.py reports them
    for k, s in summary.items():
        print(f"{k:28s} {s['mean']:.4f} ± {s['sd']:.4f}")
    date, host = time.strftime("%Y-%m-%d"), socket.gethostname()
    result = {
        "pooling": args.pooling,
        "llrd": args.llrd,
        "args": extra,
        "date": date,
        "host": host,
        "wall_seconds": walls,
    }
    result |= {"machine": {**cpu_info(), "load_at_end": os.getloadavg()}}
    result |= {"runs": runs, "summary": summary}
    path = Path(args.out) if args.out else HERE / "results" / f"{date}-{host}-trial-{change}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
