"""Task metrics of held-out answers and labels.

Generated answers are scored against their reference with the metrics each eval set
names (`data.eval.metrics`, per set `data.eval.sets.N.metrics`): per answer, then
averaged over the set, ROUGE-L (longest common subsequence F-measure, from the
`rouge-score` package, which lowercases and keeps ASCII letters and digits), and exact
match and token F1 after the SQuAD normalisation (lowercase, no punctuation, no articles,
single spaces), so that "The Eiffel Tower." and "eiffel tower" are the same answer; over
the whole set at once, BLEU and chrF as sacrebleu computes its corpus scores (0-100, its
default settings: BLEU-4 with the 13a tokenizer and exponential smoothing, chrF with
character 6-grams and beta 2), the numbers translation papers report. Classification is
scored by accuracy and macro-F1 from a confusion matrix, which sums exactly over ranks.
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


PER_ANSWER = {"rouge_l": ("rougeL", rouge_l), "exact_match": ("exact_match", exact_match),
              "token_f1": ("f1", token_f1)}
CORPUS = ("bleu", "chrf")
ALL_ANSWER_METRICS = ("rouge_l", "exact_match", "token_f1")


def answer_scores(prediction: str, reference: str, metrics=ALL_ANSWER_METRICS) -> dict[str, float]:
    """The per-answer scores among `metrics` (config names), under their logged keys."""
    return {PER_ANSWER[m][0]: PER_ANSWER[m][1](prediction, reference) for m in metrics if m in PER_ANSWER}


def mean_answer_scores(scored: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each score over the answers of one data set."""
    return {key: sum(s[key] for s in scored) / len(scored) for key in scored[0]} if scored else {}


def corpus_scores(predictions: list[str], references: list[str], metrics) -> dict[str, float]:
    """sacrebleu's corpus BLEU and chrF (those among `metrics`) of the answers of one set,
    each answer against its one reference."""
    wanted = [m for m in metrics if m in CORPUS]
    if not wanted or not predictions:
        return {}
    from sacrebleu.metrics import BLEU, CHRF

    scorers = {"bleu": BLEU, "chrf": CHRF}
    return {m: float(scorers[m]().corpus_score(predictions, [references]).score) for m in wanted}


def set_scores(predictions: list[str], references: list[str], metrics) -> tuple[list[dict], dict[str, float]]:
    """(each answer's scores, the set's scores: the per-answer means and the corpus scores)."""
    scored = [answer_scores(p, r, metrics) for p, r in zip(predictions, references)]
    return scored, {**mean_answer_scores(scored), **corpus_scores(predictions, references, metrics)}


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
