"""Prompts, stop tokens and padding of generation; the forgetting warning (loss and accuracy);
the run summary."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY_LLAMA, planned
from trainer.build import build_model, build_training
from trainer.config.schema import Config, DatasetConfig, EvalSetConfig
from trainer.eval.evaluator import ForgettingMonitor
from trainer.eval.generation import greedy_generate, split_last_answer, stop_token_ids
from trainer.reporting.summary import RunSummary
from trainer.runtime.distributed import init_distributed


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
    monitor = ForgettingMonitor({"general": 0.1}, is_main=True)
    first = monitor.add_changes(0, {"eval/task/loss": 2.0, "eval/general/loss": 3.0})
    assert first["eval/general/loss_change"] == 0.0
    with caplog.at_level("WARNING", logger="finetrain"):
        monitor.add_changes(10, {"eval/task/loss": 2.5, "eval/general/loss": 3.05})
        assert not caplog.records  # 0.05 nats; the task's rise is not forgetting
        later = monitor.add_changes(20, {"eval/task/loss": 2.5, "eval/general/loss": 3.25})
        monitor.add_changes(30, {"eval/task/loss": 2.5, "eval/general/loss": 3.5})
    assert later["eval/general/loss_change"] == pytest.approx(0.25)
    assert len(caplog.records) == 1
    assert "general at step 20 is 0.2500 nats above step 0" in caplog.records[0].getMessage()


def test_forgetting_by_accuracy_warns_once_when_it_drops_past_its_margin(caplog):
    """A benchmark marked as a forgetting check warns once its `acc` is more than its margin
    below step 0; a rise, a smaller drop, acc_norm alone, or a set that is no check do not."""
    monitor = ForgettingMonitor({"bench": 0.05, "general": None}, is_main=True)
    first = monitor.add_changes(0, {"eval/bench/acc": 0.60, "eval/bench/acc_norm": 0.50,
                                    "eval/other/acc": 0.9, "eval/general/acc": 0.5})
    assert first["eval/bench/acc_change"] == 0.0 and first["eval/bench/acc_norm_change"] == 0.0
    with caplog.at_level("WARNING", logger="finetrain"):
        monitor.add_changes(10, {"eval/bench/acc": 0.70, "eval/bench/acc_norm": 0.30,  # acc_norm alone fell
                                 "eval/other/acc": 0.1, "eval/general/acc": 0.1})  # no check / no margin
        monitor.add_changes(20, {"eval/bench/acc": 0.56, "eval/bench/acc_norm": 0.50})  # 0.04 below
        assert not caplog.records
        later = monitor.add_changes(30, {"eval/bench/acc": 0.50, "eval/bench/acc_norm": 0.50})
        monitor.add_changes(40, {"eval/bench/acc": 0.25, "eval/bench/acc_norm": 0.25})
    assert later["eval/bench/acc_change"] == pytest.approx(-0.1)
    assert [r.getMessage() for r in caplog.records] == [
        "forgetting: accuracy of bench at step 30 is 0.1000 below step 0 (0.6000 -> 0.5000), past its margin 0.05; "
        "a larger rehearsal weight or a lower optim.lr keeps it up"]
    restored = ForgettingMonitor({"bench": 0.05}, is_main=True)
    restored.load_state_dict(monitor.state_dict())  # a resumed run neither re-baselines nor warns again
    assert restored.add_changes(50, {"eval/bench/acc": 0.2})["eval/bench/acc_change"] == pytest.approx(-0.4)
    assert len(caplog.records) == 1


def test_summary_keeps_first_best_last_forgetting_and_answers(tmp_path, capsys):
    cfg = Config()
    cfg.run.output_dir = str(tmp_path)
    cfg.data.datasets = [DatasetConfig(name="task", weight=0.9), DatasetConfig(name="general", weight=0.1)]
    cfg.data.eval.fraction = 0.1
    summary = RunSummary(cfg, is_main=True)
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
    strategy = build_training(cfg, planned(cfg), init_distributed(), tiny_tokenizer, 1,
                              lambda: build_model(cfg, tiny_tokenizer, attention)).strategy
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 320, (int(torch.randint(2, 15, (1,), generator=generator)),), generator=generator).tolist()
               for _ in range(8)]
    stops = list(range(0, 320, 7))
    alone = greedy_generate(strategy, prompts, 1, tiny_tokenizer.pad_token_id, stops, max_new_tokens=10)
    assert len({len(answer) for answer in alone}) > 3  # answers end at different steps
    assert greedy_generate(strategy, prompts, 8, tiny_tokenizer.pad_token_id, stops, max_new_tokens=10) == alone


def test_summary_shows_a_benchmarks_accuracy_before_and_after(tmp_path, capsys):
    """A choice set marked as a forgetting check: summary.json keeps its accuracy at step 0,
    at the end and its lowest change; its best evaluation is its highest accuracy; the console
    shows acc and acc_norm from step 0 to the end, and ends with the report's path."""
    cfg = Config()
    cfg.run.output_dir = str(tmp_path)
    cfg.data.datasets = [DatasetConfig(name="task", path="task.jsonl")]
    cfg.data.eval.sets = [EvalSetConfig(name="bench", path="bench.jsonl", format="choice", forgetting=0.05)]
    summary = RunSummary(cfg, is_main=True)
    for step, acc in ((0, 0.6), (10, 0.7), (20, 0.4), (30, 0.5)):
        summary.observe_eval(step, {"eval/bench/acc": acc, "eval/bench/acc_norm": acc / 2,
                                    "eval/bench/acc_change": acc - 0.6, "eval/bench/acc_norm_change": acc / 2 - 0.3})
    written = summary.write("finished", 30, 30, 100, None)
    assert written["forgetting"] == {"bench": {"acc_before": 0.6, "acc": 0.5, "acc_change": pytest.approx(-0.1),
                                               "min_acc_change": pytest.approx(-0.2), "min_at_step": 20}}
    assert written["eval"]["bench"]["best"]["step"] == 10
    printed = capsys.readouterr().out
    assert "eval bench  acc 0.6 -> 0.5, acc_norm 0.3 -> 0.25 (step 0 -> 30); best acc 0.7000 at step 10" in printed
    assert "forgetting bench: accuracy 0.6000 -> 0.5000, -0.1000 since step 0 (lowest -0.2000 at step 20)" in printed
    assert printed.rstrip().endswith(f"report:     {tmp_path / 'report.html'}")
    assert (tmp_path / "report.html").is_file()
