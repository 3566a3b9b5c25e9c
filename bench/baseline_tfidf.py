"""TF-IDF (1-2 grams) + linear SVM on exactly the split the recipes use: the bar fine-tuning must clear.

    python bench/baseline_tfidf.py                          # rotten-tomatoes and bbc-news
    python bench/baseline_tfidf.py --datasets rotten-tomatoes

The split comes from `ftkit.data.load_text_splits` with the recipes' defaults (dedupe, stratified
80/10/10, seed 42), so the test set is the one the recipes report on. The SVM's C is fixed (1.0),
not tuned, like the reference figure it reproduces. Prints accuracy, macro-F1 and seconds per
dataset and writes bench/results/<date>-<host>-tfidf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time
from pathlib import Path

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.metrics import accuracy_score, f1_score
from sklearn.svm import LinearSVC

from ftkit.data import load_text_splits
from ftkit.hardware import cpu_info


def run(dataset: str, seed: int) -> dict:
    splits, stats = load_text_splits(dataset_name=dataset, split_seed=seed)
    texts = {s: [r["text"] for r in rows] for s, rows in splits.items()}
    labels = {s: [str(r["label"]) for r in rows] for s, rows in splits.items()}
    start = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    clf = LinearSVC(C=1.0).fit(vectorizer.fit_transform(texts["train"]), labels["train"])
    fit_seconds = time.perf_counter() - start
    out = {"dataset": dataset, "rows": stats.rows, "fit_seconds": round(fit_seconds, 2)}
    for split in ("validation", "test"):
        pred = clf.predict(vectorizer.transform(texts[split]))
        out[f"{split}_accuracy"] = round(float(accuracy_score(labels[split], pred)), 4)
        out[f"{split}_macro_f1"] = round(float(f1_score(labels[split], pred, average="macro")), 4)
    out["total_seconds"] = round(time.perf_counter() - start, 2)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=["rotten-tomatoes", "bbc-news"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out_dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    results = []
    for dataset in args.datasets:
        r = run(dataset, args.seed)
        results.append(r)
        print(
            f"{dataset:16s} test accuracy {r['test_accuracy']:.4f}  macro-F1 {r['test_macro_f1']:.4f}  "
            f"(validation {r['validation_accuracy']:.4f})  fit {r['fit_seconds']:.1f} s  rows {r['rows']}"
        )
    host = socket.gethostname()
    path = Path(args.out_dir) / f"{time.strftime('%Y-%m-%d')}-{host}-tfidf.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": host,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "machine": cpu_info(),  # CPU model and flags
        "model": "TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True) + LinearSVC(C=1.0)",
        "results": results,
    }
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"written: {path}")
    return results


if __name__ == "__main__":
    main()
