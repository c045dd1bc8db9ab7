"""Atomic checkpoints, retention and resume discovery.

A checkpoint is the folder `checkpoints/step-00000042/`. It is written as
`.incomplete-step-00000042/`, gets its completion mark `COMPLETE` last, and is then
renamed into place, so a run killed mid-save leaves only a folder that resume
ignores (and the next save clears). Inside: the strategy's own files (DCP shards,
or DeepSpeed's), `trainer_state.pt` (step, data loader position, counters, W&B run id),
the resolved `config.yaml` and the `tokenizer/`, so that a checkpoint is exportable
on its own.

With `checkpoint.async` the training loop only waits while the state is copied to host
memory; a background thread writes it, and once every rank's write has finished (`poll`)
rank 0 seals the checkpoint in the background too.

No RNG state is stored: every step reseeds torch from (run.seed, step, rank)
(`seed_step`), which makes a resumed step draw exactly what it would have drawn,
at any world size.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.config import Config, dump_yaml

from trainer.errors import ConfigError, UserError
from trainer.distributed import DistInfo, all_reduce_max, barrier
from trainer.parallel.common import BackgroundWriter

log = logging.getLogger("finetrain")

COMPLETE_MARK = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch for one optimizer step; a function of (seed, step, rank) only."""
    torch.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / COMPLETE_MARK).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def read_mark(path: Path) -> dict:
    mark = path / COMPLETE_MARK
    if not mark.is_file():
        raise UserError(f"{path}: not a complete checkpoint (no {COMPLETE_MARK} mark)")
    return json.loads(mark.read_text())


@dataclass
class PendingSave:
    """A checkpoint whose files are still being written in the background."""

    step: int
    staging: Path
    final: Path
    writes: list[Future]


class Checkpointer:
    def __init__(self, cfg: Config, dist_info: DistInfo, plan):
        self.cfg = cfg
        self.dist = dist_info
        self.plan = plan
        self.directory = cfg.checkpoint_dir
        self.pending: PendingSave | None = None
        self.sealing: Future | None = None  # rank 0's background seal of the last asynchronous save
        self.waited_s = 0.0  # seconds the training loop spent in save and poll: the metrics' checkpoint_wait_s
        self._tokenizer_files: dict[str, bytes] | None = None  # the same at every save: rendered once
        self.writer = None
        self._file_writer = None
        if cfg.checkpoint.async_:
            self.writer = BackgroundWriter(dist_info.device)
            self._file_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-files")

    def resume_path(self) -> Path | None:
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return None
        if resume == "auto":
            found = complete_checkpoints(self.directory)
            return found[-1] if found else None
        path = Path(resume)
        read_mark(path)  # refuse a half-written folder given by hand, too
        return path

    def save(self, step: int, strategy, trainer_state: dict, tokenizer, wait: bool = False) -> Path:
        """Collective: every rank writes its shards, rank 0 seals and renames. With
        `checkpoint.async` the state is copied aside, written in the background and the
        checkpoint sealed later (`poll`), or before this returns when `wait` (a stop, the last step)."""
        started = time.perf_counter()
        self.wait()  # one write in flight at a time
        final = self.directory / step_dir_name(step)
        staging = self.directory / f".incomplete-{step_dir_name(step)}"
        if self.dist.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".incomplete-*"):
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir()
        barrier()
        files = self._main_rank_files(trainer_state, tokenizer) if self.dist.is_main else {}
        if self.writer is None:
            strategy.save(staging)
            _write_files(staging, files)
            self._seal(step, staging, final)
        else:
            writes = [strategy.save_async(staging, self.writer), self._file_writer.submit(_write_files, staging, files)]
            self.pending = PendingSave(step, staging, final, writes)
            if wait:
                self.wait()
        self.waited_s += time.perf_counter() - started
        return final

    def poll(self) -> None:
        """Once every rank's background write has finished, have rank 0 seal the checkpoint in
        the background (collective: call it on every rank at the same point of every step)."""
        if self.pending is None:
            return
        started = time.perf_counter()
        unfinished = torch.tensor([0 if all(w.done() for w in self.pending.writes) else 1], dtype=torch.int32)
        if not all_reduce_max(unfinished).item():
            self._start_sealing()
        self.waited_s += time.perf_counter() - started

    def wait(self) -> None:
        """Block until the checkpoint being written is written and sealed (collective)."""
        if self.pending is not None:
            for write in self.pending.writes:
                write.result()  # a failed write raises here, and the checkpoint is never sealed
            barrier()  # every rank's part is on disk
            self._start_sealing()
        if self.sealing is not None:
            sealing, self.sealing = self.sealing, None
            sealing.result()

    def close(self) -> None:
        """Release the background writer's buffers and threads (after the last `wait`)."""
        if self.writer is not None:
            self.writer.close()
            self._file_writer.shutdown(wait=False)

    def _start_sealing(self) -> None:
        pending, self.pending = self.pending, None
        if self.dist.is_main:
            self.sealing = self._file_writer.submit(self._seal_written, pending.step, pending.staging, pending.final)

    def _main_rank_files(self, trainer_state: dict, tokenizer) -> dict[str, bytes]:
        """Rank 0's own files of a checkpoint, as bytes taken now (training goes on changing
        the objects they come from while an asynchronous save writes them)."""
        if self._tokenizer_files is None:
            with tempfile.TemporaryDirectory() as rendered:
                tokenizer.save_pretrained(rendered)
                self._tokenizer_files = {f"tokenizer/{path.relative_to(rendered)}": path.read_bytes()
                                         for path in sorted(Path(rendered).rglob("*")) if path.is_file()}
        state = io.BytesIO()
        torch.save(trainer_state, state)
        return {"trainer_state.pt": state.getvalue(), "config.yaml": dump_yaml(self.cfg).encode(),
                **self._tokenizer_files}

    def _seal(self, step: int, staging: Path, final: Path) -> None:
        """Once every rank has written its part: rank 0 seals (collective)."""
        barrier()
        if self.dist.is_main:
            self._seal_written(step, staging, final)
        barrier()

    def _seal_written(self, step: int, staging: Path, final: Path) -> None:
        """The COMPLETE mark, then the final name, then retention; every rank's part is written."""
        mark = {"step": step, "world_size": self.dist.world_size, "strategy": self.plan.strategy,
                "format": self.plan.checkpoint_format}
        _write_synced(staging / COMPLETE_MARK, json.dumps(mark))
        if final.exists():  # same step saved again (e.g. signal right after a periodic save)
            shutil.rmtree(final)
        os.rename(staging, final)
        _fsync_dir(self.directory)
        self._apply_retention()
        log.info("saved checkpoint %s", final)

    def load(self, path: Path, strategy) -> dict:
        mark = read_mark(path)
        saved_format = mark["format"]
        wanted = self.plan.checkpoint_format
        if saved_format != wanted:
            raise ConfigError(
                f"parallel.strategy: checkpoint {path} was written by strategy {mark['strategy']} ({saved_format} format); "
                f"parallel.strategy {self.plan.strategy} reads {wanted} checkpoints. Resume with the same "
                "family of strategy, or start fresh with checkpoint.resume=never"
            )
        strategy.load(path)
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        log.info("resumed from %s (step %d, saved on %d ranks)", path, mark["step"], mark["world_size"])
        return state

    def _apply_retention(self) -> None:
        for old in complete_checkpoints(self.directory)[: -self.cfg.checkpoint.keep_last]:
            # Remove the mark first: a crash halfway leaves an ignored folder, never a broken "complete" one.
            (old / COMPLETE_MARK).unlink()
            shutil.rmtree(old)


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
