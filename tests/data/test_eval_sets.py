"""The eval sets a config declares (data.eval and data.eval.sets): what each reports, which are
forgetting checks with which margin, and one message per mistake naming its key (and, through
the command line, its line in the YAML file)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from helpers import REPO
from trainer.config.schema import load_config
from trainer.data.eval_sets import declared_sets, forgetting_checks
from trainer.plan import plan_run
from trainer.runtime.errors import ConfigError


@pytest.fixture
def files(tmp_path):
    for name in ("task.jsonl", "general.jsonl", "bench.jsonl", "mt.jsonl"):
        (tmp_path / name).write_text("{}\n")
    return tmp_path


def config(files, *overrides: str):
    base = [f"data.datasets=[{{name: task, path: {files / 'task.jsonl'}, weight: 0.9}}, "
            f"{{name: general, path: {files / 'general.jsonl'}, format: text, weight: 0.1}}]",
            "model.config={model_type: llama, vocab_size: 320}", "model.tokenizer=train-bpe", "train.max_steps=1"]
    cfg = load_config(None, base + list(overrides))
    plan_run(cfg, 1, "cpu")  # what the keys mean together (trainer/plan.py)
    return cfg


def test_sets_follow_the_held_out_data_with_their_metrics_and_margins(files):
    cfg = config(files, "data.eval.fraction=0.1", "logging.forgetting_warn=0.2", "data.eval.generate=2",
                 f"data.eval.sets=[{{name: bench, path: {files / 'bench.jsonl'}, format: choice, forgetting: true}}, "
                 f"{{path: {files / 'mt.jsonl'}, format: instruction, metrics: [bleu, chrf], forgetting: 0.5, "
                 "max_examples: 7}]")
    sets = {s.name: s for s in declared_sets(cfg)}
    assert list(sets) == ["task", "general", "bench", "mt"]
    assert sets["task"].metrics == ("rouge_l", "exact_match", "token_f1") and sets["task"].held_out
    assert sets["bench"].metrics == ("acc", "acc_norm") and sets["bench"].max_examples == 512
    assert sets["mt"].logged_metrics == ("bleu", "chrf") and sets["mt"].max_examples == 7
    assert forgetting_checks(cfg) == {"general": 0.2, "bench": 0.2, "mt": 0.5}  # the task is no check
    assert forgetting_checks(config(files, "logging.forgetting_warn=null", "data.eval.fraction=0.1")) == \
        {"general": None}  # tracked in the summary, never warned about
    path_cfg = config(files, f"data.eval.path={files / 'bench.jsonl'}", "data.eval.format=choice",
                      "data.eval.fields={context: question}")
    (only,) = declared_sets(path_cfg)
    assert (only.name, only.key, only.format, only.fields) == ("eval", "data.eval", "choice", {"context": "question"})


def sets(*entries: str) -> str:
    """A `data.eval.sets` override of these entries (X/ stands for the test's data folder)."""
    return "data.eval.sets=[" + ", ".join("{" + entry + "}" for entry in entries) + "]"


def assert_refused(files, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config(files, *[o.replace("X/", f"{files}/") for o in overrides])
    assert any(line.startswith(message.replace("X/", f"{files}/")) for line in str(err.value).splitlines()), str(err.value)


BENCH = "path: X/bench.jsonl, format: choice"


@pytest.mark.parametrize("overrides, message", [
    ([sets(BENCH + ", metrics: [bleu]")], "data.eval.sets.0.metrics: unknown metric 'bleu' for choice sets; known: acc, "),
    ([sets("path: X/mt.jsonl, format: chat, metrics: [bleu, chrf]")],
     "data.eval.sets.0.metrics: bleu, chrf score greedy answers; set data.eval.generate to the number of prompts"),
    ([sets("path: X/general.jsonl, format: text, metrics: [bleu]")],
     "data.eval.sets.0.metrics: text sets are scored by their loss; metrics apply to chat, instruction"),
    (["data.eval.metrics=[rouge, bleu]"], "data.eval.metrics: unknown metric 'rouge' for chat sets; known: rouge_l, "),
    (["data.eval.metrics=[]"], "data.eval.metrics: a non-empty list, got []"),
])
def test_a_metric_a_set_cannot_have_is_refused_naming_the_key(files, overrides, message):
    assert_refused(files, overrides, message)


@pytest.mark.parametrize("overrides, message", [
    (["data.eval.fraction=0.1", sets("name: general, " + BENCH)],
     "data.eval.sets.0.name: 'general' is used by another eval set (names key the metrics)"),
    ([sets(BENCH, BENCH)], "data.eval.sets.1.name: 'bench' is used by another eval set"),
    ([sets("name: a/b, " + BENCH)], "data.eval.sets.0.name: 'a/b': no '/'"),
])
def test_a_set_name_that_cannot_key_its_metrics_is_refused(files, overrides, message):
    assert_refused(files, overrides, message)


@pytest.mark.parametrize("entry, message", [
    (BENCH + ", forgetting: -1", "data.eval.sets.0.forgetting: true, false, or a margin > 0"),
    (BENCH + ", forgetting: often", "data.eval.sets.0.forgetting: expected bool or float, got 'often'"),
    (BENCH + ", max_examples: 0", "data.eval.sets.0.max_examples: must be > 0, got 0"),
    (BENCH + ", weight: 1", "unknown key data.eval.sets.0.weight; valid keys: name, path, format, fields, metrics, "),
])
def test_a_bad_key_of_a_set_is_refused_naming_it(files, entry, message):
    assert_refused(files, [sets(entry)], message)


@pytest.mark.parametrize("overrides, message", [
    ([sets("path: X/nothere.jsonl, format: choice")], "data.eval.sets.0.path: X/nothere.jsonl does not exist"),
    ([sets("format: choice")], "data.eval.sets.0.path: required"),
    ([sets("path: X/bench.jsonl, format: multiple")], "data.eval.sets.0.format: 'multiple' is not one of"),
    ([sets("path: X/mt.jsonl, format: tokenized")], "data.eval.sets.0.format: tokenized data needs the tokenizer it was "
                                                    "tokenized with (model.tokenizer or model.path), not train-bpe"),
    (["data.eval.generate=2", sets(BENCH)],
     "data.eval.generate: prompts come from chat or instruction eval data, but the eval data is choice"),
])
def test_a_set_that_cannot_be_read_or_used_is_refused(files, overrides, message):
    assert_refused(files, overrides, message)


def test_choice_sets_need_a_causal_lm(files):
    with pytest.raises(ConfigError, match="data.eval.sets.0.format: choice sets are scored by a causal LM's likelihood"):
        plan_run(load_config(None, [f"data.datasets=[{{path: {files / 'task.jsonl'}, format: classification}}]",
                                    "model.config={model_type: bert, vocab_size: 320}", "model.tokenizer=train-bpe",
                                    "train.max_steps=1", "model.task=sequence_classification", "data.packing=false",
                                    f"data.eval.sets=[{{path: {files / 'bench.jsonl'}, format: choice}}]"]), 1, "cpu")


@pytest.mark.slow
def test_a_mistake_in_a_set_points_at_its_line_in_the_config(files, tmp_path):
    cfg = {"model": {"config": {"model_type": "llama", "vocab_size": 320}, "tokenizer": "train-bpe"},
           "data": {"datasets": [{"path": str(files / "task.jsonl")}],
                    "eval": {"sets": [{"path": str(files / "bench.jsonl"), "format": "choice"},
                                      {"path": str(files / "mt.jsonl"), "format": "instruction",
                                       "metrics": ["bleu", "meteor"]}]}},
           "train": {"max_steps": 1}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "metrics:" in text)
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(path)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"finetrain: {path}:{line}: data.eval.sets.1.metrics: unknown metric 'meteor' for instruction sets; known: "
        "rouge_l, exact_match, token_f1, bleu, chrf",
        f"finetrain: {path}:{line}: data.eval.sets.1.metrics: bleu scores greedy answers; set data.eval.generate "
        "to the number of prompts to answer"]
