"""Inference cost of one multi-task run against the single-task runs it replaces: texts/s and MB.

    python bench/multitask_cost.py --multi runs/multitask/<run> --single runs/ner/<run> runs/multitask/<pos run> \
        runs/multitask/<chunk run> --texts 500
    python bench/multitask_cost.py --multi runs/multitask/<run>    # single-task models cut from the run itself

Without `--single`, each head with a copy of the shared encoder is saved as its own one-head run: the
same architecture as a single-task model (the weights do not change the cost).

Texts are the first N CoNLL-2003 test sentences as plain text (words joined by spaces), predicted the
way `ftkit predict` does (`predict_entities` for NER runs, `predict_multitask` for multi-task runs),
batch 32, torch's fp32 path on this CPU's threads. The single-task runs are timed one after the other:
their texts/s is N over the sum of their times. Run it under the measurement lock; it prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from ftkit.conll import load_conll2003
from ftkit.hardware import cpu_info
from ftkit.multitask import predict_multitask
from ftkit.ner import predict_entities
from ftkit.predict import load_run


def cost(run_dir: str, texts: list[str], repeats: int) -> dict:
    """Best-of-`repeats` seconds to predict `texts` with the run, and its weights' size in MB."""
    model, tokenizer, info = load_run(run_dir)
    predict = predict_multitask if info["task"] == "multi-task" else predict_entities
    origins = [str(i) for i in range(len(texts))]
    predict(model, tokenizer, texts[:32], origins[:32], info)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        predict(model, tokenizer, texts, origins, info)
        best = min(best, time.perf_counter() - start)
    weights = [p for p in Path(run_dir).glob("**/*.safetensors") if "checkpoints" not in p.parts]
    heads = list(info["heads"]) if "heads" in info else ["ner"]
    return {
        "run": run_dir,
        "heads": heads,
        "seconds": best,
        "mb": sum(p.stat().st_size for p in weights) / 1e6,
    }


def one_head_runs(run_dir: str) -> list[str]:
    """One run directory per head of a multi-task run: the shared encoder (copied) with that head only."""
    import copy
    import shutil
    import tempfile

    from ftkit.multitask import MultiTaskTagger

    model, tokenizer, info = load_run(run_dir)
    out = []
    for head in info["heads"]:
        single = MultiTaskTagger(copy.deepcopy(model.encoder), {head: info["heads"][head]})
        single.heads.linears[head].load_state_dict(model.heads.linears[head].state_dict())
        path = Path(tempfile.mkdtemp(prefix=f"one-head-{head}-"))
        single.save_pretrained(path)
        tokenizer.save_pretrained(path)
        shutil.copy(Path(run_dir) / "ftkit_run.json", path / "ftkit_run.json")
        run = json.loads((path / "ftkit_run.json").read_text())
        run["heads"] = {head: info["heads"][head]}
        (path / "ftkit_run.json").write_text(json.dumps(run))
        out.append(str(path))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--multi", required=True, help="the multi-task run directory")
    parser.add_argument(
        "--single", nargs="*", help="the single-task run directories (default: cut from --multi)"
    )
    parser.add_argument("--texts", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    texts = [" ".join(s.tokens) for s in load_conll2003()["test"][: args.texts]]
    multi = cost(args.multi, texts, args.repeats)
    singles = [cost(r, texts, args.repeats) for r in args.single or one_head_runs(args.multi)]
    single_seconds = sum(s["seconds"] for s in singles)
    out = {
        "machine": {**cpu_info(), "load": os.getloadavg()},
        "threads": torch.get_num_threads(),
        "texts": len(texts),
        "multi": {**multi, "texts_per_second": len(texts) / multi["seconds"]},
        "single": singles,
        "single_total": {
            "texts_per_second": len(texts) / single_seconds,
            "mb": sum(s["mb"] for s in singles),
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
