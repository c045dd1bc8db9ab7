"""One run per folder: `run.output_dir` is locked while a run uses it.

Rank 0 takes an exclusive lock on `run.lock` in the run folder (`flock`, which the operating
system releases when the process ends, however it ends; Linux's NFS client takes it on the
server, so it holds across the nodes of a shared mount) and writes its host and pid into the file. A second run into the same
folder cannot take the lock and stops with one line naming the holder. A fresh run
(`checkpoint.resume: never`) into a folder that holds an earlier run would mix its records with
the earlier one's: it stops too, unless `run.overwrite: true`, which removes what the earlier
run wrote (its config, metrics, generations, summary, checkpoints and tokenizer) first.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.runtime.errors import UserError
from trainer.runtime.restarts import JOURNAL

if TYPE_CHECKING:
    from trainer.config.schema import Config

log = logging.getLogger("finetrain")

LOCK_FILE = "run.lock"
# What a run leaves in its folder (the checkpoint folder, checkpoint.dir, with them). The
# tokenizer alone is no earlier run: `finetrain prepare` saves it ahead of the first one.
# The W&B run id (reporting/metrics_log.py) and the journal of restarts (runtime/restarts.py) too.
RUN_FILES = ("config.yaml", "metrics.jsonl", "generations.jsonl", "summary.json", "wandb_run_id", str(JOURNAL))


def config_problems(cfg: "Config") -> list[str]:
    """The run.* keys this module owns, checked with the rest of the config."""
    if cfg.run.overwrite and cfg.checkpoint.resume != "never":
        return [f"run.overwrite: replaces an earlier run with a fresh one, but checkpoint.resume is "
                f"{cfg.checkpoint.resume} (continue it); set checkpoint.resume=never to start over"]
    return []


class RunFolderLock:
    """The lock on a run folder, held until `release` or the end of the process."""

    def __init__(self, folder: Path, file):
        self.folder = folder
        self.file = file

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the file releases the lock
            self.file = None


def claim_run_folder(cfg: "Config") -> RunFolderLock:
    """Rank 0, before the run writes anything: lock the run folder, and refuse a fresh run
    into a folder that holds an earlier one unless `run.overwrite` (then remove that run)."""
    folder = cfg.output_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    file = open(path, "a+")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        file.close()
        if err.errno in (errno.EAGAIN, errno.EACCES):  # another process holds it
            raise UserError(f"run.output_dir: {folder} is in use by another run ({_holder(path)}); wait for it to "
                            "end, or set another run.output_dir") from None
        log.warning("run.output_dir: %s cannot be locked on this file system (%s); a second run into it would "
                    "not be refused", folder, err.strerror or err)
        file = None
    if file is not None:
        file.truncate(0)
        file.write(f"host {socket.gethostname()}, pid {os.getpid()}\n")
        file.flush()
    lock = RunFolderLock(folder, file)
    earlier = earlier_run(cfg)
    if earlier and cfg.checkpoint.resume == "never":
        if not cfg.run.overwrite:
            lock.release()
            raise UserError(f"run.output_dir: {folder} holds an earlier run ({', '.join(earlier)}); a fresh run "
                            "(checkpoint.resume=never) would mix with it: set run.overwrite=true to replace it, or "
                            "set another run.output_dir")
        for name in earlier + ["tokenizer"]:
            target = folder / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        log.warning("run.overwrite: removed the earlier run in %s (%s)", folder, ", ".join(earlier))
    return lock


def earlier_run(cfg: "Config") -> list[str]:
    """What an earlier run left in the run folder (names relative to it); empty when none."""
    folder = cfg.output_dir
    found = [name for name in RUN_FILES if (folder / name).exists()]
    checkpoints = cfg.checkpoint_dir
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append(os.path.relpath(checkpoints, folder))
    return found


def _holder(path: Path) -> str:
    try:
        holder = path.read_text().strip()
    except OSError:
        holder = ""
    return holder or "host and pid unknown"
