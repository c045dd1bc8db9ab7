"""Process group from the environment: torchrun, Slurm (srun/submitit), or nothing.

A world of one still gets a real process group (over an in-memory store), so the
strategy code and the collectives in the loop run exactly as they do on N ranks.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from trainer.config import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int | None = None) -> int | None:
    for name in names:
        if os.environ.get(name, "") != "":
            return int(os.environ[name])
    return default


def world_from_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size): torchrun's variables first, then Slurm's."""
    rank = _env_int("RANK", "SLURM_PROCID", default=0)
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
    world = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
    return rank, local_rank, world


def slurm_rendezvous() -> None:
    """Under plain `srun python -m trainer` (no torchrun), point every task at the job's
    first node; the port is derived from the job id so concurrent jobs do not collide."""
    if "MASTER_ADDR" in os.environ or "RANK" in os.environ or "SLURM_JOB_NODELIST" not in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()
    os.environ["MASTER_ADDR"] = hosts[0]
    os.environ.setdefault("MASTER_PORT", str(15000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Start the process group for this process; idempotent."""
    slurm_rendezvous()
    rank, local_rank, world = world_from_env()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if world == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            if "MASTER_ADDR" not in os.environ:
                raise UserError(
                    f"WORLD_SIZE={world} but MASTER_ADDR is not set: launch with torchrun or srun "
                    "(finetrain train --nproc N does this for you)"
                )
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout,
                                    device_id=device if backend == "nccl" else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place, returning the tensor (fp64/int64 keep counts exact)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_max(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def agree(step: Callable[[], T]) -> T:
    """Run `step` (which must not communicate) on every rank; a UserError raised on any rank
    is raised on every rank, so that a mistake one rank sees (a bad row it read, a file its
    node lacks) ends them all with the same one-line message, instead of leaving the others
    waiting in the next collective until the job dies with a traceback."""
    error: UserError | None = None
    result = None
    try:
        result = step()
    except UserError as err:
        error = err
    if dist.is_initialized() and dist.get_world_size() > 1:
        seen: list = [None] * dist.get_world_size()
        dist.all_gather_object(seen, None if error is None else (type(error), str(error)))
        first = next((item for item in seen if item is not None), None)
        if error is None and first is not None:
            error = first[0](first[1])
    if error is not None:
        error.agreed = True  # every rank raises it: rank 0 reports it for all
        raise error
    return result


def main_first(step: Callable[[], T]) -> T:
    """Run `step` on rank 0, then on the other ranks (rank 0 fills a cache that the others
    then read); a UserError on any rank is raised on every rank (see `agree`)."""
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    first = agree(lambda: step() if is_main else None)
    later = agree(lambda: None if is_main else step())
    return first if is_main else later
