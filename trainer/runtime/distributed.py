"""Process group from the environment: torchrun, Slurm (srun/submitit), or nothing.

A world of one still gets a real process group (over an in-memory store), so the
strategy code and the collectives in the loop run exactly as they do on N ranks.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Callable, NoReturn, TypeVar

import torch
import torch.distributed as dist

from trainer.runtime import faults
from trainer.runtime.errors import UserError
from trainer.runtime.restarts import restart_number

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


def local_world_size() -> int:
    """Ranks on this node: torchrun's LOCAL_WORLD_SIZE, else Slurm's tasks per node, else 1."""
    tasks = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "")
    return int(tasks) if tasks.isdigit() else 1


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


def attempt_store(timeout: datetime.timedelta):
    """Under torch's elastic agent, the store its ranks meet in, with a prefix of this attempt's own.
    The agent keeps one store for all the attempts of a run, and the keys the process group sets
    up with (each rank's address, NCCL's unique id) would be read by a restarted attempt as the
    failed one left them; None elsewhere (the process group takes its store from the environment)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    return dist.PrefixStore(f"finetrain/restart-{restart_number()}", store)


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
                                    device_id=device if backend == "nccl" else None, store=attempt_store(timeout))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device, backend=backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def end_process(code: int) -> NoReturn:
    """End a rank that has shut down in order (`shutdown`) without finalizing the interpreter.

    Process groups outlive destroy_process_group when libraries still hold them (DeepSpeed's
    group registry and the parameters it tags with their groups, FSDP2's state), and gloo's
    worker threads run until a group is destroyed. Left to interpreter finalization, that
    destruction happens while the interpreter is torn down: a worker thread that then takes
    the GIL to free the last tensor of a collective is ended by the interpreter inside C++
    code that cannot unwind, and the rank aborts ("terminate called without an active
    exception", SIGABRT) after all its work is done, more often on a busy machine. So exit
    handlers run, logs and output are flushed, and the process ends here."""
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


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


NODE_WORK_POLL_S = 0.5


def on_node_leaders(work: Callable[[], None], shared_errors: tuple[type[Exception], ...] = ()) -> None:
    """Run `work` on the first rank of each node while the node's other ranks wait, then end
    every rank alike: if `work` failed on any node, every rank raises. An error of one of
    the `shared_errors` classes is raised on every rank with its class and message (its
    own node's, when several failed), so a user's mistake reads the same everywhere;
    any other failure is re-raised where it happened and reported by the other ranks.

    The ranks wait in short all-reduces, repeated until every leader is done, rather
    than in one collective, whose timeout a long `work` (tokenizing a large data set)
    could exceed; a leader runs `work` in a thread so that it keeps answering them."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        work()
        return
    rank, local_rank = dist.get_rank(), world_from_env()[1]
    failure: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            work()
        except BaseException as err:  # handed to the main thread, which raises it
            failure.append(err)
        finally:
            done.set()

    if local_rank == 0:
        threading.Thread(target=run, name="finetrain-node-work", daemon=True).start()
    else:
        done.set()
    while all_reduce_max(torch.tensor([0 if done.is_set() else 1], dtype=torch.int32)).item():
        faults.touch()  # every rank answered: a long `work` is no hang (parallel.init_timeout_s)
        done.wait(NODE_WORK_POLL_S)
    outcome = None
    if failure:
        error = failure[0]
        shared = isinstance(error, shared_errors)
        outcome = (type(error).__name__ if shared else None, str(error))
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    if failure:
        if isinstance(failure[0], shared_errors):
            failure[0].agreed = True  # every rank raises it: rank 0 reports it for all
        raise failure[0]
    failed = [r for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    leader = rank - local_rank  # ranks are numbered node by node
    source = leader if leader in failed else failed[0]
    kind, message = outcomes[source]
    for cls in shared_errors:
        if cls.__name__ == kind:
            error = cls(message)
            error.agreed = True
            raise error
    raise RuntimeError(f"rank {source} failed: {message}")
