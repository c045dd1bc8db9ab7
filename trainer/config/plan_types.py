"""The run plan's types: what `plan_run` (trainer/plan.py) decides once for a run."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Mesh:
    """How the ranks divide the work: `replicate` groups of `shard` ranks that shard one copy
    of the model (HSDP when replicate > 1); within them, groups of `sequence` consecutive ranks
    read the same rows, each computing `1/sequence` of every row's tokens (sequence
    parallelism). Sequence ranks hold the same weights and their gradients add up like those
    of ranks that read different rows, so the model is sharded over all ranks of a shard group,
    as DeepSpeed's ALST (ZeRO over data x sequence ranks) and torchtitan's context parallelism
    (FSDP over dp_shard x cp) shard it."""

    replicate: int
    shard: int
    sequence: int = 1

    @property
    def data_parallel(self) -> int:
        """Ranks that read different rows."""
        return self.replicate * self.shard // self.sequence



@dataclass(frozen=True)
class RunPlan:
    strategy: str
    world_size: int
    mesh: Mesh
    accumulation: int  # micro-batches per optimizer step on each rank
    master_dtype: torch.dtype
    compute_dtype: torch.dtype
    attention: str
    primary_dataset: str  # the task: the largest weight (the first of equals); the others are rehearsal
    checkpoint_format: str
