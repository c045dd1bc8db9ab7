"""Checkpoints under faults: a write that fails (a full disk, a permission), weights that are
not finite, retention, a corrupted shard, and files that would run code when loaded; first in
one process, then end to end through `finetrain train` and `finetrain export`."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from helpers import REPO, causal_config, planned, read_metrics, run_cli, step_losses, trainer_env, write_config
from trainer.checkpoint.checkpointer import Checkpointer, CheckpointWriteError
from trainer.checkpoint.layout import COMPLETE_MARK, checkpoint_problem, complete_checkpoints
from trainer.checkpoint.trainer_state import encode_trainer_state, read_trainer_state
from trainer.config.schema import Config
from trainer.runtime.distributed import DistInfo
from trainer.runtime.errors import UserError


class Strategy:
    """What the checkpointer needs of a strategy: files written into the checkpoint, and the
    weights it checks before writing them."""

    def __init__(self, value: float = 1.0, fail: BaseException | None = None):
        self.weights = torch.full((256,), value)
        self.fail = fail

    def save(self, path: Path) -> None:
        (path / "weights.bin").write_bytes(self.weights.numpy().tobytes())
        if self.fail is not None:
            raise self.fail

    def local_weights(self) -> list[torch.Tensor]:
        return [self.weights]


class Tokenizer:
    def save_pretrained(self, path):
        Path(path, "tokenizer.json").write_text("{}")


def checkpointer(tmp_path: Path, keep_last: int = 2) -> Checkpointer:
    cfg = Config()
    cfg.run.output_dir = str(tmp_path / "run")
    cfg.checkpoint.keep_last = keep_last
    cfg.model.config = {"model_type": "llama", "vocab_size": 320}
    return Checkpointer(cfg, DistInfo(0, 0, 1, torch.device("cpu"), "gloo"), planned(cfg))


def save(ckpt: Checkpointer, step: int, strategy: Strategy, wait: bool = True) -> Path:
    return ckpt.save(step, strategy, {"step": step, "counts": torch.arange(3.0)}, Tokenizer(), wait=wait)


def leftovers(ckpt: Checkpointer) -> list[str]:
    return sorted(p.name for p in ckpt.directory.iterdir() if p.name.startswith(".incomplete"))


def test_a_full_disk_is_one_line_naming_the_path_and_the_space_and_loses_nothing(tmp_path):
    ckpt = checkpointer(tmp_path)
    first = save(ckpt, 1, Strategy())
    failing = Strategy(fail=RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"))
    failing.fail.__context__ = OSError(errno.ENOSPC, "No space left on device")  # as DCP's writer raises it
    with pytest.raises(CheckpointWriteError) as raised:
        save(ckpt, 2, failing)
    message = str(raised.value)
    assert "\n" not in message
    assert re.fullmatch(rf"checkpoint step 2: cannot write {re.escape(str(ckpt.directory))}/\.incomplete-step-00000002 "
                        r"\(rank 0\): no space left on device \(about [\d.]+ KiB needed, [\d.]+ [KMG]?i?B free\); "
                        r"the half-written checkpoint was removed, step-00000001 is intact", message), message
    assert leftovers(ckpt) == [] and complete_checkpoints(ckpt.directory) == [first]
    assert checkpoint_problem(first) is None
    assert ckpt.inflight is None  # the checkpointer can be closed and the run ended cleanly
    ckpt.close()


def test_a_blocking_write_that_fails_ends_the_run_at_once_and_a_background_one_at_the_next_poll(tmp_path):
    ckpt = checkpointer(tmp_path)
    with pytest.raises(CheckpointWriteError, match=r"^checkpoint step 1: cannot write /mnt/ckpt/weights\.bin \(rank 0\): "
                                                   r"Permission denied; the half-written checkpoint was removed, "
                                                   r"no earlier checkpoint$"):
        save(ckpt, 1, Strategy(fail=PermissionError(errno.EACCES, "Permission denied", "/mnt/ckpt/weights.bin")),
             wait=False)

    class InTheWay(Strategy):
        def save(self, path: Path) -> None:
            (path / "config.yaml").mkdir()  # rank 0 writes its own files in the background

    save(ckpt, 2, InTheWay(), wait=False)
    staging = ckpt.directory / ".incomplete-step-00000002"
    with pytest.raises(CheckpointWriteError, match=rf"^checkpoint step 2: cannot write {re.escape(str(staging))}/"
                                                   r"config\.yaml \(rank 0\): Is a directory;"):
        while True:  # the failure is found once the background part has finished
            ckpt.poll()
            time.sleep(0.01)
    assert leftovers(ckpt) == [] and complete_checkpoints(ckpt.directory) == []


def test_a_write_that_fails_without_an_errno_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """torch.save's C++ writer loses the errno ("unexpected pos", "iostream error"): a disk
    with (almost) nothing free is taken for the cause."""
    ckpt = checkpointer(tmp_path)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("trainer.checkpoint.checkpointer.shutil.disk_usage", lambda path: usage._replace(free=4096))
    with pytest.raises(CheckpointWriteError, match=r"no space left on device \(more than the [\d.]+ KiB written needed, "
                                                   r"4\.00 KiB free\)"):
        save(ckpt, 1, Strategy(fail=RuntimeError("basic_ios::clear: iostream error")))


def test_a_bug_while_saving_keeps_its_traceback(tmp_path):
    ckpt = checkpointer(tmp_path)
    with pytest.raises(KeyError):
        save(ckpt, 1, Strategy(fail=KeyError("model.layers.0")))
    assert leftovers(ckpt) == []


def test_low_space_is_warned_about_once_before_a_save(tmp_path, monkeypatch, caplog):
    ckpt = checkpointer(tmp_path, keep_last=5)
    save(ckpt, 1, Strategy())
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("trainer.checkpoint.checkpointer.shutil.disk_usage", lambda path: usage._replace(free=1000))
    with caplog.at_level(logging.WARNING, logger="finetrain"):
        save(ckpt, 2, Strategy())
        save(ckpt, 3, Strategy())
    warnings = [r.getMessage() for r in caplog.records if "may not fit" in r.getMessage()]
    assert len(warnings) == 1 and "has 1000 B free and the last checkpoint took" in warnings[0], warnings


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    ckpt = checkpointer(tmp_path)
    good = save(ckpt, 1, Strategy())
    for bad in (float("nan"), float("inf")):
        strategy = Strategy()
        strategy.weights[7] = bad
        with pytest.raises(UserError, match=rf"^step 2: the weights hold NaN or inf; not saving them \(the last "
                                            rf"checkpoint, {re.escape(str(good))}, is kept\)$"):
            save(ckpt, 2, strategy)
    assert complete_checkpoints(ckpt.directory) == [good] and leftovers(ckpt) == []
    assert json.loads((good / COMPLETE_MARK).read_text())["finite"] is True


def test_retention_keeps_the_newest_checkpoint_known_finite(tmp_path):
    """Checkpoints written before the finiteness check carry no `finite` in their mark (an older
    run may have saved NaN weights): retention keeps the newest known finite beside the last."""
    ckpt = checkpointer(tmp_path, keep_last=1)
    for step, finite in [(1, True), (2, True), (3, None), (4, None)]:
        folder = ckpt.directory / f"step-{step:08d}"
        folder.mkdir(parents=True)
        mark = {"step": step, "format": "dcp", **({"finite": finite} if finite is not None else {})}
        (folder / COMPLETE_MARK).write_text(json.dumps(mark))
    ckpt._apply_retention()
    assert [p.name for p in complete_checkpoints(ckpt.directory)] == ["step-00000002", "step-00000004"]
    save(ckpt, 5, Strategy())
    assert [p.name for p in complete_checkpoints(ckpt.directory)] == ["step-00000005"]


def test_the_mark_lists_every_file_with_its_checksum(tmp_path):
    ckpt = checkpointer(tmp_path)
    path = save(ckpt, 1, Strategy())
    mark = json.loads((path / COMPLETE_MARK).read_text())
    on_disk = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != COMPLETE_MARK)
    assert sorted(mark["files"]) == on_disk == ["config.yaml", "tokenizer/tokenizer.json", "trainer_state.json",
                                                "trainer_state.safetensors", "weights.bin"]
    assert mark["checksum"] == "xxh3_128" and mark["files"]["weights.bin"]["size"] == 1024
    data = bytearray((path / "weights.bin").read_bytes())
    data[100] ^= 1
    (path / "weights.bin").write_bytes(bytes(data))
    assert checkpoint_problem(path) == "weights.bin does not match its checksum"


Piece = namedtuple("Piece", "dataset example start length first")


def test_the_trainer_state_is_json_and_safetensors_and_comes_back_equal(tmp_path):
    state = {"step": 12, "counts": torch.tensor([1.5, 2.0], dtype=torch.float64), "wandb_run_id": "abc",
             "loader": {"queue": [tuple(Piece(0, 3, 0, 5, True))], "nested": {"epoch": 1, "t": torch.arange(4)}},
             "summary": {"best": {"sft": {"loss": float("nan"), "step": 3}}, "answers": []}, "none": None}
    for name, data in encode_trainer_state(state).items():
        (tmp_path / name).write_bytes(data)
    assert json.loads((tmp_path / "trainer_state.json").read_text())["counts"] == {"__tensor__": "counts"}
    loaded = read_trainer_state(tmp_path)
    assert torch.equal(loaded["counts"], state["counts"]) and loaded["counts"].dtype == torch.float64
    assert torch.equal(loaded["loader"]["nested"]["t"], torch.arange(4))
    assert loaded["loader"]["queue"] == [[0, 3, 0, 5, True]]  # tuples come back as lists
    assert loaded["summary"]["best"]["sft"]["step"] == 3 and loaded["summary"]["best"]["sft"]["loss"] != 0
    assert (loaded["step"], loaded["wandb_run_id"], loaded["none"]) == (12, "abc", None)


class RunsCode:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_trainer_state_of_the_earlier_format_loads_unless_it_holds_more_than_data(tmp_path):
    state = {"step": 3, "counts": torch.ones(2, dtype=torch.float64), "loader": {"entries": [(1, 2, (0, 1))]}}
    torch.save(state, tmp_path / "trainer_state.pt")
    loaded = read_trainer_state(tmp_path)
    assert loaded["step"] == 3 and torch.equal(loaded["counts"], state["counts"])
    marker = tmp_path / "ran"
    with open(tmp_path / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": RunsCode(marker)}, f)
    with pytest.raises(UserError, match=r"trainer_state\.pt: holds more than plain data .*refusing to load it"):
        read_trainer_state(tmp_path)
    assert not marker.exists()


def test_dcp_loading_admits_its_metadata_and_plain_values_only(tmp_path):
    import torch.distributed.checkpoint as dcp

    from trainer.parallel.dcp import read_dcp, read_dcp_metadata

    folder = tmp_path / "dcp"
    with pytest.warns(UserWarning):  # DCP without a process group says it saves in one process
        dcp.save({"w": torch.arange(4.0), "lr": 0.5, "betas": (0.9, 0.95)}, checkpoint_id=str(folder), no_dist=True)
    state = {"w": torch.zeros(4), "lr": 0.0, "betas": (0.0, 0.0)}
    read_dcp(state, folder)
    assert torch.equal(state["w"], torch.arange(4.0)) and state["lr"] == 0.5 and tuple(state["betas"]) == (0.9, 0.95)

    marker = tmp_path / "ran"
    planted = tmp_path / "planted"
    with pytest.warns(UserWarning):  # a value that runs code when unpickled without weights_only
        dcp.save({"w": torch.arange(4.0), "lr": RunsCode(marker)}, checkpoint_id=str(planted), no_dist=True)
    with pytest.raises(UserError, match=r"the value of lr: holds more than plain data \(.*posix\.system.*\); refusing to load it"):
        read_dcp({"w": torch.zeros(4), "lr": 0.0}, planted)
    assert not marker.exists()

    metadata = folder / ".metadata"
    read_dcp_metadata(folder)
    with open(metadata, "wb") as f:
        pickle.dump(RunsCode(marker), f)
    with pytest.raises(UserError, match=r"\.metadata: not a DCP checkpoint's metadata \(posix\.system is not part of "
                                        r"a DCP checkpoint's metadata\); refusing to load it"):
        read_dcp({"w": torch.zeros(4)}, folder)
    assert not marker.exists()


# --------------------------------------------------------------------------- end to end, two ranks

SECTIONS = dict(parallel={"strategy": "fsdp", "mixed_precision": "fp32"},
                train={"max_steps": 12, "log_every": 1, "save_every": 4}, checkpoint={"keep_last": 2})


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One uninterrupted 2-rank run saving at steps 4, 8 and 12 (4 removed by retention)."""
    tmp = tmp_path_factory.mktemp("reference")
    cfg = causal_config(tmp, rows=96, **SECTIONS)
    config = write_config(cfg, tmp / "config.yaml")
    run_cli(config, "--nproc", "2")
    out = Path(cfg["run"]["output_dir"])
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == ["step-00000008", "step-00000012"]
    return {"config": config, "out": out, "losses": step_losses(out), "tmp": tmp}


def finetrain_lines(stderr: str) -> list[str]:
    """What finetrain tells the user (its log lines start with the time and rank)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("finetrain:")]


def export_cli(checkpoint: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", "export", str(checkpoint), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, env=trainer_env(), timeout=300)


def copy_run(reference: dict, name: str) -> Path:
    copy = reference["tmp"] / name
    shutil.copytree(reference["out"], copy)
    return copy


@pytest.mark.slow
def test_a_flipped_shard_is_refused_by_name_and_auto_resume_falls_back(reference):
    """4 KB flipped in one shard of the newest checkpoint: a resume from it by hand and its
    export stop with one line naming the file; `resume: auto` warns, names it, resumes from
    the previous checkpoint on 2 ranks and logs the uninterrupted run's losses."""
    run = copy_run(reference, "flipped")
    newest = run / "checkpoints" / "step-00000012"
    shard = newest / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[1000:5096] = bytes(b ^ 0xFF for b in data[1000:5096])
    shard.write_bytes(bytes(data))
    named = re.escape("dcp/__1_0.distcp does not match its checksum")

    proc = run_cli(reference["config"], f"run.output_dir={run}", f"checkpoint.resume={newest}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines := finetrain_lines(proc.stderr)) == 1, lines
    assert re.fullmatch(rf"finetrain: checkpoint\.resume: {re.escape(str(newest))} fails its checksums \({named}\); "
                        r"refusing to resume from it", lines[0]), lines[0]
    proc = export_cli(newest, reference["tmp"] / "flipped-export")
    assert proc.returncode == 2 and len(lines := finetrain_lines(proc.stderr)) == 1, proc.stderr[-3000:]
    assert re.fullmatch(rf"finetrain: {re.escape(str(newest))} fails its checksums \({named}\); refusing to export it",
                        lines[0]), lines[0]
    assert not (reference["tmp"] / "flipped-export").exists()

    proc = run_cli(reference["config"], "--nproc", "2", f"run.output_dir={run}")
    assert re.search(rf"checkpoint {re.escape(str(newest))} fails its checksums \({named}\): not resuming from it",
                     proc.stderr), proc.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-00000008'}" in proc.stderr
    # the records of steps 9-12 were dropped and written again by the resumed run: each step once
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 13))
    resumed = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r and r["step"] > 8}
    assert sorted(resumed) == [9, 10, 11, 12]
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference["losses"][step], rel=1e-6, abs=1e-7), step
    assert checkpoint_problem(newest) is None  # step 12 written again, whole


def plant(checkpoint: Path, name: str, data: bytes, remove: tuple[str, ...] = ()) -> None:
    """Put `data` into the checkpoint as `name` and list it in the mark with its true checksum,
    as whoever hands over a folder can: the checksums then pass, and loading must not run it."""
    from trainer.checkpoint.checksums import sum_files

    for old in remove:
        (checkpoint / old).unlink()
    (checkpoint / name).write_bytes(data)
    mark = json.loads((checkpoint / COMPLETE_MARK).read_text())
    mark["files"] = {k: v for k, v in mark["files"].items() if k not in remove}
    mark["files"].update(sum_files(checkpoint, [name]))
    (checkpoint / COMPLETE_MARK).write_text(json.dumps(mark))


@pytest.mark.slow
@pytest.mark.parametrize("planted", ["trainer_state.pt", "dcp/.metadata"])
def test_a_checkpoint_holding_a_pickle_that_runs_code_is_refused_by_resume_and_export(reference, planted):
    run = copy_run(reference, f"planted-{planted.replace('/', '-')}")
    newest = run / "checkpoints" / "step-00000012"
    marker = reference["tmp"] / f"ran-{planted.replace('/', '-')}"
    remove = ("trainer_state.json", "trainer_state.safetensors") if planted == "trainer_state.pt" else ()
    plant(newest, planted, pickle.dumps({"step": RunsCode(marker)}), remove)
    expected = (r"trainer_state\.pt: holds more than plain data \(.*\); refusing to load it \(loading a checkpoint "
                r"runs no code from it\)" if planted == "trainer_state.pt" else
                r"dcp/\.metadata: not a DCP checkpoint's metadata \(posix\.system is not part of a DCP checkpoint's "
                r"metadata\); refusing to load it")

    proc = run_cli(reference["config"], f"run.output_dir={run}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines := finetrain_lines(proc.stderr)) == 1, lines
    assert re.fullmatch(rf"finetrain: {re.escape(str(newest))}/{expected}", lines[0]), lines[0]
    proc = export_cli(run, reference["tmp"] / "planted-export")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines := finetrain_lines(proc.stderr)) == 1, lines
    assert re.fullmatch(rf"finetrain: {re.escape(str(newest))}/{expected}", lines[0]), lines[0]
    assert not marker.exists()


@pytest.mark.slow
def test_a_checkpoint_of_the_earlier_pickle_format_still_resumes_exactly(reference):
    """trainer_state.pt (read with weights_only=True), a mark without
    checksums: the run resumes from it (here on one rank) and follows the reference."""
    run = copy_run(reference, "earlier-format")
    shutil.rmtree(run / "checkpoints" / "step-00000012")
    earlier = run / "checkpoints" / "step-00000008"
    state = read_trainer_state(earlier)
    state["loader"] = json.loads(json.dumps(state["loader"]), object_hook=dict)
    torch.save(state, earlier / "trainer_state.pt")
    for name in ("trainer_state.json", "trainer_state.safetensors"):
        (earlier / name).unlink()
    mark = json.loads((earlier / COMPLETE_MARK).read_text())
    (earlier / COMPLETE_MARK).write_text(json.dumps({k: mark[k] for k in ("step", "world_size", "strategy", "format")}))
    proc = run_cli(reference["config"], f"run.output_dir={run}")
    assert "was written before checkpoints carried checksums: not verified" in proc.stderr
    # the records of steps 9-12 were dropped and written again by the resumed run: each step once
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == list(range(1, 13))
    resumed = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r and r["step"] > 8}
    assert sorted(resumed) == [9, 10, 11, 12]
    for step, loss in resumed.items():  # another world size sums in another order
        assert loss == pytest.approx(reference["losses"][step], rel=1e-5, abs=1e-6), step


FULL_DISK = '''
"""In a mount namespace of its own: the checkpoint folder on a small tmpfs, filled until the
second checkpoint cannot fit; a run that hits it, then the same run once space is freed."""
import json, os, subprocess, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
from trainer.checkpoint.layout import checkpoint_problem
folder, size, filler = {folder!r}, {size}, {filler}
os.makedirs(folder)
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={{size}}", "tmpfs", folder], check=True)
with open(os.path.join(folder, "filler.bin"), "wb") as f:
    f.write(bytes(filler))
command = [sys.executable, "-m", "launch.cli", "train", {config!r}, "--nproc", "2", "run.output_dir=" + {run!r}]
report = {{}}
proc = subprocess.run(command, capture_output=True, text=True, cwd={repo!r})
report["full"] = {{"code": proc.returncode, "stderr": proc.stderr, "listing": sorted(os.listdir(folder)),
                   "intact": checkpoint_problem(Path(folder, "step-00000004"))}}
os.remove(os.path.join(folder, "filler.bin"))
proc = subprocess.run(command, capture_output=True, text=True, cwd={repo!r})
report["freed"] = {{"code": proc.returncode, "stderr": proc.stderr, "listing": sorted(os.listdir(folder))}}
print(json.dumps(report))
'''


def tmpfs_available(tmp_path: Path) -> bool:
    """A tmpfs can be mounted in a namespace of our own (unprivileged user namespaces)."""
    target = tmp_path / "probe"
    target.mkdir()
    proc = subprocess.run(["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(target)],
                          capture_output=True)
    return proc.returncode == 0


@pytest.mark.slow
def test_a_disk_that_fills_up_ends_the_run_in_one_line_and_the_run_resumes_once_space_is_freed(reference, tmp_path):
    """The checkpoint folder on a tmpfs with room for one checkpoint and a half: the save at
    step 8 runs out of space. One line, exit code 5 (a failed save, which a restart would retry), no
    half-written folder, step 4 intact; with the space freed the same command resumes from step 4,
    follows the reference, and the records of steps 5-8 the full run wrote are replaced, not repeated."""
    if not tmpfs_available(tmp_path):
        pytest.skip("no tmpfs can be mounted here (unprivileged user namespaces are off)")
    page = 4096  # tmpfs stores each file in whole pages
    checkpoint = sum(-(-f.stat().st_size // page) * page
                     for f in (reference["out"] / "checkpoints" / "step-00000008").rglob("*") if f.is_file())
    size = 32 << 20
    run = tmp_path / "run"
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK.format(repo=str(REPO), folder=str(run / "checkpoints"), size=size,
                                       filler=size - checkpoint * 3 // 2, config=str(reference["config"]), run=str(run)))
    proc = subprocess.run(["unshare", "-rm", sys.executable, str(script)], capture_output=True, text=True,
                          env=trainer_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])

    full = report["full"]
    assert full["code"] == 5, full["stderr"][-3000:]
    lines = finetrain_lines(full["stderr"])
    assert len(lines) == 1, lines
    assert re.fullmatch(rf"finetrain: checkpoint step 8: cannot write {re.escape(str(run / 'checkpoints'))}/\S+ "
                        r"\(rank \d\): no space left on device \(about [\d.]+ [KM]iB needed, [\d.]+ [KM]iB free\); "
                        r"the half-written checkpoint was removed, step-00000004 is intact", lines[0]), lines[0]
    assert "the next one may not fit" in full["stderr"]  # warned before the save
    assert full["listing"] == ["filler.bin", "step-00000004"] and full["intact"] is None

    freed = report["freed"]
    assert freed["code"] == 0, freed["stderr"][-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step-00000004'}" in freed["stderr"]
    assert freed["listing"] == ["step-00000008", "step-00000012"]
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))  # each step once: 5-8 as the resumed run did them
    for record in records:
        assert record["loss"] == pytest.approx(reference["losses"][record["step"]], rel=1e-6, abs=1e-7), record["step"]
