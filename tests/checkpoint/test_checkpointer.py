"""`checkpoint.async: true`: DCP writes in the background while training goes on; a checkpoint
gets its COMPLETE mark and final name only once every rank's write has finished, so resume
never picks up a half-written one, and a stop or the last step waits for the write in flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, causal_config, read_metrics, run_cli, step_losses, train_here, trainer_env, write_config
from trainer.checkpoint.layout import COMPLETE_MARK, complete_checkpoints

SEALING = '''
import sys
import time
from concurrent.futures import Future
from pathlib import Path
sys.path.insert(0, {repo!r})
sys.path.insert(0, {repo!r} + "/tests")
import torch.distributed as dist
from helpers import planned
from trainer.checkpoint.layout import COMPLETE_MARK
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.config.schema import Config
from trainer.runtime.distributed import barrier, init_distributed

class ControlledWrite:
    """A strategy whose background write finishes when the test says so."""
    def __init__(self):
        self.future = Future()
    def save_async(self, path, writer):
        (path / f"shard-{{dist.get_rank()}}").write_text("written")
        return self.future
    def local_weights(self):
        return []

class Tokenizer:
    def save_pretrained(self, path):
        Path(path, "tokenizer.json").write_text("{{}}")

cfg = Config()
cfg.run.output_dir = {out!r}
cfg.model.config = {{"model_type": "llama", "vocab_size": 320}}
cfg.checkpoint.async_ = True
info = init_distributed()
checkpointer = Checkpointer(cfg, info, planned(cfg, info.world_size))
strategy = ControlledWrite()
final = checkpointer.save(7, strategy, {{"step": 7}}, Tokenizer())
sealed = []
if info.rank == 0:  # rank 0 has written its part, rank 1 not yet
    strategy.future.set_result(None)
barrier()
checkpointer.poll()
time.sleep(0.5)  # rank 0 seals in the background: give it the time to (wrongly) do so
sealed.append((final / COMPLETE_MARK).is_file())
if info.rank == 1:
    strategy.future.set_result(None)
barrier()
checkpointer.poll()
checkpointer.wait()
sealed.append((final / COMPLETE_MARK).is_file())
assert checkpointer.inflight is None
if info.rank == 0:
    print("sealed after each rank finished:", sealed, sorted(p.name for p in final.iterdir()))
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_the_mark_appears_only_after_every_rank_has_written(tmp_path):
    script = tmp_path / "sealing.py"
    script.write_text(SEALING.format(repo=str(REPO), out=str(tmp_path / "run")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", str(script)],
                          capture_output=True, text=True, env=trainer_env(), timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("sealed after each rank finished: [False, True] ['COMPLETE', 'config.yaml', 'shard-0', 'shard-1', "
            "'tokenizer', 'trainer_state.json', 'trainer_state.safetensors']") in proc.stdout, proc.stdout


SECTIONS = dict(train={"max_steps": 40, "log_every": 1, "save_every": 5}, checkpoint={"async": True})


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run, saving synchronously."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = causal_config(tmp, rows=96, train=SECTIONS["train"])
    train_here(write_config(cfg, tmp / "config.yaml"))
    return Path(cfg["run"]["output_dir"])


@pytest.fixture(scope="module")
def reference(reference_run) -> dict:
    return step_losses(reference_run)


@pytest.mark.slow
def test_the_time_waited_for_checkpoints_is_logged_with_the_next_step(reference_run):
    """checkpoint_wait_s: the save after step 5 is waited for before step 6, and so on; the
    steps after that wait only while they look whether the checkpoint's checksums are done
    and it is sealed (in the background), and steps with no checkpoint in flight not at all."""
    waits = {r["step"]: r["checkpoint_wait_s"] for r in read_metrics(reference_run) if "loss" in r}
    assert sorted(waits) == list(range(1, 41))
    saves = [6, 11, 16, 21, 26, 31, 36]
    assert all(waits[step] > 0 for step in saves)  # each copied the state aside (and waited for the one before)
    assert all(waits[step] == 0 for step in (1, 2, 3, 4, 5))  # nothing in flight before the first save
    # Any other step that waited looked at a checkpoint still in flight: one started at a save
    # step, every step since then waiting on it until it was sealed.
    for step in waits:
        if waits[step] > 0 and step not in saves:
            assert waits[step - 1] > 0, (step, waits)


def start(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(config), "--nproc", "2"], cwd=REPO,
                            env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def wait_for_losses(out: Path, count: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count('"loss"') >= count):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_async_saves_resume_exactly_after_a_stop_or_a_kill(tmp_path, reference, stop):
    """Two ranks with fsdp save every 5 steps in the background. SIGTERM: the write in flight
    is finished and sealed before exit 0. SIGKILL (to every process, mid-run, usually with a
    write in flight): only sealed checkpoints remain visible. Either way the resumed run
    follows the uninterrupted one."""
    ranks: list[int] = []
    cfg = causal_config(tmp_path, rows=96, parallel={"strategy": "fsdp", "mixed_precision": "fp32"}, **SECTIONS)
    config = write_config(cfg, tmp_path / "config.yaml")
    out = Path(cfg["run"]["output_dir"])
    proc = start(config)
    try:
        wait_for_losses(out, 17, proc)
        ranks = children(proc.pid)
        os.killpg(proc.pid, stop)
        if stop == signal.SIGKILL:  # the whole job dies at once, as when a scheduler kills it
            for pid in ranks:
                os.killpg(pid, signal.SIGKILL)
        code = proc.wait(timeout=300)
    finally:
        for pid in [proc.pid, *ranks]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    saved = complete_checkpoints(out / "checkpoints")
    if stop == signal.SIGTERM:
        assert code == 0, proc.stderr.read()[-3000:]
        assert int(saved[-1].name.split("-")[1]) >= 17  # the stop's own checkpoint, sealed before exit
    for path in saved:
        assert (path / COMPLETE_MARK).is_file() and (path / "dcp" / ".metadata").is_file()
    run_cli(config, "--nproc", "2")
    got = step_losses(out)  # a step repeated after the kill keeps its later value
    assert sorted(got) == list(range(1, 41))
    for step in range(1, 41):
        assert got[step] == pytest.approx(reference[step], rel=1e-5), step
