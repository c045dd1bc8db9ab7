"""`finetrain eval`: lm-evaluation-harness on an exported merged model, a peft checkpoint (merged
in memory, or base + adapter), a run folder, an adapter folder and on 2 local ranks gives one
score on a finetrain choice file passed as a task, the score the run's own evaluation gave it;
mistakes end in one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (REPO, TINY_LLAMA, causal_config, chat_rows, choice_rows, read_metrics, run_cli, trainer_env,
                     write_config, write_jsonl)
from trainer.model.tokenizer import train_bpe_tokenizer


def finetrain(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=trainer_env(), timeout=timeout)


def finetrain_here(capsys, *args: str) -> tuple[int, str, str]:
    """`finetrain ARGS` in this process (the harness is imported once for all the calls)."""
    from launch.cli import main

    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A saved tiny Llama with its tokenizer: the pretrained base an adapter folder names."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("base")
    texts = [m["content"] for r in chat_rows(200) for m in r["messages"]]
    train_bpe_tokenizer(texts, vocab_size=TINY_LLAMA["vocab_size"]).save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_model) -> tuple[Path, Path, dict]:
    """(run folder, choice file, the run's last eval record): LoRA on the base, with the
    choice file as an eval set, exported merged and as an adapter folder."""
    tmp = tmp_path_factory.mktemp("lora-run")
    bench = write_jsonl(tmp / "bench.jsonl", choice_rows(16))
    cfg = causal_config(tmp, rows=96, train={"max_steps": 6}, optim={"lr": 2e-2, "warmup_steps": 0},
                        peft={"method": "lora", "r": 4, "alpha": 8},
                        data={"eval": {"sets": [{"name": "bench", "path": str(bench), "format": "choice",
                                                 "fields": {"context": "question"}}]}})
    cfg["model"] = {"path": str(base_model)}
    run_cli(write_config(cfg, tmp / "config.yaml"))
    run_dir = Path(cfg["run"]["output_dir"])
    from trainer.checkpoint.export import export_checkpoint

    export_checkpoint(run_dir, run_dir / "merged", merge=True)
    export_checkpoint(run_dir, run_dir / "adapter")
    evals = [r for r in read_metrics(run_dir) if "eval/bench/acc" in r]
    assert [r["step"] for r in evals] == [0, 6]
    return run_dir, bench, evals[-1]


def scores(results: Path) -> dict:
    bench = json.loads(results.read_text())["results"]["bench"]
    return {"acc": bench["acc,none"], "acc_norm": bench["acc_norm,none"]}


@pytest.mark.slow
def test_every_way_to_name_the_model_gives_the_runs_own_score(lora_run, tmp_path, capsys):
    run_dir, bench, last = lora_run
    expected = {"acc": last["eval/bench/acc"], "acc_norm": last["eval/bench/acc_norm"]}
    checkpoint = run_dir / "checkpoints" / "step-00000006"
    ways = {"checkpoint": [str(checkpoint)], "checkpoint unmerged": [str(checkpoint), "--no-merge"],
            "merged export": [str(run_dir / "merged")], "adapter folder": [str(run_dir / "adapter")]}
    got = {}
    for way, args in ways.items():
        out = tmp_path / f"{way.replace(' ', '-')}.json"
        code, stdout, stderr = finetrain_here(capsys, "eval", *args, "--tasks", str(bench), "--fields",
                                              "context=question", "--out", str(out))
        assert code == 0, (way, stderr[-3000:])
        assert "|bench|" in stdout.replace(" ", "") and f"results: {out}" in stdout
        got[way] = scores(out)
    # a run folder (its newest checkpoint) on 2 local ranks; the results next to the run
    proc = finetrain("eval", str(run_dir), "--tasks", str(bench), "--fields", "context=question", "--nproc", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = run_dir / "lm_eval" / "step-00000006.json"
    assert proc.stdout.count(f"results: {results}") == 1  # rank 0 alone
    got["run folder on 2 ranks"] = scores(results)
    assert json.loads(results.read_text())["finetrain"]["world_size"] == 2
    assert all(value == expected for value in got.values()), (expected, got)
    assert 0 < expected["acc"] < 1


def test_mistakes_end_in_one_line(tmp_path, base_model, capsys):
    code, _, err = finetrain_here(capsys, "eval", str(tmp_path), "--tasks", "x")
    assert code == 2 and err.strip().splitlines() == [
        f"finetrain: {tmp_path}: neither a finetrain checkpoint or run folder (COMPLETE, config.yaml) nor a Hugging "
        "Face folder (config.json, adapter_config.json)"]
    code, _, err = finetrain_here(capsys, "eval", str(base_model), "--tasks", str(tmp_path / "missing.yaml"))
    assert code == 2 and err.strip().splitlines()[-1] == f"finetrain: --tasks {tmp_path / 'missing.yaml'}: no such file"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"context": "c", "choices": ["a", "b"], "answer": 0},
                                               {"context": "c", "choices": ["a", "b"], "answer": 5}])
    code, _, err = finetrain_here(capsys, "eval", str(base_model), "--tasks", str(bad))
    assert code == 2 and err.strip().splitlines()[-1] == f'finetrain: {bad}:2: field "answer": 5 is not among the 2 choices'
    code, _, err = finetrain_here(capsys, "eval", str(base_model), "--tasks", "no_such_task", "--include-path",
                                  str(tmp_path))
    assert code == 2 and err.strip().splitlines()[-1].startswith("finetrain: --tasks: no task no_such_task in ")
