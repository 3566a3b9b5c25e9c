"""Does --augment help where it can: small training subsets, with and without, the same held-out rows.

    python bench/augment_lowres.py --task textcls --sizes 100 500 --seeds 42 43 44
    python bench/augment_lowres.py --task sentiment --sizes 100 500
    python bench/augment_lowres.py --task ner --sizes 500 1000
    python bench/augment_lowres.py --table            # markdown table of every result so far
    python bench/augment_lowres.py --task sentiment --sizes 100 500 --tfidf   # seconds: TF-IDF + LinearSVC proxy

Each case builds its files once under runs/augment_lowres/data/: the recipe's standard split (seed 42:
BBC News and Rotten Tomatoes 80/10/10 after dedupe, CoNLL-2003's own), then a fixed stratified subset
of `size` training texts (CoNLL: whole documents, drawn with seed 0, cut at `size` sentences) and the
validation and test rows unchanged (CoNLL: the first documents of each up to VALID/TEST_SENTENCES,
to keep a run short on a shared CPU). Then the recipe runs on those files, without and with
`--augment`, for each `--seed` (the seed moves the new head, batch order and augmentation draws; the
rows stay the same). Both settings train for the same number of epochs, so with copies the augmented
run takes more steps. One evaluation at the end (no best-model selection). Results (test metric,
validation metric, rows added) go to bench/results/augment_lowres.jsonl, one line per run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from ftkit.conll import load_tagged_splits, write_conll  # noqa: E402
from ftkit.data import load_text_splits  # noqa: E402

OUT = ROOT / "runs" / "augment_lowres"
RESULTS = ROOT / "bench" / "results" / "augment_lowres.jsonl"
VALID_SENTENCES, TEST_SENTENCES = 500, 1000

# Per task: the built-in dataset, the augmentation measured, and training options for a small set
# (evaluation only at the end; a fixed number of epochs).
CASES = {
    "textcls": {
        "dataset": "bbc-news",
        "augment": [
            "--augment",
            "delete,swap,insert,synonym",
            "--augment_rate",
            "0.1",
            "--augment_copies",
            "1",
        ],
        "train": ["--num_train_epochs", "5"],
        "metric": "accuracy",
    },
    "sentiment": {
        "dataset": "rotten-tomatoes",
        "augment": [
            "--augment",
            "delete,swap,insert,synonym",
            "--augment_rate",
            "0.1",
            "--augment_copies",
            "1",
        ],
        "train": ["--num_train_epochs", "5", "--per_device_train_batch_size", "16"],
        "metric": "accuracy",
    },
    "ner": {
        "dataset": "conll2003",
        "augment": ["--augment", "mention,token", "--augment_rate", "0.3", "--augment_copies", "1"],
        "train": ["--num_train_epochs", "6"],
        "metric": "f1",
    },
}
COMMON = ["--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
          "--disable_tqdm", "true", "--logging_steps", "50"]  # fmt: skip


def stratified_subset(rows: list[dict], size: int, seed: int = 0) -> list[dict]:
    """`size` rows with the label shares of `rows` (largest remainders), drawn with `seed`, in file order."""
    rng = np.random.default_rng(seed)
    labels = sorted({r["label"] for r in rows})
    by_label = {y: [i for i, r in enumerate(rows) if r["label"] == y] for y in labels}
    quota = {y: size * len(ix) / len(rows) for y, ix in by_label.items()}
    take = {y: int(q) for y, q in quota.items()}
    for y in sorted(labels, key=lambda y: take[y] - quota[y])[: size - sum(take.values())]:
        take[y] += 1
    picked = sorted(i for y, ix in by_label.items() for i in rng.choice(ix, take[y], replace=False))
    return [rows[i] for i in picked]


def first_sentences(sentences: list, n: int) -> list:
    """The first whole documents up to `n` sentences (at least one document)."""
    out = []
    for s in sentences:
        if len(out) >= n and s.doc_id != out[-1].doc_id:
            break
        out.append(s)
    return out


def document_subset(sentences: list, size: int, seed: int = 0) -> list:
    """Whole documents drawn at random with `seed` until `size` sentences (the last one cut)."""
    docs: dict[int, list] = {}
    for s in sentences:
        docs.setdefault(s.doc_id, []).append(s)
    order = np.random.default_rng(seed).permutation(sorted(docs))
    out = [s for d in order for s in docs[d]]
    return out[:size]


def build(task: str, size: int) -> dict[str, Path]:
    """The case's train/validation/test files (built once)."""
    folder = OUT / "data" / f"{task}-{size}"
    ext = "conll" if task == "ner" else "jsonl"
    files = {split: folder / f"{split}.{ext}" for split in ("train", "validation", "test")}
    if all(f.is_file() for f in files.values()):
        return files
    folder.mkdir(parents=True, exist_ok=True)
    if task == "ner":
        splits, _ = load_tagged_splits(dataset_name="conll2003", split_seed=42)
        parts = {"train": document_subset(splits["train"], size), "validation": first_sentences(
            splits["validation"], VALID_SENTENCES), "test": first_sentences(splits["test"], TEST_SENTENCES)}  # fmt: skip
        for split, sentences in parts.items():
            write_conll(files[split], sentences)
    else:
        splits, _ = load_text_splits(dataset_name=CASES[task]["dataset"], split_seed=42)
        parts = {
            "train": stratified_subset(splits["train"], size),
            **{s: splits[s] for s in ("validation", "test")},
        }
        for split, rows in parts.items():
            lines = [json.dumps({"text": r["text"], "label": r["label"]}, ensure_ascii=False) for r in rows]
            files[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files


def equal_steps(case: dict) -> list[str]:
    """The case's training options with (1 + copies) times the epochs: a plain run that takes as many
    optimizer steps as the augmented one (which trains on 1 + copies rows per original row)."""
    train, flags = list(case["train"]), case["augment"]
    copies = int(flags[flags.index("--augment_copies") + 1])
    i = train.index("--num_train_epochs") + 1
    train[i] = str(int(train[i]) * (1 + copies))
    return train


def run(
    task: str, size: int, seed: int, augment: bool, same_steps: bool = False, precision: str | None = None
) -> dict:
    case, files = CASES[task], build(task, size)
    name = "aug" if augment else "plain-same-steps" if same_steps else "plain"
    out = OUT / f"{task}-{size}-seed{seed}-{name}"
    train = equal_steps(case) if same_steps else case["train"]
    args = ["--train_file", str(files["train"]), "--validation_file", str(files["validation"]),
            "--test_file", str(files["test"]), "--output_dir", str(out), "--seed", str(seed),
            *COMMON, *train, *(case["augment"] if augment else []),
            *(["--precision", precision] if precision else [])]  # fmt: skip
    cmd = [sys.executable, str(ROOT / "recipes" / f"{task}.py"), *args]
    started = datetime.datetime.now(datetime.UTC)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    results = json.loads((out / "all_results.json").read_text())
    metric = case["metric"]
    record = {
        "task": task, "size": size, "seed": seed, "augment": " ".join(case["augment"]) if augment else "",
        "epochs": float(train[train.index("--num_train_epochs") + 1]), "same_steps": same_steps,
        f"test_{metric}": results[f"test_{metric}"], f"eval_{metric}": results[f"eval_{metric}"],
        "precision": results.get("precision"), "rows_added": results.get("augment_rows_added", 0),
        "train_rows": results.get("augment_train_rows", size),
        "started": started.isoformat(timespec="seconds"), "cpu": cpu_name(), "load": os.getloadavg(),
        "command": "python recipes/" + f"{task}.py " + " ".join(a if " " not in a else repr(a) for a in args),
    }  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return record


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def table() -> str:
    """Mean ± sd test metric over seeds, per task and size: without augmentation (same epochs, and
    as many optimizer steps as the augmented run), and with it."""
    records = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.is_file() else []
    lines = [
        "| task | train rows | metric | seeds | without | without, as many steps | with --augment | gain over same epochs | gain over same steps |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for task in CASES:
        metric = f"test_{CASES[task]['metric']}"
        for size in sorted({r["size"] for r in records if r["task"] == task}):
            by = {k: {} for k in ("plain", "steps", "aug")}  # the last record of a seed wins
            for r in records:
                if r["task"] == task and r["size"] == size:
                    kind = "aug" if r["augment"] else "steps" if r.get("same_steps") else "plain"
                    by[kind][r["seed"]] = r[metric]
            seeds = sorted(set(by["plain"]) & set(by["aug"]))
            if not seeds:
                continue
            ctrl = sorted(set(seeds) & set(by["steps"]))
            a, b = (np.array([by[k][s] for s in seeds]) for k in ("plain", "aug"))
            cell = lambda v: f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}"  # noqa: E731
            gain = lambda x, y, n: f"{(y - x).mean():+.4f} ({sum(y > x)}/{n} seeds up)"  # noqa: E731
            steps, over_steps = "not run", "not run"
            if ctrl:
                c = np.array([by["steps"][s] for s in ctrl])
                bc = np.array([by["aug"][s] for s in ctrl])
                steps = cell(c) + ("" if ctrl == seeds else f" (seeds {','.join(map(str, ctrl))})")
                over_steps = gain(c, bc, len(ctrl))
            lines.append(
                f"| {task} | {size} | {metric} | {','.join(map(str, seeds))} | {cell(a)} | {steps} | "
                f"{cell(b)} | {gain(a, b, len(seeds))} | {over_steps} |"
            )
    return "\n".join(lines)


def tfidf_proxy(task: str, sizes: list[int], seeds: list[int], copies: int) -> list[str]:
    """The same subsets and text augmentation, scored with TF-IDF (1-2 grams) + LinearSVC: seconds
    instead of minutes, a proxy for the edits themselves, not for fine-tuning. Markdown table rows."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.svm import LinearSVC

    from ftkit.augment import AugmentArguments, augment_texts

    def accuracy(train: list[dict], test: list[dict]) -> float:
        vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
        clf = LinearSVC(C=1.0, random_state=0).fit(
            vectorizer.fit_transform([r["text"] for r in train]), [r["label"] for r in train]
        )
        return float(
            np.mean(
                clf.predict(vectorizer.transform([r["text"] for r in test])) == [r["label"] for r in test]
            )
        )

    flags = CASES[task]["augment"]
    methods, rate = flags[flags.index("--augment") + 1], float(flags[flags.index("--augment_rate") + 1])
    rows = []
    for size in sizes:
        files = build(task, size)
        train, test = (
            [
                {**json.loads(line), "origin": f"{s}:{i}"}
                for i, line in enumerate(files[s].read_text().splitlines())
            ]
            for s in ("train", "test")
        )
        plain = accuracy(train, test)
        gains = np.array([accuracy(augment_texts(train, AugmentArguments(methods, rate, copies), seed)[0], test)
                          for seed in seeds]) - plain  # fmt: skip
        rows.append(f"| {task} | {size} | {methods}, rate {rate}, copies {copies} | {','.join(map(str, seeds))} | "
                    f"{plain:.4f} | {plain + gains.mean():.4f} ({plain + gains.min():.4f}-{plain + gains.max():.4f}) | "
                    f"{gains.mean():+.4f} ({sum(gains > 0)}/{len(seeds)} seeds up) |")  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=list(CASES))
    parser.add_argument("--sizes", type=int, nargs="+", default=[100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument(
        "--table", action="store_true", help="print the table of bench/results/augment_lowres.jsonl"
    )
    parser.add_argument(
        "--tfidf", action="store_true", help="score with TF-IDF + LinearSVC instead (a proxy)"
    )
    parser.add_argument("--copies", type=int, default=1, help="--tfidf: augmented copies per row")
    parser.add_argument(
        "--same_steps",
        action="store_true",
        help="run only the control: without augmentation, (1 + copies) x the epochs (the augmented run's steps)",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="passed to the recipe (default: the recipe's own); the chosen one is recorded",
    )
    args = parser.parse_args()
    if args.tfidf:
        tfidf_proxy(args.task, args.sizes, args.seeds, args.copies)
        return
    if args.table or not args.task:
        print(table())
        return
    for size in args.sizes:
        for seed in args.seeds:
            if args.same_steps:
                run(args.task, size, seed, augment=False, same_steps=True, precision=args.precision)
                continue
            for augment in (False, True):
                run(args.task, size, seed, augment, precision=args.precision)


if __name__ == "__main__":
    main()
