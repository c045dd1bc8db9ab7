"""Trains a list of preference runs (tests/helpers.py `PairRun`) on every rank of a torchrun launch;
rank 0 writes each run's per-step loss, gradient norm and rewards as JSON.

    torchrun --nproc-per-node N tests/workers/preference_worker.py SPEC.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from helpers import PairRun, pair_run  # noqa: E402
from trainer.runtime.distributed import end_process, init_distributed  # noqa: E402
from trainer.runtime.errors import UserError  # noqa: E402


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    dist_info = init_distributed()
    results = {}
    for fields in spec["runs"]:
        run = PairRun(**fields)
        try:
            results[run.name] = pair_run(run, Path(spec["out"]), dist_info)
        except UserError as err:  # a refusal of the plan is a result too
            results[run.name] = {"refused": str(err)}
    if dist.get_rank() == 0:
        Path(spec["results"]).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    end_process(0)
