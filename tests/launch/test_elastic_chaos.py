"""The chaos test: a 2-rank run of 32 steps under `finetrain train --max-restarts`, with one fault of
each kind at seeded random steps (bench/chaos_soak.py: SIGKILL to a rank, SIGSTOP to a rank, SIGTERM
to the job, a full disk before a save, flipped bytes in the newest checkpoint), reaches its last step
by itself (a SIGTERM stops the job with a checkpoint, and the job is started again as a scheduler's
requeue would); its final weights and optimizer state equal an uninterrupted run's bit for bit (fp32,
CPU), and every step appears once in metrics.jsonl with the uninterrupted run's loss."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import REPO, read_metrics, trainer_env

pytestmark = pytest.mark.slow

STEPS, SEED = 32, 3
FAULTS = ("kill", "stop", "term", "fill", "flip")


def dcp_state(checkpoint) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = checkpoint.parent / f"{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint / "dcp"), str(target))
    return torch.load(target, weights_only=False)  # written by this test from the run's own checkpoint


def test_a_run_under_seeded_faults_heals_itself_and_ends_as_if_never_interrupted(tmp_path):
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no mount namespace can be made here (unprivileged user namespaces are off)")
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "chaos_soak.py"), "--steps", str(STEPS),
                           "--faults", *FAULTS, "--count", str(len(FAULTS)), "--seed", str(SEED),
                           "--out", str(tmp_path / "work"), "--json", str(report)],
                          capture_output=True, text=True, cwd=REPO, env=trainer_env(), timeout=900)
    result = json.loads(report.read_text())
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:], result)
    assert sorted(f["fault"] for f in result["injected"]) == sorted(FAULTS), result["injected"]
    assert result["launches"] == 2  # the first, and the one after the SIGTERM

    faulty, reference = tmp_path / "work" / "faulty", tmp_path / "work" / "reference"
    # every step once, with the uninterrupted run's loss, bit for bit
    logged = [(r["step"], r["loss"]) for r in read_metrics(faulty) if "loss" in r]
    expected = [(r["step"], r["loss"]) for r in read_metrics(reference) if "loss" in r]
    assert sorted(logged) == expected and [s for s, _ in expected] == list(range(1, STEPS + 1))
    # the final weights and optimizer state, bit for bit
    final = f"step-{STEPS:08d}"
    # (the faulty run's checkpoints were on a tmpfs of the script's namespace: it copied out the last)
    assert json.loads((faulty / "final-checkpoint" / "COMPLETE").read_text())["step"] == STEPS
    got, want = dcp_state(faulty / "final-checkpoint"), dcp_state(reference / "checkpoints" / final)
    assert got["model"].keys() == want["model"].keys()
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    assert torch.equal(torch.cat([t.flatten() for t in _tensors(got["optim"])]),
                       torch.cat([t.flatten() for t in _tensors(want["optim"])]))
    # four restarts (kill, stop, full disk, flipped checkpoint), each one line and one record
    restarts = [r for r in read_metrics(faulty) if "restart" in r]
    assert [r["restart"] for r in restarts] == [1, 2, 3, 4], restarts
    assert result["restarts_said"] == 4
    causes = " | ".join(r["cause"] for r in restarts)
    assert "killed by SIGKILL" in causes and "no space left on device" in causes and "its process is stopped" in causes
    summary = json.loads((faulty / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["restarts"] == 4
    assert summary["steps_recomputed"] == sum(r["steps_recomputed"] for r in restarts) > 0
    assert "fails its checksums" in (faulty / "logs" / "rank-0.log").read_text()  # the flipped checkpoint skipped


def _tensors(state):
    if torch.is_tensor(state):
        return [state.to(torch.float64)]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in _tensors(item)]
    return [torch.tensor([float(state)], dtype=torch.float64)] if isinstance(state, (int, float)) else []
