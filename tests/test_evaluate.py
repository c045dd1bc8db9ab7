"""Task metrics on hand-made strings and confusion matrices; prompts, stop tokens and padding of
generation; the forgetting warning; the run summary."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_LLAMA, planned
from trainer.config import Config, DatasetConfig
from trainer.distributed import init_distributed
from trainer.evaluate import ForgettingMonitor
from trainer.generate import greedy_generate, split_last_answer, stop_token_ids
from trainer.models import build_model
from trainer.parallel import build_strategy
from trainer.summary import RunSummary
from trainer.task_metrics import (
    answer_scores,
    classification_scores,
    exact_match,
    normalize_answer,
    rouge_l,
    token_f1,
)


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


def test_prompt_is_the_conversation_before_the_last_answer():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    prompt, reference = split_last_answer(messages)
    assert prompt == messages[:3] and reference == "4"
    assert split_last_answer([{"role": "assistant", "content": "alone"}]) is None


def test_answers_stop_at_the_token_that_closes_an_assistant_turn(tiny_tokenizer):
    stops = stop_token_ids(tiny_tokenizer)  # ChatML: <|im_end|> closes a turn; EOS is <|end|>
    assert stops == [tiny_tokenizer.eos_token_id, tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_forgetting_warns_once_per_rehearsal_dataset(caplog):
    monitor = ForgettingMonitor(0.1, rehearsal={"general"}, is_main=True)
    first = monitor.add_loss_change(0, {"eval/task/loss": 2.0, "eval/general/loss": 3.0})
    assert first["eval/general/loss_change"] == 0.0
    with caplog.at_level("WARNING", logger="finetrain"):
        monitor.add_loss_change(10, {"eval/task/loss": 2.5, "eval/general/loss": 3.05})
        assert not caplog.records  # 0.05 nats; the task's rise is not forgetting
        later = monitor.add_loss_change(20, {"eval/task/loss": 2.5, "eval/general/loss": 3.25})
        monitor.add_loss_change(30, {"eval/task/loss": 2.5, "eval/general/loss": 3.5})
    assert later["eval/general/loss_change"] == pytest.approx(0.25)
    assert len(caplog.records) == 1
    assert "general at step 20 is 0.2500 nats above step 0" in caplog.records[0].getMessage()


def test_summary_keeps_first_best_last_forgetting_and_answers(tmp_path, capsys):
    cfg = Config()
    cfg.run.output_dir = str(tmp_path)
    cfg.data.datasets = [DatasetConfig(name="task", weight=0.9), DatasetConfig(name="general", weight=0.1)]
    summary = RunSummary(cfg, ("general",), is_main=True)
    for step, loss, change in ((0, 3.0, 0.0), (10, 2.5, 0.3), (20, 2.7, 0.1)):
        summary.observe_eval(step, {"eval/general/loss": loss, "eval/general/loss_change": change,
                                    "eval/task/loss": loss, "eval/task/loss_change": change})
        summary.observe_generations([{"step": step, "dataset": "task", "question": "Who are you?",
                                      "reference": "A robot.", "generation": f"answer at {step}"}])
    written = summary.write("finished", 20, 20, 1000, tmp_path / "checkpoints" / "step-00000020")
    assert written["eval"]["general"]["first"]["step"] == 0
    assert written["eval"]["general"]["best"]["step"] == 10 and written["eval"]["general"]["last"]["step"] == 20
    assert written["answers"] == [{"dataset": "task", "question": "Who are you?", "reference": "A robot.",
                                   "first": {"step": 0, "answer": "answer at 0"},
                                   "last": {"step": 20, "answer": "answer at 20"}}]
    printed = capsys.readouterr().out
    assert "loss 3 -> 2.7 (step 0 -> 20)" in printed
    assert "Who are you?\n       reference:       A robot.\n       base (step 0):   answer at 0\n" \
           "       tuned (step 20): answer at 20" in printed
    assert written["forgetting"] == {"general": {"loss_change": 0.1, "max_loss_change": 0.3, "max_at_step": 10}}
    assert written["export_command"].startswith(f"finetrain export {tmp_path / 'checkpoints' / 'step-00000020'} --out")
    assert (tmp_path / "summary.json").is_file()


@pytest.mark.parametrize("attention", ["sdpa", "eager", "varlen_reference"])
def test_left_padded_prompts_answer_as_each_prompt_alone(tiny_tokenizer, attention):
    """Prompts of different lengths decoded as one left-padded group (with the KV cache) get
    the answers each gets alone: padding shifts neither positions nor attention."""
    cfg = Config()
    cfg.model.config = dict(TINY_LLAMA)
    cfg.parallel.strategy, cfg.parallel.mixed_precision = "single", "fp32"
    strategy = build_strategy(cfg, init_distributed(), planned(cfg))
    strategy.setup(strategy.build_model(lambda: build_model(cfg, tiny_tokenizer, attention)), total_steps=1)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 320, (int(torch.randint(2, 15, (1,), generator=generator)),), generator=generator).tolist()
               for _ in range(8)]
    stops = list(range(0, 320, 7))
    alone = greedy_generate(strategy, prompts, 1, tiny_tokenizer.pad_token_id, stops, max_new_tokens=10)
    assert len({len(answer) for answer in alone}) > 3  # answers end at different steps
    assert greedy_generate(strategy, prompts, 8, tiny_tokenizer.pad_token_id, stops, max_new_tokens=10) == alone
