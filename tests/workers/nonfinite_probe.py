"""On every rank of a torchrun launch, for each strategy named: the loop's `train_step` three times
(steps 0, 1, 2 of parallel_worker's rows) with step 1's forward turned to NaN on the last rank only,
then from the same initial weights steps 0 and 2 alone. Writes what rank 0 saw as JSON:

    torchrun --nproc-per-node N tests/workers/nonfinite_probe.py OUT.json STRATEGY...

- `flags`: every rank's `nonfinite` of each step (all ranks must drop step 1 alike);
- `lrs`: the rate of each step (a dropped step leaves the schedule where it was);
- `changed_by_dropped`: max |weight change| over the dropped step (0: no update);
- `vs_without`: max |weight difference| at the end against the run without step 1 (0: the
  dropped step left no trace: gradients, optimizer state and schedule as if it never ran).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from helpers import planned  # noqa: E402
from helpers import Run, as_batches, make_config, make_model, rank_micro_batches, toy_tokenizer  # noqa: E402
from trainer.build import build_training  # noqa: E402
from trainer.loop import train_step  # noqa: E402
from trainer.model.structure import decoder_layers  # noqa: E402
from trainer.runtime.distributed import end_process, init_distributed  # noqa: E402


def poison(output):
    """A decoder layer's output with NaN in it."""
    if isinstance(output, tuple):
        return (output[0] * float("nan"), *output[1:])
    return output * float("nan")


def full_state(strategy) -> dict:
    return {k: v.detach().clone().float() for k, v in strategy.full_state_dict().items()}


def max_difference(a: dict, b: dict) -> float:
    if not a:  # not rank 0
        return -1.0
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def train(strategy_name: str, steps: list[int], poisoned: int | None, out: Path, dist_info) -> dict:
    run = Run(name=f"{strategy_name}-{len(steps)}", strategy=strategy_name, steps=len(steps))
    cfg = make_config(run, out, dist_info.world_size)
    cfg.optim.max_grad_norm = 0.0  # no clipping: the NaN reaches the update unless it is dropped
    strategy = build_training(cfg, planned(cfg, dist_info.world_size), dist_info, toy_tokenizer(), 4,
                              lambda: make_model(cfg)).strategy
    flags, lrs, changed = [], [], None
    for step in steps:
        hook = None
        if step == poisoned and dist_info.rank == dist_info.world_size - 1:
            hook = decoder_layers(strategy.unwrapped_model())[0].register_forward_hook(
                lambda module, args, output: poison(output))
        before = full_state(strategy) if step == poisoned else None
        result = train_step(strategy, as_batches(rank_micro_batches(step, run)), "causal_lm")
        if hook is not None:
            hook.remove()
        if before is not None:
            changed = max_difference(before, full_state(strategy))
        everyone = [None] * dist_info.world_size
        dist.all_gather_object(everyone, result["nonfinite"])
        flags.append(everyone)
        lrs.append(result["lr"])
    return {"flags": flags, "lrs": lrs, "changed_by_dropped": changed, "final": full_state(strategy)}


def main(out_path: str, strategies: list[str]) -> None:
    dist_info = init_distributed()
    out = Path(out_path).parent
    results = {}
    for name in strategies:
        dropped = train(name, [0, 1, 2], 1, out, dist_info)
        without = train(name, [0, 2], None, out, dist_info)
        results[name] = {"flags": dropped["flags"], "lrs": dropped["lrs"], "lrs_without": without["lrs"],
                         "changed_by_dropped": dropped["changed_by_dropped"],
                         "vs_without": max_difference(dropped["final"], without["final"])}
    if dist_info.rank == 0:
        Path(out_path).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1], sys.argv[2:])
    end_process(0)
