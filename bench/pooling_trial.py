"""Trial: mean pooling against the CLS pooler in the sentiment recipe, before building it in.

    python bench/pooling_trial.py --pooling mean                  # seeds 42 43 44, the default command
    python bench/pooling_trial.py --pooling cls --seeds 42        # the recipe as it is (the control)
    python bench/pooling_trial.py --pooling mean -- --learning_rate 5e-5   # recipe options after --

all-MiniLM-L6-v2 was trained as a sentence encoder on the mean of its token vectors; the recipes'
`AutoModelForSequenceClassification` classifies from the pooler (dense + tanh of the first token).
This script runs `recipes/sentiment.py` unchanged except for the head's input: the masked mean of the
last hidden states instead of the pooler's output (same dropout, same linear classifier). Only the
in-process test figures count here: the saved model directory would reload with the CLS pooler.
Writes bench/results/<date>-<host>-pooling-<pooling>.json (per seed and mean ± sd).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch.nn.functional as F
from seeds import summarize  # bench/seeds.py, beside this script
from transformers import BertForSequenceClassification
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


def run_one(seed: int, pooling: str, out: Path, extra: list[str]) -> None:
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
    sentiment.main(["--seed", str(seed), "--output_dir", str(out), "--disable_tqdm", "true", *extra])


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pooling", choices=["mean", "cls"], required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one seed in this process
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="result JSON")
    args = parser.parse_args(own)
    if args.one is not None:
        run_one(args.one, args.pooling, Path(args.dir), extra)
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs, walls = [], []
    for seed in args.seeds:
        out = HERE / "runs" / f"pooling-{args.pooling}-{stamp}-{seed}"
        cmd = [sys.executable, __file__, "--pooling", args.pooling, "--one", str(seed), "--dir", str(out)]
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
    result = {"pooling": args.pooling, "args": extra, "date": date, "host": host, "wall_seconds": walls}
    result |= {"machine": {**cpu_info(), "load_at_end": os.getloadavg()}}
    result |= {"runs": runs, "summary": summary}
    path = Path(args.out) if args.out else HERE / "results" / f"{date}-{host}-pooling-{args.pooling}.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
