"""A reference baseline beside every run, fitted on the same training rows and scored on the same
validation and test rows as the fine-tuned model: TF-IDF (word 1-2 grams) + a linear model for texts,
each word's most frequent training tag for NER. Sentence pairs get TF-IDF of each side, their
elementwise product (the words both sides share) and its sum, the cosine similarity, side by side,
then the same linear model. It takes seconds and shows a broken or under-trained
run at once (BBC News: TF-IDF + LinearSVC 0.986 test accuracy against the old default's 0.967).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict

import numpy as np

from ftkit.data import label_key, label_maps, label_targets, pair_texts, rating
from ftkit.metrics import classification_scores, regression_scores
from ftkit.multilabel import MULTI_LABEL

logger = logging.getLogger(__name__)

# The figure each task compares, and whether higher is better.
MAIN_METRIC = {
    "text-classification": ("accuracy", True),
    "regression": ("rmse", False),
    "token-classification": ("f1", True),
    MULTI_LABEL: ("micro_f1", True),
}
BASELINE_NAMES = {
    "text-classification": "TF-IDF (word 1-2 grams) + LinearSVC",
    "regression": "TF-IDF (word 1-2 grams) + ridge regression",
    "token-classification": "each word's most frequent training tag",
    MULTI_LABEL: "TF-IDF (word 1-2 grams) + one-vs-rest logistic regression, thresholds tuned on validation",
}


PAIR_FEATURES = "TF-IDF of each side + their elementwise product + cosine"


def pair_features(vectorizer, rows: list[dict]):
    """[tfidf(text), tfidf(pair), tfidf(text) * tfidf(pair), cosine] side by side. One vocabulary for
    both sides, so the product is non-zero on the words and bigrams the two texts share. The product is
    scaled to unit length per row: raw, its entries (products of two unit vectors' entries) are so small
    that the linear model's regularisation ignores them (synthetic paraphrase test: 0.57 accuracy raw,
    1.0 scaled with the cosine). The cosine (the raw product's sum) keeps how much the texts share."""
    from scipy.sparse import csr_matrix, hstack
    from sklearn.preprocessing import normalize

    first = vectorizer.transform([r["text"] for r in rows])
    second = vectorizer.transform(pair_texts(rows))
    product = first.multiply(second).tocsr()
    cosine = csr_matrix(np.asarray(product.sum(axis=1)))
    return hstack([first, second, normalize(product), cosine]).tocsr()


def tfidf_features(train: list[dict]):
    """(training matrix, transform for other rows): TF-IDF (word 1-2 grams) fitted on `train`, or
    `pair_features` for sentence-pair rows (one vocabulary fitted on both sides)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    if pair_texts(train) is not None:
        vectorizer.fit([r["text"] for r in train] + pair_texts(train))
        return pair_features(vectorizer, train), lambda rows: pair_features(vectorizer, rows)
    x_train = vectorizer.fit_transform([r["text"] for r in train])
    return x_train, lambda rows: vectorizer.transform([r["text"] for r in rows])


def text_baseline(splits: dict[str, list[dict]], task: str) -> dict[str, float]:
    """`baseline_{eval,test}_*` scores of TF-IDF + LinearSVC (classification: accuracy, macro_f1) or
    + ridge (regression: rmse, pearson, ...), fitted on `splits["train"]`, scored on validation and test.
    Sentence-pair rows (`text_pair`) use `pair_features`."""
    from sklearn.linear_model import Ridge
    from sklearn.svm import LinearSVC

    start = time.perf_counter()
    x_train, features = tfidf_features(splits["train"])
    if task == "regression":
        model = Ridge(alpha=1.0).fit(x_train, [rating(r) for r in splits["train"]])
    else:
        names = sorted({label_key(r["label"]) for r in splits["train"]})
        ids = {n: i for i, n in enumerate(names)}
        model = LinearSVC(C=1.0).fit(x_train, [ids[label_key(r["label"])] for r in splits["train"]])
    out: dict[str, float] = {}
    for split, prefix in (("validation", "eval"), ("test", "test")):
        pred = model.predict(features(splits[split]))
        if task == "regression":
            scores = regression_scores([rating(r) for r in splits[split]], pred)
        else:
            # A class the baseline never saw in train counts as wrong (-1 matches no prediction).
            gold = np.array([ids.get(label_key(r["label"]), -1) for r in splits[split]])
            scores = classification_scores(gold, pred, len(names))
        out |= {f"baseline_{prefix}_{k}": v for k, v in scores.items()}
        out[f"baseline_{prefix}_rows"] = len(splits[split])
    out["baseline_seconds"] = time.perf_counter() - start
    return out


def multi_label_baseline(splits: dict[str, list[dict]]) -> dict[str, float]:
    """`baseline_{eval,test}_*` multi-label scores (micro_f1, macro_f1, ...) of TF-IDF + one logistic
    regression per label, each label's threshold tuned on the validation rows as the model's are.

    Logistic regression rather than LinearSVC: its probabilities take the same threshold rule and
    fallback (`ftkit.multilabel.tune_thresholds`). Labels that occur only outside train are columns
    the baseline never predicts (scored as misses)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from ftkit.metrics import multi_label_scores
    from ftkit.multilabel import tune_thresholds

    start = time.perf_counter()
    label2id, _ = label_maps([r["label"] for rows in splits.values() for r in rows])
    targets = {split: np.asarray(t) for split, t in label_targets(splits, label2id).items()}
    x_train, features = tfidf_features(splits["train"])  # sentence pairs: `pair_features`
    seen = targets["train"].sum(axis=0) > 0  # only labels with training rows get a model
    model = OneVsRestClassifier(LogisticRegression(solver="liblinear")).fit(
        x_train, targets["train"][:, seen]
    )
    out: dict[str, float] = {}
    thresholds = None
    for split, prefix in (("validation", "eval"), ("test", "test")):
        probs = np.zeros(targets[split].shape)
        probs[:, seen] = model.predict_proba(features(splits[split]))
        if thresholds is None:  # validation comes first: test is scored at its thresholds
            thresholds = tune_thresholds(probs, targets[split])
        scores = multi_label_scores(targets[split], probs >= thresholds)
        out |= {f"baseline_{prefix}_{k}": v for k, v in scores.items()}
        out[f"baseline_{prefix}_rows"] = len(splits[split])
    out["baseline_seconds"] = time.perf_counter() - start
    return out


def most_frequent_tags(train: list, sentences: list) -> list[list[str]]:
    """Each word's most frequent tag in `train` (exact form, else lowercased, else O), with an I- tag
    that follows no entity of its type made B- so that the sequence is valid IOB2."""
    exact: dict[str, Counter] = defaultdict(Counter)
    lower: dict[str, Counter] = defaultdict(Counter)
    for s in train:
        for word, tag in zip(s.tokens, s.tags, strict=True):
            exact[word][tag] += 1
            lower[word.lower()][tag] += 1
    out = []
    for s in sentences:
        tags, prev = [], "O"
        for word in s.tokens:
            counts = exact.get(word) or lower.get(word.lower())
            tag = counts.most_common(1)[0][0] if counts else "O"
            if tag.startswith("I-") and prev[2:] != tag[2:]:
                tag = "B-" + tag[2:]
            tags.append(tag)
            prev = tag
        out.append(tags)
    return out


def tag_baseline(splits: dict[str, list]) -> dict[str, float]:
    """`baseline_{eval,test}_{precision,recall,f1}` (entity-level, seqeval strict) of `most_frequent_tags`."""
    from ftkit.ner import entity_metrics

    out: dict[str, float] = {}
    for split, prefix in (("validation", "eval"), ("test", "test")):
        metrics = entity_metrics(
            [s.tags for s in splits[split]], most_frequent_tags(splits["train"], splits[split])
        )
        out |= {f"baseline_{prefix}_{k}": metrics[k] for k in ("precision", "recall", "f1")}
        out[f"baseline_{prefix}_rows"] = len(splits[split])
    return out


def baseline(splits: dict[str, list], task: str, results: dict[str, float]) -> dict[str, object]:
    """The task's baseline scores (see `text_baseline`, `tag_baseline`) compared with the fine-tuned
    model's test figure in `results`: adds `baseline_beaten` and, when the model does not beat the
    baseline, `baseline_warning` (also logged as a warning; the model card shows it)."""
    if task == MULTI_LABEL:
        out: dict[str, object] = dict(multi_label_baseline(splits))
    else:
        out = dict(tag_baseline(splits) if task == "token-classification" else text_baseline(splits, task))
    metric, higher = MAIN_METRIC[task]
    model, base = results[f"test_{metric}"], out[f"baseline_test_{metric}"]
    beaten = model > base if higher else model < base
    out["baseline_beaten"] = bool(beaten)
    name = BASELINE_NAMES[task]
    if task != "token-classification" and pair_texts(splits["train"]) is not None:
        name = name.replace("TF-IDF (word 1-2 grams)", f"{PAIR_FEATURES} (word 1-2 grams)")
    line = f"test {metric}: fine-tuned {model:.4f}, baseline ({name}) {base:.4f}"
    if beaten:
        logger.info("%s", line)
    else:
        out["baseline_warning"] = (
            f"the fine-tuned model does not beat the baseline ({line}): it may be under-trained, or the "
            "texts cut (see *_truncated and recipes/README.md, 'When the baseline wins')"
        )
        logger.warning("%s", out["baseline_warning"])
    return out
