"""Task metrics of held-out answers and labels.

Generated answers are scored against their reference three ways: ROUGE-L (longest
common subsequence F-measure, from the `rouge-score` package, which lowercases and
keeps ASCII letters and digits), and exact match and token F1 after the SQuAD
normalisation (lowercase, no punctuation, no articles, single spaces), so that
"The Eiffel Tower." and "eiffel tower" are the same answer. Classification is scored
by accuracy and macro-F1 from a confusion matrix, which sums exactly over ranks.
"""

from __future__ import annotations

import collections
import functools
import logging
import re
import string

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over the normalised words (a bag:
    a repeated word counts as often as it is in both). Two empty answers agree."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((collections.Counter(predicted) & collections.Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer

    logging.getLogger("absl").setLevel(logging.WARNING)  # it announces its default tokenizer at INFO
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
    return _rouge_scorer().score(reference, prediction)["rougeL"].fmeasure


def answer_scores(prediction: str, reference: str) -> dict[str, float]:
    return {"rougeL": rouge_l(prediction, reference), "exact_match": exact_match(prediction, reference),
            "f1": token_f1(prediction, reference)}


def mean_answer_scores(scored: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each score over the answers of one data set."""
    return {key: sum(s[key] for s in scored) / len(scored) for key in scored[0]} if scored else {}


def classification_scores(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and macro-F1 from confusion[true, predicted] counts. The macro average
    runs over the classes that occur as a reference or a prediction (as scikit-learn's
    does), so a class absent from the eval set does not count as a zero."""
    confusion = confusion.double()
    total = float(confusion.sum())
    correct = confusion.diagonal()
    true_count, predicted_count = confusion.sum(1), confusion.sum(0)
    present = (true_count + predicted_count) > 0
    f1 = 2 * correct / (true_count + predicted_count).clamp(min=1)
    return {"accuracy": float(correct.sum()) / max(total, 1.0),
            "macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0}
