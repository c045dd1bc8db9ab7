"""Scores one choice eval set under several strategies and peft methods on every rank of a
torchrun launch; rank 0 writes each run's log-likelihoods and accuracies as JSON.

    torchrun --nproc-per-node N tests/workers/choice_worker.py SPEC.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from helpers import planned  # noqa: E402
from helpers import method_keys, run_config, tokenizer_of  # noqa: E402
from trainer.build import build_model, build_training  # noqa: E402
from trainer.eval.multiple_choice import accuracy, build_choice_sets, choice_log_likelihoods  # noqa: E402
from trainer.runtime.distributed import agree, end_process, init_distributed  # noqa: E402


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    model_dir, bench, out = Path(spec["model"]), Path(spec["bench"]), Path(spec["out"])
    tokenizer = tokenizer_of(model_dir)
    dist_info = init_distributed()
    results = {}
    for strategy_name, method in spec["runs"]:
        cfg = run_config(out / f"{strategy_name}-{method}", model_dir, bench, parallel__strategy=strategy_name,
                         **method_keys(method))
        plan = agree(lambda: planned(cfg, dist_info.world_size))
        strategy = build_training(cfg, plan, dist_info, tokenizer, 1, lambda: build_model(cfg, tokenizer, "sdpa")).strategy
        choice_set = build_choice_sets(cfg, tokenizer, "sdpa")["bench"]
        lls = choice_log_likelihoods(strategy, choice_set)
        results[f"{strategy_name}-{method}"] = {"lls": lls, "scores": accuracy(choice_set.questions, lls),
                                                "batches": len(choice_set.batches)}
    if dist.get_rank() == 0:
        Path(spec["results"]).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    end_process(0)
