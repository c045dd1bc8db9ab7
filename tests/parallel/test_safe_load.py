"""No checkpoint file of any strategy is unpickled freely: a pickle planted in any file of a single,
ddp, fsdp, zero1, zero2 or zero3 checkpoint is refused in one line, and the code it names never
runs. Each strategy's checkpoint is written once (one torchrun launch for the sharded strategies);
every file of it is then replaced in turn, by a bare pickle and by a `torch.save` file that holds
one, and read by the strategy's own loading code as resume and export use it."""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from helpers import Run, launch_worker, make_config, toy_tokenizer
from trainer.build import build_model
from trainer.parallel.registry import STRATEGY_CLASSES
from trainer.parallel.zero import refuse_code
from trainer.runtime.errors import UserError

pytestmark = pytest.mark.slow  # the checkpoints: one launch of 2 ranks (DeepSpeed's start-up) and one of 1

STRATEGIES = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")


class RunsCode:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("safe-load")
    saved = {name: tmp / "checkpoints" / name for name in STRATEGIES}
    runs = [{"name": name, "strategy": name, "steps": 1, "save_at": 1, "save_dir": str(saved[name])}
            for name in STRATEGIES if name != "single"]
    launch_worker(tmp, "two-ranks", 2, runs)
    launch_worker(tmp, "one-rank", 1, [{"name": "single", "strategy": "single", "steps": 1, "save_at": 1,
                                        "save_dir": str(saved["single"])}])
    return saved


def strategy_class(name: str):
    return next(cls for cls in STRATEGY_CLASSES if name in cls.names)


def load(name: str, checkpoint: Path) -> None:
    """What resume and export read first: DeepSpeed's files through their check before DeepSpeed
    unpickles them (ZeroStrategy.load and load_weights both begin with it), DCP's through its
    allow-listed metadata and weights-only values (the strategy's own load_weights)."""
    if name.startswith("zero"):
        refuse_code(checkpoint)
    cfg = make_config(Run(name=name, strategy=name), checkpoint.parent, 1)
    strategy_class(name).load_weights(checkpoint, build_model(cfg, toy_tokenizer(), "sdpa"))


@pytest.mark.parametrize("name", STRATEGIES)
def test_a_pickle_planted_in_any_file_of_a_checkpoint_is_refused_in_one_line_and_runs_nothing(
        name, checkpoints, tmp_path):
    load(name, checkpoints[name])  # the checkpoint as written loads
    files = sorted(p.relative_to(checkpoints[name]) for p in checkpoints[name].rglob("*") if p.is_file())
    assert files, name
    marker = tmp_path / "ran"
    planted_files = 0
    for number, relative in enumerate(files):
        for kind in ("pickle", "torch.save"):
            copy = tmp_path / f"{number}-{kind}"
            shutil.copytree(checkpoints[name], copy)
            target = copy / relative
            if kind == "pickle":
                target.write_bytes(pickle.dumps({"state": RunsCode(marker)}))
            else:
                buffer = io.BytesIO()
                torch.save({"optimizer_state_dict": RunsCode(marker), "module": torch.zeros(2)}, buffer)
                target.write_bytes(buffer.getvalue())
            try:
                load(name, copy)
            except UserError as err:
                message = str(err)
                assert "\n" not in message and str(copy) in message and "refusing to load it" in message, message
                planted_files += 1
            else:
                # a file nothing reads (DeepSpeed's `latest` tag or its zero_to_fp32.py script) may hold anything
                assert relative.name in ("latest", "zero_to_fp32.py", "zero_to_torch.py"), (name, relative)
            assert not marker.exists(), (name, relative, kind)
            shutil.rmtree(copy)
    assert planted_files >= 2 * (3 if name.startswith("zero") else 2), (name, files)

