"""`finetrain check`: the plan printed with nothing started (the counts are the data's own, the run
folder stays empty), and a broken config is the one line `train` prints, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO, causal_config, trainer_env, write_config, write_jsonl


def finetrain_check(config, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", "check", str(config), *args], capture_output=True,
                          text=True, cwd=REPO, env=trainer_env(), timeout=300)


@pytest.mark.slow
def test_check_prints_the_plan_with_the_datas_counts_and_starts_nothing(tmp_path):
    rehearsal = write_jsonl(tmp_path / "data" / "general.jsonl", [{"text": f"general text {i}"} for i in range(30)])
    cfg = causal_config(tmp_path, rows=60, data={"eval": {"fraction": 0.1}},
                        parallel={"mixed_precision": "auto"})
    cfg["data"]["datasets"].append({"name": "general", "path": str(rehearsal), "format": "text", "weight": 0.25})
    cfg["data"]["datasets"][0]["weight"] = 0.75
    proc = finetrain_check(write_config(cfg, tmp_path / "c.yaml"), "--nproc", "2", "train.global_batch_size=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[1] == "strategy    fsdp: mesh 1 replicate x 2 shard, sequence groups of 1, 2 data-parallel rank(s)"
    assert lines[2] == ("batch       8 rows of up to 64 tokens per step = 2 per micro-batch x 2 data-parallel rank(s) x "
                        "2 accumulation step(s)")
    assert lines[3].startswith("dtypes      master float32, compute ") and "(auto: " in lines[3]
    sft = next(line for line in lines if line.startswith("  sft"))
    assert "weight 0.75 = 75.0% of examples: 60 examples (" in sft and ", 6 held out)" in sft
    general = next(line for line in lines if line.startswith("  general"))
    assert "(text), weight 0.25 = 25.0% of examples: 30 examples (" in general
    assert any(line.startswith("memory      ") and "per device" in line for line in lines)
    assert not (tmp_path / "run").exists()  # nothing written into the run folder


@pytest.mark.slow
def test_a_broken_config_or_world_is_one_line_exit_2(tmp_path):
    config = write_config(causal_config(tmp_path, rows=8), tmp_path / "c.yaml")
    proc = finetrain_check(config, "--nproc", "3")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"finetrain: {config}:") and line.endswith(
        ": train.global_batch_size: 4 rows per step do not split into micro-batches of 2 on 3 ranks; use a multiple of 6")
    proc = finetrain_check(config, "--nproc", "2", "--nodes", "1")
    assert proc.returncode == 2 and "not both" in proc.stderr
