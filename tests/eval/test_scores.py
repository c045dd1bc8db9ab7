"""Task metrics on hand-made strings, confusion matrices and a fixed set of translations:
SQuAD's exact match and token F1, ROUGE-L, BLEU and chrF (equal to sacrebleu's corpus
scores), accuracy and macro-F1; and the metrics each eval set asks for."""

from __future__ import annotations

import json

import pytest
import sacrebleu
import torch

from trainer.eval.scores import (answer_scores, classification_scores, corpus_scores, exact_match, normalize_answer,
                                 rouge_l, set_scores, token_f1)


def test_answers_are_normalised_as_squad_does():
    assert normalize_answer("  The Eiffel   Tower!  ") == "eiffel tower"
    assert normalize_answer("An apple, a pear; the end.") == "apple pear end"
    assert normalize_answer("theatre another") == "theatre another"  # articles only as whole words


def test_exact_match_after_normalisation():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel Tower, Paris", "Eiffel Tower") == 0.0


def test_token_f1_counts_shared_words_as_a_bag():
    # prediction "cat sat on mat" (4 words), reference "cat on mat" (3): 3 shared -> P 3/4, R 1
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # "red" thrice vs once and "blue" once vs twice share 2 words: P 2/4, R 2/3
    assert token_f1("red red red blue", "red blue blue") == pytest.approx(4 / 7)
    assert token_f1("green", "red blue") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("The.", "") == 1.0  # both empty after normalisation
    assert token_f1("red", "") == 0.0


def test_rouge_l_is_the_longest_common_subsequence_f_measure():
    # LCS "the cat on the mat" = 5 words: P 5/6, R 5/5
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    # order matters for ROUGE-L but not for token F1: LCS of "c b a" and "a b c" is 1 word
    assert rouge_l("cat bird dog", "dog bird cat") == pytest.approx(1 / 3)
    assert token_f1("cat bird dog", "dog bird cat") == 1.0
    assert answer_scores("Paris", "paris") == {"rougeL": 1.0, "exact_match": 1.0, "f1": 1.0}


def test_accuracy_and_macro_f1_from_a_confusion_matrix():
    confusion = torch.tensor([[3, 1], [2, 4]])  # rows: true class, columns: predicted
    scores = classification_scores(confusion)
    assert scores["accuracy"] == pytest.approx(7 / 10)
    # F1 of class 0: 2*3 / (4 + 5); of class 1: 2*4 / (6 + 5)
    assert scores["macro_f1"] == pytest.approx((6 / 9 + 8 / 11) / 2)
    # a class that is neither a reference nor a prediction is left out of the average
    three = torch.zeros(3, 3)
    three[:2, :2] = confusion
    assert classification_scores(three)["macro_f1"] == pytest.approx(scores["macro_f1"])
    # always predicting the majority class (70 %): F1 2*70/170 for it, 0 for the other, so
    # macro-F1 p/(1+p) < 0.5 however large the majority
    majority = classification_scores(torch.tensor([[0, 30], [0, 70]]))
    assert majority == pytest.approx({"accuracy": 0.7, "macro_f1": 0.7 / 1.7})


# A fixed file of machine translations (hypothesis) and their references, as a generation
# eval set's answers would be scored.
TRANSLATIONS = [
    {"hypothesis": "The cat sat on the mat.", "reference": "The cat is sitting on the mat."},
    {"hypothesis": "There is a dog in the garden.", "reference": "A dog is in the garden."},
    {"hypothesis": "I would like a cup of coffee, please.", "reference": "I would like a coffee, please."},
    {"hypothesis": "The train leaves at eight o'clock.", "reference": "The train departs at eight."},
    {"hypothesis": "She reads the newspaper every morning.", "reference": "Every morning she reads the paper."},
    {"hypothesis": "We have been waiting for two hours.", "reference": "We have been waiting for two hours."},
    {"hypothesis": "Where is the station?", "reference": "Where is the railway station?"},
    {"hypothesis": "", "reference": "Thank you very much."},
]


@pytest.fixture
def translations(tmp_path):
    path = tmp_path / "translations.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in TRANSLATIONS))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["hypothesis"] for r in rows], [r["reference"] for r in rows]


def test_bleu_and_chrf_are_sacrebleus_corpus_scores(translations):
    """Over a set's answers at once (not a mean of sentence scores), with sacrebleu's defaults."""
    hypotheses, references = translations
    scores = corpus_scores(hypotheses, references, ["bleu", "chrf"])
    assert scores["bleu"] == sacrebleu.corpus_bleu(hypotheses, [references]).score
    assert scores["chrf"] == sacrebleu.corpus_chrf(hypotheses, [references]).score
    # pinned: another tokenizer, order or smoothing (or a mean of sentence scores) would move them
    assert scores == pytest.approx({"bleu": 45.3935, "chrf": 65.9829}, abs=1e-4)
    sentence_mean = sum(sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hypotheses, references)) / 8
    assert abs(scores["bleu"] - sentence_mean) > 1
    assert corpus_scores(references, references, ["bleu", "chrf"]) == pytest.approx({"bleu": 100.0, "chrf": 100.0})


def test_a_set_is_scored_with_the_metrics_it_names(translations):
    hypotheses, references = translations
    per_answer, scores = set_scores(hypotheses, references, ("bleu", "token_f1"))
    assert set(scores) == {"bleu", "f1"} and all(set(s) == {"f1"} for s in per_answer)
    assert scores["f1"] == pytest.approx(sum(token_f1(h, r) for h, r in zip(hypotheses, references)) / 8)
    per_answer, scores = set_scores(hypotheses, references, ("rouge_l", "exact_match", "token_f1"))
    assert set(scores) == {"rougeL", "exact_match", "f1"} and scores["exact_match"] == 1 / 8
    assert corpus_scores([], [], ["bleu"]) == {}
