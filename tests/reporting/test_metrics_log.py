"""What a user watches, end to end through the CLI: the forgetting monitor, generated answers
and their scores, W&B (offline and the online fallback), the run summary, and the
classification recipe's held-out accuracy."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (REPO, TINY_LLAMA, WORDS, causal_config, chat_rows, read_metrics, run_cli, run_history, trainer_env,
                     write_config, write_jsonl)

# Words of the general (rehearsal) text: none of them is in the task's WORDS.
GENERAL_WORDS = {
    "subject": "farmer baker sailor miner painter doctor teacher pilot".split(),
    "verb": "plants bakes sails digs paints heals teaches flies".split(),
    "object": "wheat bread boats coal walls patients pupils planes".split(),
}


def general_rows(n: int, seed: int = 1) -> list[dict]:
    """Text with learnable structure: 'the <subject> <verb> <object> on <day>.'"""
    rng = random.Random(seed)
    days = "monday tuesday wednesday thursday friday".split()
    return [{"text": f"the {rng.choice(GENERAL_WORDS['subject'])} {rng.choice(GENERAL_WORDS['verb'])} "
                     f"{rng.choice(GENERAL_WORDS['object'])} on {rng.choice(days)}."} for _ in range(n)]


@pytest.fixture(scope="module")
def general_model(tmp_path_factory) -> Path:
    """A tiny Llama that has learnt the general text (a plain LM loop in this process):
    the pretrained model that the forgetting runs fine-tune on the disjoint task."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.model.tokenizer import train_bpe_tokenizer

    assert not set(WORDS) & {w for words in GENERAL_WORDS.values() for w in words}
    folder = tmp_path_factory.mktemp("general-model")
    texts = [r["text"] for r in general_rows(400)]
    task_texts = [m["content"] for r in chat_rows(200) for m in r["messages"]]
    tokenizer = train_bpe_tokenizer(texts + task_texts, vocab_size=TINY_LLAMA["vocab_size"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}))
    stream = [t for text in texts for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    rows = torch.tensor(stream[: len(stream) // 64 * 64]).view(-1, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(120):
        batch = rows[torch.randint(len(rows), (8,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 2.5, loss.item()  # it knows the general text
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def forgetting_config(tmp_path: Path, model: Path, general_weight: float) -> dict:
    cfg = causal_config(tmp_path, rows=200, train={"max_steps": 30, "log_every": 10, "eval_every": 10},
                        optim={"lr": 3e-3, "warmup_steps": 0, "scheduler": "constant"})
    general = write_jsonl(tmp_path / "data" / "general.jsonl", general_rows(200, seed=2))
    cfg["model"] = {"path": str(model)}
    cfg["data"]["datasets"] = [{"name": "task", "path": cfg["data"]["datasets"][0]["path"], "format": "chat", "weight": 1.0},
                               {"name": "general", "path": str(general), "format": "text", "weight": general_weight}]
    cfg["data"]["eval"] = {"fraction": 0.1}
    return cfg


FORGETTING_WARNING = re.compile(r"forgetting: eval loss of (\S+) at step (\d+) is ([\d.]+) nats above step 0")


@pytest.mark.slow
@pytest.mark.parametrize("general_weight, forgets", [(0.02, True), (1.0, False)])
def test_forgetting_monitor(tmp_path, general_model, general_weight, forgets):
    """Fine-tuning hard on data disjoint from what the model knows raises the rehearsal set's
    loss_change past logging.forgetting_warn and warns once, naming the dataset, the step and
    the value; rehearsing the general data at half the mix keeps it below the threshold."""
    cfg = forgetting_config(tmp_path, general_model, general_weight)
    proc = run_cli(write_config(cfg, tmp_path / "config.yaml"))
    evals = [r for r in read_metrics(Path(cfg["run"]["output_dir"])) if "eval/general/loss" in r]
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert evals[0]["eval/general/loss_change"] == 0.0
    for r in evals:
        assert r["eval/general/loss_change"] == pytest.approx(r["eval/general/loss"] - evals[0]["eval/general/loss"])
        assert "eval/task/loss_change" in r
    assert evals[-1]["eval/task/loss"] < evals[0]["eval/task/loss"] - 0.5  # the task is learnt either way
    warnings = FORGETTING_WARNING.findall(proc.stderr)
    changes = {r["step"]: r["eval/general/loss_change"] for r in evals}
    if forgets:
        first = next(step for step, change in changes.items() if change > 0.1)
        assert warnings == [("general", str(first), f"{changes[first]:.4f}")], proc.stderr[-3000:]
    else:
        assert max(changes.values()) < 0.1, changes
        assert warnings == []


@pytest.mark.slow
def test_generations_wandb_and_summary(tmp_path):
    """One run with data.eval.generate and W&B `online` but no API key: one line says it logs
    offline; the offline history equals metrics.jsonl step by step; answers and their scores
    land in generations.jsonl and a W&B table; steps carry data wait, compute, MFU and peak
    memory; summary.json and the console summary tell what the run did."""
    cfg = causal_config(tmp_path, rows=96, train={"max_steps": 6, "log_every": 2, "eval_every": 3},
                        data={"eval": {"fraction": 0.1, "generate": 3, "max_new_tokens": 8}},
                        logging={"progress_bar": False, "wandb": {"mode": "online"}})
    home = tmp_path / "home"  # no ~/.netrc: no W&B credentials
    home.mkdir()
    env = {k: v for k, v in trainer_env().items() if k not in ("WANDB_API_KEY", "NETRC", "WANDB_MODE")}
    env["HOME"] = str(home)
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(write_config(cfg, tmp_path / "c.yaml"))],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    about_wandb = [line for line in proc.stderr.splitlines() if "W&B" in line or line.startswith("wandb")]
    assert len(about_wandb) == 1 and "logging offline" in about_wandb[0], about_wandb

    out = Path(cfg["run"]["output_dir"])
    records = read_metrics(out)
    by_step: dict[int, dict] = {}
    for record in records:
        by_step.setdefault(record["step"], {}).update({k: v for k, v in record.items() if k != "step"})
    _, history = run_history(out)
    assert [row["_step"] for row in history] == sorted(by_step)
    for row in history:
        logged = {k: v for k, v in row.items() if not k.startswith(("_", "eval/generations", "eval/answers"))}
        assert logged == pytest.approx(by_step[row["_step"]]), row["_step"]
    assert any(k.startswith("eval/generations") for k in history[0])  # the answers' table
    # at the end, each question's answer before training beside its last one
    assert [row["_step"] for row in history if any(k.startswith("eval/answers_first_and_last") for k in row)] == [6]

    steps = [r for r in records if "loss" in r]
    for key in ("data_wait_s", "compute_s", "mfu", "memory/peak_rss_gib"):
        assert all(r[key] > 0 for r in steps), key
    assert all(r["step_time_s"] == pytest.approx(r["data_wait_s"] + r["compute_s"]) for r in steps)
    evals = [r for r in records if "eval/sft/rougeL" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [g["step"] for g in generations] == [0] * 3 + [3] * 3 + [6] * 3
    for record in evals:
        answers = [g for g in generations if g["step"] == record["step"]]
        assert record["eval/sft/rougeL"] == pytest.approx(sum(g["rougeL"] for g in answers) / 3)
        assert record["eval/sft/f1"] == pytest.approx(sum(g["f1"] for g in answers) / 3)
    first = generations[0]
    assert first["prompt"].startswith("<|im_start|>user\nreverse: ") and first["prompt"].endswith("<|im_start|>assistant\n")
    assert first["reference"] and "<|im_end|>" not in first["generation"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 6
    assert summary["tokens"] == steps[-1]["data/sft/tokens"]  # one dataset: all tokens are its
    assert summary["eval"]["sft"]["last"] == {"step": 6, **{k.split("/", 2)[2]: v for k, v in evals[-1].items() if k != "step"}}
    assert summary["eval"]["sft"]["best"]["loss"] == min(r["eval/sft/loss"] for r in evals)
    assert summary["checkpoint"].endswith("step-00000006")
    assert summary["export_command"] == f"finetrain export {summary['checkpoint']} --out {out / 'export'}"
    assert proc.stdout.count("finetrain finished at step 6/6") == 1


@pytest.mark.slow
def test_classification_recipe_beats_the_majority_class(tmp_path):
    """configs/minilm-polarity.yaml as users run it (50 steps over 160 sentences, a minute):
    pretrained MiniLM with a new linear head on gensim's polarity sentences beats always
    answering the held-out majority class, in accuracy and in macro-F1 (a constant answer's
    macro-F1 is below 0.5). Cut to fewer steps the schedule decays before the head has
    learned; the held-out 40 sentences are 29 to 11, a majority of 0.725 to beat."""
    from transformers import AutoTokenizer

    from trainer.config.schema import load_config
    from trainer.data.eval_batches import build_eval_sets

    overrides = [f"run.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "train.eval_every=0",
                 "logging.progress_bar=false"]
    run_cli(REPO / "configs" / "minilm-polarity.yaml", *overrides, timeout=900)
    final = [r for r in read_metrics(tmp_path / "run") if "eval/polarity/accuracy" in r][-1]

    cfg = load_config(REPO / "configs" / "minilm-polarity.yaml", overrides)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    labels = torch.cat([b.labels for b in build_eval_sets(cfg, tokenizer, "sdpa", 0, 1)["polarity"]])
    majority = float(torch.bincount(labels).max()) / len(labels)
    assert final["eval/polarity/accuracy"] > majority, (final, majority)
    assert final["eval/polarity/macro_f1"] > 0.7, final


ACCURACY_WARNING = re.compile(r"forgetting: accuracy of (\S+) at step (\d+) is ([\d.]+) below step 0")


def cloze_rows(n: int, seed: int = 3) -> list[dict]:
    """A benchmark of the general text's grammar: after 'the <subject>', the sentence in its
    order among the same words in three other orders."""
    rng = random.Random(seed)
    days = "monday tuesday wednesday thursday friday".split()
    rows = []
    for _ in range(n):
        verb, obj, day = (rng.choice(GENERAL_WORDS["verb"]), rng.choice(GENERAL_WORDS["object"]), rng.choice(days))
        choices = [f"{verb} {obj} on {day}.", f"{obj} {verb} on {day}.", f"on {day} {obj} {verb}.",
                   f"{day} {obj} on {verb}."]
        answer = rng.randrange(4)
        choices[0], choices[answer] = choices[answer], choices[0]
        rows.append({"context": f"the {rng.choice(GENERAL_WORDS['subject'])}", "choices": choices, "answer": answer})
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("trains_the_answers_away", [True, False])
def test_forgetting_warning_by_accuracy(tmp_path, general_model, trains_the_answers_away):
    """A benchmark marked `forgetting: true` that the pretrained model answers well: training on
    its wrong answers' word order drops its accuracy past logging.forgetting_warn (ten points),
    which warns once, naming the set, the step and the drop, and the summary shows it before
    and after; fine-tuning on the task with the general text rehearsed leaves it where it was."""
    cfg = forgetting_config(tmp_path, general_model, general_weight=1.0)
    cfg["train"]["max_steps"] = 20
    bench = write_jsonl(tmp_path / "data" / "cloze.jsonl", cloze_rows(24))
    cfg["data"]["eval"]["sets"] = [{"name": "cloze", "path": str(bench), "format": "choice", "forgetting": True}]
    if trains_the_answers_away:  # the second choice's order: "the <subject> <object> <verb> on <day>."
        scrambled = [{"text": "the " + " ".join(r["text"][4:].split()[i] for i in (0, 2, 1, 3, 4))}
                     for r in general_rows(200, seed=2)]
        path = write_jsonl(tmp_path / "data" / "scrambled.jsonl", scrambled)
        cfg["data"]["datasets"] = [{"name": "scrambled", "path": str(path), "format": "text"}]
    proc = run_cli(write_config(cfg, tmp_path / "config.yaml"))
    evals = [r for r in read_metrics(Path(cfg["run"]["output_dir"])) if "eval/cloze/acc" in r]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert evals[0]["eval/cloze/acc"] >= 0.75, evals[0]  # the pretrained model knows the grammar
    changes = {r["step"]: r["eval/cloze/acc_change"] for r in evals}
    warnings = ACCURACY_WARNING.findall(proc.stderr)
    summary = json.loads((Path(cfg["run"]["output_dir"]) / "summary.json").read_text())["forgetting"]["cloze"]
    assert (summary["acc_before"], summary["acc"]) == (evals[0]["eval/cloze/acc"], evals[-1]["eval/cloze/acc"])
    assert f"forgetting cloze: accuracy {summary['acc_before']:.4f} -> {summary['acc']:.4f}" in proc.stdout
    if trains_the_answers_away:
        first = next(step for step, change in changes.items() if change < -0.1)
        assert warnings == [("cloze", str(first), f"{-changes[first]:.4f}")], proc.stderr[-3000:]
        assert evals[-1]["eval/cloze/acc"] < evals[0]["eval/cloze/acc"] - 0.3
    else:
        assert min(changes.values()) >= -0.1, changes
        assert warnings == []


# ---------------------------------------------------------------- TensorBoard and MLflow


def scalars_by_step(records: list[dict]) -> dict[str, dict[int, float]]:
    """Each scalar of `records` by step; a step logged twice (recomputed after a resume from an
    earlier checkpoint) keeps its later value, the one that counted."""
    values: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                values.setdefault(key, {})[record["step"]] = value
    return values


@pytest.mark.slow
def test_tensorboard_and_mlflow_hold_the_steps_of_metrics_jsonl_after_a_resume(tmp_path, monkeypatch):
    """A run of 4 steps saving every 2, its step-4 checkpoint then lost (as a crash between saves
    would lose it), resumed to step 8: it recomputes steps 3 and 4. Read back with TensorBoard's own
    event reader and MLflow's client on a local file store, every scalar of metrics.jsonl is there
    at every step with the value that counted, in one MLflow run that holds the config. metrics.jsonl
    and TensorBoard drop what the first run logged past the checkpoint resumed from (its eval at
    step 4 too: that work was lost); MLflow cannot delete a value: it also holds the first run's
    step-4 eval, and of a step logged twice its latest value is the resumed run's."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = f"file://{tmp_path / 'mlruns'}"
    cfg = causal_config(tmp_path, rows=64, train={"max_steps": 4, "save_every": 2},
                        data={"eval": {"fraction": 0.1}},
                        logging={"progress_bar": False, "tensorboard": True,
                                 "mlflow": {"experiment": "finetrain-test", "tracking_uri": store}})
    env = {"MLFLOW_ALLOW_FILE_STORE": "true"}  # MLflow 3 keeps its file store only on request
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_cli(write_config(cfg, tmp_path / "c.yaml"), env_extra=env)
    out = Path(cfg["run"]["output_dir"])
    first_run = read_metrics(out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    run_cli(write_config(cfg, tmp_path / "c.yaml"), "train.max_steps=8", env_extra=env)

    records = read_metrics(out)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))  # steps 3 and 4 once
    kept = [r for r in first_run if r["step"] <= 2]  # the first run's records up to the checkpoint
    assert records[:len(kept)] == kept
    counted = scalars_by_step(records)
    assert sorted(counted["eval/sft/loss"]) == [0, 8]
    logged = scalars_by_step(first_run + records)  # all that was ever logged, the latest per step
    assert sorted(logged["eval/sft/loss"]) == [0, 4, 8]

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == sorted(counted)
    for key, by_step in counted.items():
        assert [e.step for e in events.Scalars(key)] == sorted(by_step), key  # each step once
        in_events = {e.step: e.value for e in events.Scalars(key)}
        assert in_events == pytest.approx(by_step, rel=1e-6), key  # float32 in the event files
    assert "config" in {t.split("/")[0] for t in events.Tags()["tensors"]}

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("finetrain-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["data.datasets.0.name"] == "sft"
    assert run.info.status == "FINISHED"
    for key, by_step in logged.items():
        latest: dict[int, tuple[int, float]] = {}
        for metric in client.get_metric_history(run.info.run_id, key):
            if metric.step not in latest or metric.timestamp >= latest[metric.step][0]:
                latest[metric.step] = (metric.timestamp, metric.value)
        assert {step: value for step, (_, value) in latest.items()} == pytest.approx(by_step, rel=1e-12), key


def test_a_tracker_whose_package_is_missing_is_one_line_at_start_up(tmp_path, monkeypatch):
    from trainer.config.schema import load_config
    from trainer.reporting import metrics_log

    cfg = load_config(write_config(causal_config(tmp_path, logging={"tensorboard": True,
                                                                    "mlflow": {"experiment": "x"}}), tmp_path / "c.yaml"))
    assert metrics_log.tracker_problems(cfg) == []
    monkeypatch.setattr(metrics_log.importlib.util, "find_spec", lambda name: None)
    assert metrics_log.tracker_problems(cfg) == [
        "logging.tensorboard: needs the tensorboard package: pip install 'finetrain[tensorboard]' (or make setup)",
        "logging.mlflow: needs the mlflow package: pip install 'finetrain[mlflow]' (or make setup)"]


def test_warnings_and_log_lines_during_training_are_whole_lines_beside_the_progress_bar(tmp_path, capsys):
    """A warning or a log line raised while the bar is drawn is written through the bar: on the
    console it starts a line of its own instead of continuing the bar's."""
    import logging
    import warnings

    from trainer.config.schema import load_config
    from trainer.reporting.metrics_log import MetricsLogger

    cfg = load_config(write_config(causal_config(tmp_path, logging={"progress_bar": True, "jsonl": False}),
                                   tmp_path / "c.yaml"))
    handler = logging.StreamHandler(sys.stderr)  # what a rank's logging set-up installs
    logging.root.addHandler(handler)
    try:
        metrics = MetricsLogger(cfg, True, total_steps=4, start_step=0, wandb_run_id=None)
        metrics.advance()
        warnings.warn("a warning raised in a step", UserWarning)
        logging.getLogger("finetrain").warning("a log line in a step")
        metrics.advance()
        metrics.close()
    finally:
        logging.root.removeHandler(handler)
    console = capsys.readouterr().err
    assert "1/4" in console  # the bar was drawn before the warning
    shown = {}  # what the terminal shows of each line: what follows its last carriage return
    for text in ("UserWarning: a warning raised in a step", "a log line in a step"):
        (line,) = [line for line in console.split("\n") if text in line]
        shown[text] = line.split("\r")[-1]
    assert shown["a log line in a step"] == "a log line in a step"
    warned = shown["UserWarning: a warning raised in a step"]
    assert warned.startswith(f"{__file__}:") and warned.endswith(": UserWarning: a warning raised in a step")
    assert warnings.showwarning.__module__ == "warnings"  # restored when the bar closes


def test_a_resumed_run_drops_the_records_past_its_checkpoint_and_a_line_cut_short(tmp_path):
    """What a run killed at step 7 left (steps 1-7, evaluations at 0 and 4, a restart record, the
    last line cut off by the kill), resumed from the checkpoint of step 4: every record up to the
    checkpoint stays, restart records stay, the rest goes; each line is whole JSON again."""
    from trainer.reporting.metrics_log import trim_records

    path = tmp_path / "metrics.jsonl"
    kept = [{"step": 0, "eval/sft/loss": 5.0}, {"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.9},
            {"step": 2, "restart": 1, "resumed_from": 2}, {"step": 3, "loss": 3.8}, {"step": 4, "loss": 3.7},
            {"step": 4, "eval/sft/loss": 3.6}]
    dropped = [{"step": 5, "loss": 3.5}, {"step": 6, "eval/sft/loss": 3.4}, {"step": 7, "loss": 3.3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept + dropped) + '{"step": 8, "lo')
    assert trim_records(path, 4, 10) == 7
    assert [json.loads(line) for line in path.read_text().splitlines()] == kept
    assert trim_records(path, 4, 10) == 4  # nothing more to drop: the file is left alone
    # resumed from the last step, or from no checkpoint: the evaluations after that save are done again
    assert trim_records(path, 4, 4) == 4 and {"step": 4, "eval/sft/loss": 3.6} not in map(json.loads, path.open())
    assert trim_records(path, 0, 4) == 4
    assert [json.loads(line) for line in path.read_text().splitlines()] == [kept[3]]


def test_every_attempt_of_a_run_logs_into_one_wandb_run(tmp_path):
    """The W&B run id: the checkpoint's when resuming; else the one an earlier attempt that failed
    before its first checkpoint left in the run folder (a restart); else the new one, kept there."""
    from types import SimpleNamespace

    from trainer.reporting.metrics_log import WANDB_RUN_ID_FILE, MetricsLogger

    def run_id(new: str, from_checkpoint=None) -> str:
        return MetricsLogger._one_wandb_run(SimpleNamespace(wandb_run_id=new), tmp_path, from_checkpoint)

    assert run_id("first") == "first"
    assert run_id("second") == "first"  # restarted before any checkpoint: the same W&B run
    assert run_id("third", from_checkpoint="saved") == "saved"
    assert (tmp_path / WANDB_RUN_ID_FILE).read_text().strip() == "saved"
