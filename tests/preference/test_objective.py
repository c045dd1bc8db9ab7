"""The preference objective (trainer/preference/objective.py) keeps invariants 2 and 3 for pairs: the
loss is the mean over all pairs of the step on all ranks and micro-batches, so how the step's rows
are split into micro-batches and ranks does not change the update, and every strategy (ddp, fsdp,
zero1-3; full fine-tuning with a frozen copy as the reference, LoRA with its adapter switched off)
follows the single-device curve, packed and unpacked, DPO and KTO."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from helpers import REPO, PairRun, pair_run
from trainer.runtime.distributed import init_distributed

WORKER = REPO / "tests" / "workers" / "preference_worker.py"
RTOL = 1e-4
# The single-device references, in this process: name -> the run.
SINGLE = {"full": PairRun("single", "single", micro=8, accum=1),
          "lora": PairRun("single-lora", "single", micro=8, accum=1, peft="lora", reference="adapter"),
          "kto": PairRun("single-kto", "single", micro=8, accum=1, loss="kto"),
          "unpacked": PairRun("single-unpacked", "single", micro=8, accum=1, packed=False)}
# On 2 ranks: name -> (the reference it follows, the run).
SHARDED = {
    **{s: ("full", PairRun(s, s)) for s in ("ddp", "fsdp", "zero1", "zero2", "zero3")},
    **{f"{s}-lora": ("lora", PairRun(f"{s}-lora", s, peft="lora", reference="adapter"))
       for s in ("ddp", "fsdp", "zero2", "zero3")},
    "ddp-micro1": ("full", PairRun("ddp-micro1", "ddp", micro=1, accum=4)),
    "fsdp-kto": ("kto", PairRun("fsdp-kto", "fsdp", loss="kto")),
    "zero2-unpacked": ("unpacked", PairRun("zero2-unpacked", "zero2", packed=False)),
}


def assert_same_curve(got: dict, want: dict, what: str) -> None:
    for key in ("losses", "grad_norms", "margins"):
        torch.testing.assert_close(torch.tensor(got[key], dtype=torch.float64),
                                   torch.tensor(want[key], dtype=torch.float64), rtol=RTOL, atol=1e-6,
                                   msg=lambda m: f"{what} {key}: {m}")
    assert got["accuracies"] == want["accuracies"] and got["pairs"] == want["pairs"], what


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    out, dist_info = tmp_path_factory.mktemp("single"), init_distributed()
    return {name: pair_run(run, out, dist_info) for name, run in SINGLE.items()}


def test_micro_batches_do_not_change_the_step(single, tmp_path):
    """Eight packed rows as one micro-batch or as four: the same losses, gradients and rewards."""
    split = pair_run(PairRun("single-micro2", "single", micro=2, accum=4), tmp_path, init_distributed())
    assert_same_curve(split, single["full"], "single micro 2 x 4")
    for run in single.values():
        assert run["losses"][0] == pytest.approx(math.log(2) if run is not single["kto"] else 0.5, abs=1e-6)
    assert single["full"]["pairs"] == [16, 16, 16] and single["unpacked"]["pairs"] == [8, 8, 8]
    assert abs(single["full"]["losses"][-1] - math.log(2)) > 1e-4  # the weights moved: equal curves are not trivial


@pytest.mark.slow
def test_every_strategy_follows_the_single_device_curve(single, tmp_path):
    spec, results = tmp_path / "spec.json", tmp_path / "results.json"
    spec.write_text(json.dumps({"out": str(tmp_path / "runs"), "results": str(results),
                                "runs": [run.__dict__ for _, run in SHARDED.values()]}))
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or \
        str(Path(tempfile.gettempdir()) / f"finetrain-torch-extensions-{os.getuid()}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=extensions, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend",
                           "c10d", "--rdzv-endpoint", "localhost:0", str(WORKER), str(spec)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    got = json.loads(results.read_text())
    for name, (reference, _) in SHARDED.items():
        assert "refused" not in got[name], got[name]
        assert_same_curve(got[name], single[reference], name)
