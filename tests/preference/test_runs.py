"""Preference runs end to end: DPO with LoRA beside 10 % rehearsal text learns a learnable preference
(held-out reward accuracy at least 0.9), logs what TRL logs in metrics.jsonl, W&B, the summary and
the report, adds the two losses as documented, and exports a merged model that transformers loads;
a reward model learns the pairs and exports as a one-label classifier; a run stopped by SIGTERM on 2
ranks resumes exactly on 1; a bad pair stops
`finetrain train` in one line naming its file and line."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from helpers import (WORDS, preference_config, read_metrics, run_cli, run_history, start_cli, step_losses,
                     wait_for_records, write_config, write_jsonl)
from trainer.checkpoint.export import export_checkpoint
from trainer.config.schema import load_config
from trainer.loop import Trainer

TRL_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")


def rehearsal_text(tmp_path: Path) -> Path:
    rng = random.Random(3)
    return write_jsonl(tmp_path / "data" / "text.jsonl",
                       [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30)))} for _ in range(60)])


@pytest.mark.slow
def test_dpo_with_lora_beside_rehearsal_text_learns_logs_and_exports(tmp_path):
    steps = 20
    cfg = preference_config(tmp_path, rows=160, peft={"method": "lora", "r": 8, "alpha": 16},
                            optim={"lr": 1e-2, "warmup_steps": 2},
                            train={"max_steps": steps, "eval_every": 10, "global_batch_size": 8},
                            logging={"progress_bar": False, "wandb": {"mode": "offline"}})
    cfg["data"]["seq_len"] = 256
    cfg["data"]["datasets"] = [{**cfg["data"]["datasets"][0], "weight": 0.9},
                               {"name": "text", "path": str(rehearsal_text(tmp_path)), "format": "text", "weight": 0.1}]
    cfg["data"]["eval"] = {"fraction": 0.1}
    trainer = Trainer(load_config(write_config(cfg, tmp_path / "config.yaml")))
    trainer.fit()
    out = trainer.cfg.output_dir
    records = read_metrics(out)
    steps_logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps_logged] == list(range(1, steps + 1))
    for record in steps_logged:
        assert all(name in record for name in TRL_NAMES) and record["pairs"] > 0
        # the two losses add: the preference mean over the step's pairs, the LM mean over its rehearsal targets
        lm = record.get("loss/lm", 0.0)
        assert record["loss"] == pytest.approx(record["loss/preference"] + lm, rel=1e-6)
    assert sum("loss/lm" in r for r in steps_logged) > steps // 2
    assert steps_logged[0]["loss/preference"] == pytest.approx(0.693147, abs=1e-4)
    last = steps_logged[-1]
    text, pairs = last["data/text/examples"], last["data/pairs/examples"]
    assert abs(text - 0.1 * (text + pairs)) <= 2  # rehearsal mixing is exact: 10 % of the examples
    evals = [r for r in records if "eval/pairs/rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [0, 10, steps]
    assert evals[0]["eval/pairs/loss"] == pytest.approx(0.693147, abs=1e-4)
    assert evals[-1]["eval/pairs/rewards/accuracies"] >= 0.9 and evals[-1]["eval/pairs/rewards/margins"] > 0
    assert "eval/text/loss" in evals[-1] and "eval/text/loss_change" in evals[-1]  # the forgetting check
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["pairs"]["last"]["rewards/accuracies"] == evals[-1]["eval/pairs/rewards/accuracies"]
    report = (out / "report.html").read_text()
    assert "rewards/accuracies" in report and (out / "report" / "rewards.png").is_file()
    _, history = run_history(out)
    assert {row["_step"] for row in history if "rewards/margins" in row} == set(range(1, steps + 1))
    assert any("eval/pairs/rewards/accuracies" in row for row in history)

    merged = export_checkpoint(out, tmp_path / "merged", merge=True)
    loaded = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.tensor([trainer.tokenizer("name some words like alpha beta")["input_ids"]])
    trainer.strategy.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trainer.strategy.model(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)


def test_kto_on_unpaired_rows(tmp_path):
    """unpaired_preference rows (each pair's answers as a desirable and an undesirable completion):
    KTO starts at 0.5 with its reference point 0, then moves it."""
    cfg = preference_config(tmp_path, rows=32, preference={"loss": "kto"}, train={"max_steps": 3})
    path = Path(cfg["data"]["datasets"][0]["path"])
    pairs = [json.loads(line) for line in path.read_text().splitlines()]
    write_jsonl(path, [{"prompt": p["prompt"], "completion": p[key], "label": key == "chosen"}
                       for p in pairs for key in ("chosen", "rejected")])
    cfg["data"]["datasets"][0]["format"] = "unpaired_preference"
    trainer = Trainer(load_config(write_config(cfg, tmp_path / "config.yaml")))
    trainer.fit()
    records = [r for r in read_metrics(trainer.cfg.output_dir) if "loss" in r]
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-6) and records[0]["kl"] == 0.0
    assert "rewards/accuracies" not in records[0] and records[0]["pairs"] > 0  # completions, not pairs
    assert records[-1]["kl"] > 0 and records[-1]["loss"] != pytest.approx(0.5, abs=1e-5)


def test_a_reward_model_learns_the_pairs_and_exports_as_a_one_label_classifier(tmp_path):
    """model.task reward_model: Bradley-Terry over each pair's scores, minus the pair's margin (1 here)."""
    cfg = preference_config(tmp_path, rows=160, model={"task": "reward_model"}, data={"packing": False},
                            train={"max_steps": 16, "eval_every": 0, "micro_batch_size": 4, "global_batch_size": 8})
    path = Path(cfg["data"]["datasets"][0]["path"])
    write_jsonl(path, [{**json.loads(line), "margin": 1.0} for line in path.read_text().splitlines()])
    cfg["data"]["eval"] = {"fraction": 0.1}
    trainer = Trainer(load_config(write_config(cfg, tmp_path / "config.yaml")))
    trainer.fit()
    evals = [r for r in read_metrics(trainer.cfg.output_dir) if "eval/pairs/loss" in r]
    first, last = evals[0], evals[-1]
    assert first["eval/pairs/loss"] == pytest.approx(-torch.nn.functional.logsigmoid(
        torch.tensor(first["eval/pairs/rewards/margins"] - 1.0)).item(), abs=0.05)  # scores start near 0
    assert last["eval/pairs/rewards/accuracies"] >= 0.9 and last["eval/pairs/loss"] < first["eval/pairs/loss"]
    exported = export_checkpoint(trainer.cfg.output_dir, tmp_path / "hf")
    loaded = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    assert loaded.config.num_labels == 1
    ids = torch.tensor([trainer.tokenizer("name some words like alpha")["input_ids"]])
    trainer.strategy.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trainer.strategy.model(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.slow
def test_resume_after_sigterm_is_exact_also_on_another_world_size(tmp_path):
    """Full fine-tuning (the precomputed reference, its pass split over the 2 ranks): stopped by SIGTERM
    on 2 ranks (fsdp), resumed on 1 (single), the run logs the uninterrupted run's losses and rewards."""
    steps = 18
    sections = dict(train={"max_steps": steps, "save_every": 6}, data={"eval": {"fraction": 0.1}},
                    logging={"progress_bar": False})
    configs = {name: write_config(preference_config(tmp_path / name, rows=96, **sections), tmp_path / f"{name}.yaml")
               for name in ("reference", "stopped")}
    run_cli(configs["reference"])
    expected = read_metrics(tmp_path / "reference" / "run")
    config, out = configs["stopped"], tmp_path / "stopped" / "run"
    proc = start_cli(config, "--nproc", "2")
    wait_for_records(out / "metrics.jsonl", 8, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-4000:]
    stopped_at = json.loads((out / "summary.json").read_text())["steps"]
    assert 8 <= stopped_at < steps
    run_cli(config)  # on one rank
    assert sorted(step_losses(out)) == list(range(1, steps + 1))
    got = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    for want in (r for r in expected if "loss" in r):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert got[want["step"]][key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (want["step"], key)
        assert got[want["step"]]["rewards/accuracies"] == want["rewards/accuracies"]
    final = [r for r in read_metrics(out) if "eval/pairs/loss" in r][-1]
    want_final = [r for r in expected if "eval/pairs/loss" in r][-1]
    assert final["eval/pairs/loss"] == pytest.approx(want_final["eval/pairs/loss"], rel=1e-5)


def test_a_bad_pair_stops_the_command_in_one_line_naming_its_line(tmp_path):
    cfg = preference_config(tmp_path, rows=8)
    path = Path(cfg["data"]["datasets"][0]["path"])
    lines = path.read_text().splitlines()
    row = json.loads(lines[4])
    lines[4] = json.dumps({**row, "rejected": row["chosen"]})
    path.write_text("\n".join(lines) + "\n")
    proc = run_cli(write_config(cfg, tmp_path / "config.yaml"), check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("finetrain:")]
    assert len(errors) == 1 and f"{path}:5: " in errors[0] and "the same answer" in errors[0], proc.stderr[-2000:]
