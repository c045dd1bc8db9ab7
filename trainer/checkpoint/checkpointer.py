"""Atomic, checksummed checkpoints; retention; resume discovery.

A checkpoint is the folder `checkpoints/step-00000042/`. It is written as
`.incomplete-step-00000042/`, gets its completion mark `COMPLETE` last, and is then
renamed into place, so a run killed mid-save leaves only a folder that resume
ignores (and the next save clears). Inside: the strategy's own files (DCP shards,
or DeepSpeed's), the trainer state (`trainer_state.json`: step, data loader position,
counters, forgetting monitor, summary, W&B run id; its tensors in
`trainer_state.safetensors`), the resolved `config.yaml` and the `tokenizer/`, so that a
checkpoint is exportable on its own. Nothing in it is a pickle that finetrain unpickles
freely: DCP's own `.metadata` is read through an allow-list (trainer/parallel/dcp.py), and
every other pickle of any strategy (DeepSpeed's files too, before DeepSpeed reads them) with
torch's weights-only unpickler and an allow-list (trainer/parallel/safe_load.py).

The mark lists every file with its size and checksum (trainer/checkpoint/checksums.py). The loop only
waits while the state is written (or, with `checkpoint.async`, copied to host memory): each
rank sums its own shards in a background thread, and once every rank is done (`poll`, a
small collective at each step) rank 0 sums the rest, writes the mark, renames and applies
retention, in the background too. A write that fails (a full disk, a permission, an I/O
error) ends the run on every rank with one line naming the path and the cause (exit code 5,
which a restart retries; 2 for a folder the run may not write); the half-written folder is
removed and every earlier checkpoint stays as it was. Weights that
are not finite are never saved. Resume verifies the checksums first (spread over the ranks);
`resume: auto` falls back to the newest checkpoint that verifies.

No RNG state is stored: every step reseeds torch from (run.seed, step, rank)
(`seed_step`), which makes a resumed step draw exactly what it would have drawn,
at any world size.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.checkpoint.checksums import ALGORITHM, checkpoint_files, sum_files, sum_own_files
from trainer.checkpoint.layout import (COMPLETE_MARK, checkpoint_bytes, checkpoint_problem, complete_checkpoints,
                                       folder_bytes, read_mark, step_dir_name)
from trainer.checkpoint.trainer_state import encode_trainer_state, read_trainer_state
from trainer.config.schema import Config, dump_yaml
from trainer.parallel.dcp import BackgroundWriter
from trainer.runtime.distributed import DistInfo, agree, barrier
from trainer.runtime.errors import ConfigError, UserError
from trainer.runtime.faults import EXIT_SAVE_FAILED
from trainer.runtime.memory import format_bytes

log = logging.getLogger("finetrain")

_ALMOST_FULL = 1 << 20  # bytes free below which a write that failed without an errno ran out of space


# ------------------------------------------------------------------------ faults


class CheckpointWriteError(UserError):
    """A checkpoint that could not be written: a full disk, a permission, an I/O error. A folder the
    run may not write into is the user's to fix (exit code 2); anything else (no space, a quota, an
    I/O error) may pass, and a restart resumes from the last checkpoint (EXIT_SAVE_FAILED)."""

    def __init__(self, message: str, errno_: int | None = None):
        super().__init__(message)
        self.exit_code = 2 if errno_ in _NOT_ALLOWED else EXIT_SAVE_FAILED


# Failures to write that only the user can fix: the folder may not be written, or is not one.
_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR)


def weights_finite(strategy) -> bool:
    """Whether this rank's part of the trained weights is free of NaN and inf. A NaN or inf
    makes a tensor's 2-norm NaN or inf, and the fused 2-norms of all tensors cost one pass
    over the weights (a 10th of checking each value on a CPU); only when a norm is not finite,
    which very large but finite values can also cause, is each value looked at."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for tensor in strategy.local_weights():
        if tensor.is_floating_point() and tensor.numel():
            groups.setdefault((tensor.device, tensor.dtype), []).append(tensor.detach())
    for group in groups.values():
        if not bool(torch.isfinite(torch.stack(torch._foreach_norm(group, 2.0))).all()):
            if not all(bool(torch.isfinite(tensor).all()) for tensor in group):
                return False
    return True


def _exception_chain(err: BaseException) -> list[BaseException]:
    """`err`, what caused it, and the failures DCP gathered from each rank, breadth first."""
    seen, queue, chain = set(), [err], []
    while queue:
        exc = queue.pop(0)
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        chain.append(exc)
        queue += [exc.__cause__, exc.__context__]
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict):
            queue += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return chain


_STREAM_WRITE_FAILED = ("unexpected pos", "iostream error", "file write failed", "PytorchStreamWriter failed")


def describe_write_failure(err: BaseException, rank: int) -> dict | None:
    """{path, errno, cause, rank} of a failed checkpoint write, or None when `err` is not a
    failure to write (a bug, kept with its traceback)."""
    chain = _exception_chain(err)
    for exc in chain:
        if isinstance(exc, OSError):
            return {"path": exc.filename, "errno": exc.errno, "cause": exc.strerror or str(exc), "rank": rank}
    for exc in chain:  # torch.save's C++ writer reports a failed write without its errno
        text = str(exc)
        if any(marker in text for marker in _STREAM_WRITE_FAILED):
            return {"path": None, "errno": None, "cause": text.splitlines()[0], "rank": rank}
    return None


class Collectives:
    """The checkpointer's small collectives (a max of a few flags, a gather of small objects),
    whose work handles it keeps for a while.

    A gloo worker thread frees a finished collective's tensors once the caller has moved on,
    and must take the GIL to do so. Should that be the last reference and the process group be
    destroyed just then (at the end of a run, by a DDP reducer freed with the GIL held), the
    destructor waits for the thread and the thread for the GIL: the rank hangs at exit. Kept
    here, every handle is freed on the calling thread, long after its collective finished."""

    KEPT = 64

    def __init__(self, device: torch.device):
        self.device = device
        self.kept: collections.deque = collections.deque(maxlen=self.KEPT)
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def max(self, *flags: int) -> list[int]:
        values = torch.tensor(flags, dtype=torch.int64, device=self.device)
        if self.world > 1:
            self._run(dist.all_reduce(values, op=dist.ReduceOp.MAX, async_op=True))
        return values.tolist()

    def gather(self, value) -> list:
        """`value` of every rank, on every rank."""
        if self.world == 1:
            return [value]
        data = pickle.dumps(value)
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        self._run(dist.all_gather(sizes, size, async_op=True))
        longest = max(int(n.item()) for n in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        mine = mine.to(self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        self._run(dist.all_gather(parts, mine, async_op=True))
        return [pickle.loads(part[:int(n.item())].cpu().numpy().tobytes()) for part, n in zip(parts, sizes)]

    def _run(self, work) -> None:
        work.wait()
        self.kept.append(work)


def _completed(error: BaseException | None = None) -> futures.Future:
    future: futures.Future = futures.Future()
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
    return future


# ------------------------------------------------------------------------ the checkpointer


@dataclass
class InFlight:
    """A checkpoint between its write and its seal; every rank holds the same one."""

    step: int
    staging: Path
    final: Path
    part: futures.Future  # this rank's files written and summed: {file: {size, checksum}}
    sealing: futures.Future | None = None  # rank 0: mark, rename, retention
    sealing_started: bool = False


class Checkpointer:
    def __init__(self, cfg: Config, dist_info: DistInfo, plan):
        self.cfg = cfg
        self.dist = dist_info
        self.plan = plan
        self.directory = cfg.checkpoint_dir
        self.inflight: InFlight | None = None
        self.waited_s = 0.0  # seconds the training loop spent in save and poll: the metrics' checkpoint_wait_s
        self._constant_files: dict[str, bytes] | None = None  # config and tokenizer: rendered once
        self._space_warned = False
        self._background = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-files")
        self.comm = Collectives(dist_info.device)
        self.writer = BackgroundWriter(dist_info.device) if cfg.checkpoint.async_ else None

    # ------------------------------------------------------------------ resume
    def resume_path(self) -> Path | None:
        """The checkpoint to resume from, verified (collective): `auto` takes the newest that
        passes its checksums, warning about each newer one that does not; a checkpoint named
        by hand that fails is refused."""
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return None
        if resume == "auto":
            found = complete_checkpoints(self.directory)
            failed = []
            for candidate in reversed(found):
                problem = self.verify(candidate)
                if problem is None:
                    if failed and self.dist.is_main:
                        log.warning("resuming from %s, the newest checkpoint that passes its checksums", candidate)
                    return candidate
                failed.append(candidate)
                if self.dist.is_main:
                    log.warning("checkpoint %s fails its checksums (%s): not resuming from it", candidate, problem)
            if failed:
                raise UserError(f"checkpoint.resume: auto: no checkpoint in {self.directory} passes its checksums "
                                f"(the newest, {failed[0].name}, fails); move them aside, or start over with "
                                "checkpoint.resume=never run.overwrite=true")
            return None
        path = Path(resume)
        read_mark(path)  # refuse a half-written folder given by hand, too
        problem = self.verify(path)
        if problem is not None:
            raise UserError(f"checkpoint.resume: {path} fails its checksums ({problem}); refusing to resume from it")
        return path

    def verify(self, path: Path) -> str | None:
        """Collective: each rank checks its share of the files; the first problem found, or None."""
        started = time.perf_counter()
        problems = self.comm.gather(checkpoint_problem(path, self.dist.rank, self.dist.world_size))
        problem = next((p for p in problems if p is not None), None)
        if problem is None and self.dist.is_main:
            log.info("verified the checksums of %s in %.1f s", path, time.perf_counter() - started)
        return problem

    def load(self, path: Path, strategy) -> dict:
        mark = read_mark(path)
        saved_format, wanted = mark["format"], self.plan.checkpoint_format
        if saved_format != wanted:
            raise ConfigError(
                f"parallel.strategy: checkpoint {path} was written by strategy {mark['strategy']} ({saved_format} format); "
                f"parallel.strategy {self.plan.strategy} reads {wanted} checkpoints. Resume with the same "
                "family of strategy, or start fresh with checkpoint.resume=never"
            )
        state = read_trainer_state(path)  # before the weights: a refused state stops before anything heavy
        strategy.load(path)
        log.info("resumed from %s (step %d, saved on %d ranks)", path, mark["step"], mark["world_size"])
        return state

    # ------------------------------------------------------------------ save
    def save(self, step: int, strategy, trainer_state: dict, tokenizer, wait: bool = False) -> Path:
        """Collective: every rank writes its shards; each sums its own in the background, and
        rank 0 seals the checkpoint once all have (`poll`), or before this returns when `wait`
        (a stop, the last step). With `checkpoint.async` the write is in the background too."""
        started = time.perf_counter()
        self.wait()  # one checkpoint in flight at a time
        final = self.directory / step_dir_name(step)
        staging = self.directory / f".incomplete-{step_dir_name(step)}"
        agree(lambda: self._prepare(step, staging, strategy))
        files = self._main_rank_files(trainer_state, tokenizer) if self.dist.is_main else {}
        writes = []
        try:
            if self.writer is None:
                strategy.save(staging)
                writes.append(_completed())
            else:
                writes.append(strategy.save_async(staging, self.writer))
        except Exception as err:  # every rank goes on to agree on the outcome below, or in poll/wait
            writes.append(_completed(err))
        except BaseException as err:  # DCP's CheckpointException derives from BaseException
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            writes.append(_completed(err))
        if files:
            writes.append(self._background.submit(_write_files, staging, files))
        part = self._background.submit(self._finish_part, writes, staging)
        self.inflight = InFlight(step, staging, final, part)
        if wait or (self.writer is None and self._failed_on_any_rank(writes[0])):
            self.wait()  # a blocking write that failed ends the run here, not a step later
        self.waited_s += time.perf_counter() - started
        return final

    def poll(self) -> None:
        """Move the checkpoint in flight on, if it can: once every rank's part is written and
        summed, rank 0 seals it in the background; once sealed, it is done; a failure on any
        rank ends the run on every rank. Collective: call it on every rank at the same point of
        every step."""
        if self.inflight is None:
            return
        started = time.perf_counter()
        self._advance(block=False)
        self.waited_s += time.perf_counter() - started

    def wait(self) -> None:
        """Block until the checkpoint in flight is written and sealed (collective)."""
        if self.inflight is None:
            return
        while self.inflight is not None:
            self._advance(block=True)

    def close(self) -> None:
        """Release the background writer's buffers and threads (after the last `wait`)."""
        if self.writer is not None:
            self.writer.close()
        self._background.shutdown(wait=False)

    def _advance(self, block: bool) -> None:
        f = self.inflight
        if block:
            futures.wait([f.sealing] if f.sealing is not None else [] if f.sealing_started else [f.part])
        failed = (f.part.done() and f.part.exception() is not None) or \
                 (f.sealing is not None and f.sealing.done() and f.sealing.exception() is not None)
        unsealed = self.dist.is_main and not (f.sealing is not None and f.sealing.done())
        busy, failed, unsealed = (bool(x) for x in self.comm.max(0 if f.part.done() else 1, int(failed), int(unsealed)))
        if busy:
            return
        if failed:
            self._fail(f)
        if not f.sealing_started:
            sums = {}
            for part in self.comm.gather(f.part.result()):
                sums.update(part)
            f.sealing_started = True
            if self.dist.is_main:
                f.sealing = self._background.submit(self._seal, f, sums)
        elif not unsealed:
            self.inflight = None

    def _failed_on_any_rank(self, write: futures.Future) -> bool:
        """Collective: whether a write that has finished on every rank failed on any."""
        return bool(self.comm.max(int(write.exception() is not None))[0])

    def _finish_part(self, writes: list[futures.Future], staging: Path) -> dict:
        """After this rank's writes: the checksums of the files it wrote (rank 0 sums the rest as it seals)."""
        futures.wait(writes)
        for write in writes:
            if write.exception() is not None:
                raise write.exception()
        if self.dist.is_main:
            return {}
        return sum_own_files(staging, self.dist.rank, self.dist.world_size)

    def _prepare(self, step: int, staging: Path, strategy) -> None:
        """Refuse weights that hold NaN or inf (each rank looks at its own part); on rank 0,
        the staging folder, empty, and a warning when the last checkpoint would not fit."""
        if not weights_finite(strategy):
            kept = complete_checkpoints(self.directory)
            last = f"the last checkpoint, {kept[-1]}, is kept" if kept else "no checkpoint was saved before"
            raise UserError(f"step {step}: the weights hold NaN or inf; not saving them ({last})")
        if not self.dist.is_main:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".incomplete-*"):
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir()
        except OSError as err:
            raise CheckpointWriteError(f"checkpoint step {step}: cannot write {err.filename or staging}: "
                                       f"{err.strerror or err}", err.errno) from err
        if self._space_warned:
            return
        previous = complete_checkpoints(self.directory)
        if previous:
            needed, free = checkpoint_bytes(previous[-1]), shutil.disk_usage(self.directory).free
            if needed > free:
                self._space_warned = True
                log.warning("checkpoint: %s has %s free and the last checkpoint took %s: the next one may not fit "
                            "(free some space, or lower checkpoint.keep_last)", self.directory,
                            format_bytes(free), format_bytes(needed))

    def _fail(self, f: InFlight) -> None:
        """A write failed on some rank: remove the half-written folder and end the run on every
        rank, with one line naming the path and the cause (and the space needed and free)."""
        local = f.part.exception()
        if local is None and f.sealing is not None:
            local = f.sealing.exception()
        described = describe_write_failure(local, self.dist.rank) if local is not None else None
        report = None if local is None else described or {"bug": f"{type(local).__name__}: {local}", "rank": self.dist.rank}
        failures = [x for x in self.comm.gather(report) if x is not None]
        self.inflight = None
        message = self._failure_message(f, failures) if self.dist.is_main else ""
        writes = [x for x in failures if "bug" not in x]
        first_errno = next((x["errno"] for x in writes if x["errno"] is not None), None)
        barrier()  # the half-written folder is gone before any rank ends
        if local is not None and described is None:
            raise local  # not a failure to write: a bug, with its traceback
        if not any("bug" not in x for x in failures):
            raise RuntimeError(f"checkpoint step {f.step}: rank {failures[0]['rank']} failed while writing it "
                               f"({failures[0]['bug']})")
        error = CheckpointWriteError(message or f"checkpoint step {f.step} could not be written", first_errno)
        error.agreed = True
        raise error from local

    def _failure_message(self, f: InFlight, failures: list[dict]) -> str:
        """Rank 0: clean up, then say what failed."""
        written = folder_bytes(f.staging) if f.staging.is_dir() else 0
        free_before = _free_bytes(self.directory)
        shutil.rmtree(f.staging, ignore_errors=True)
        writes = [x for x in failures if "bug" not in x]
        if not writes:
            return ""
        first = next((x for x in writes if x["errno"] is not None), writes[0])
        path = first["path"] or f.staging
        no_space = first["errno"] in (errno.ENOSPC, errno.EDQUOT) or \
            (first["errno"] is None and free_before is not None and free_before < _ALMOST_FULL)
        cause = "no space left on device" if no_space else first["cause"]
        if no_space:
            previous = complete_checkpoints(self.directory)
            needed = f"about {format_bytes(checkpoint_bytes(previous[-1]))}" if previous else \
                f"more than the {format_bytes(written)} written"
            free = _free_bytes(self.directory)
            cause += f" ({needed} needed, {format_bytes(free) if free is not None else 'unknown'} free)"
        kept = complete_checkpoints(self.directory)
        after = f"{kept[-1].name} is intact" if kept else "no earlier checkpoint"
        return (f"checkpoint step {f.step}: cannot write {path} (rank {first['rank']}): {cause}; "
                f"the half-written checkpoint was removed, {after}")

    def _main_rank_files(self, trainer_state: dict, tokenizer) -> dict[str, bytes]:
        """Rank 0's own files of a checkpoint, as bytes taken now (training goes on changing
        the objects they come from while they are written in the background)."""
        if self._constant_files is None:
            with tempfile.TemporaryDirectory() as rendered:
                tokenizer.save_pretrained(rendered)
                self._constant_files = {f"tokenizer/{path.relative_to(rendered)}": path.read_bytes()
                                        for path in sorted(Path(rendered).rglob("*")) if path.is_file()}
            self._constant_files["config.yaml"] = dump_yaml(self.cfg).encode()
        return {**encode_trainer_state(trainer_state), **self._constant_files}

    def _seal(self, f: InFlight, sums: dict[str, dict]) -> None:
        """Rank 0, every rank's part written and summed: sum the rest, write the COMPLETE mark,
        then the final name, then retention."""
        names = checkpoint_files(f.staging)
        lost = sorted(set(sums) - set(names))
        if lost:
            raise RuntimeError(f"{f.staging}: {lost[0]} was summed but is gone")
        files = {**{n: sums[n] for n in names if n in sums}, **sum_files(f.staging, [n for n in names if n not in sums])}
        mark = {"step": f.step, "world_size": self.dist.world_size, "strategy": self.plan.strategy,
                "format": self.plan.checkpoint_format, "finite": True, "checksum": ALGORITHM, "files": dict(sorted(files.items()))}
        _write_synced(f.staging / COMPLETE_MARK, json.dumps(mark, indent=1))
        if f.final.exists():  # same step saved again (e.g. signal right after a periodic save)
            shutil.rmtree(f.final)
        os.rename(f.staging, f.final)
        _fsync_dir(self.directory)
        self._apply_retention()
        log.info("saved checkpoint %s", f.final)

    def _apply_retention(self) -> None:
        """Keep the last `checkpoint.keep_last`, and never the newest checkpoint whose weights
        are known finite (every checkpoint written since the check; not those written before)."""
        found = complete_checkpoints(self.directory)
        keep = set(found[-self.cfg.checkpoint.keep_last:])
        for path in reversed(found):
            try:
                finite = read_mark(path).get("finite") is True
            except UserError:
                continue
            if finite:
                keep.add(path)
                break
        for old in found:
            if old in keep:
                continue
            # Remove the mark first: a crash halfway leaves an ignored folder, never a broken "complete" one.
            (old / COMPLETE_MARK).unlink()
            shutil.rmtree(old)


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
