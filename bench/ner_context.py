"""What document context and window overlap do at inference for a trained NER run.

    python bench/ner_context.py runs/ner/<run>                    # its validation split, several window settings
    python bench/ner_context.py runs/ner/<run> --file my_dev.conll

Scores the same model on the same words with windows of single sentences and of whole documents
(several sizes and strides) and prints entity F1 and seconds for each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ftkit.conll import load_conll2003, read_tagged_file
from ftkit.ner import decode_tags, entity_metrics, group_sentences, predict_word_logits, word_pieces
from ftkit.predict import load_run

SETTINGS = [("sentence", 256, 64), ("document", 256, 64), ("document", 256, 0), ("document", 128, 32)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir")
    parser.add_argument("--file", help="CoNLL/JSON file to score (default: CoNLL-2003 validation)")
    args = parser.parse_args()
    model, tokenizer, info = load_run(args.run_dir)
    sentences = read_tagged_file(args.file) if args.file else load_conll2003()["validation"]
    words, gold = [s.tokens for s in sentences], [s.tags for s in sentences]
    n_pieces = sum(len(p) for sent in word_pieces(tokenizer, words) for p in sent)
    results = []
    for context, max_length, stride in SETTINGS:
        start = time.perf_counter()
        groups = group_sentences([s.doc_id for s in sentences], context)
        logits = predict_word_logits(
            model, tokenizer, words, max_length, stride, 32, groups, info.get("case_feature", False)
        )
        pred = [decode_tags(x, info["labels"], info.get("decode", "viterbi")) for x in logits]
        m = entity_metrics(gold, pred)
        row = {"context": context, "max_length": max_length, "stride": stride, "f1": round(m["f1"], 4)}
        row["seconds"] = round(time.perf_counter() - start, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"({len(sentences)} sentences, {n_pieces} word sub-tokens)")
    out = Path(args.run_dir) / "bench_context.json"
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
