"""The config schema: every bad key, type or value stops at start-up, names the key, exits 2, writes
nothing. (Keys that cannot work together: test_plan.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO, TINY_LLAMA, write_jsonl
from trainer.config.schema import load_config
from trainer.runtime.errors import ConfigError


def base_config(tmp_path: Path) -> dict:
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "hello"}]}])
    return {
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"config": dict(TINY_LLAMA), "tokenizer": "train-bpe"},
        "data": {"seq_len": 64, "datasets": [{"name": "sft", "path": str(data), "format": "chat"}]},
        "train": {"max_steps": 2},
    }


def write_config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_valid_config_loads_with_defaults(tmp_path):
    cfg = load_config(write_config(tmp_path, base_config(tmp_path)))
    assert cfg.optim.lr == 2e-5
    assert cfg.data.datasets[0].name == "sft"
    assert cfg.parallel.strategy == "auto"


def test_overrides_apply_with_types(tmp_path):
    cfg = load_config(write_config(tmp_path, base_config(tmp_path)),
                      ["optim.lr=1e-5", "data.packing=false", "parallel.strategy=fsdp", "data.datasets.0.weight=0.5"])
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.lr, float)
    assert cfg.data.packing is False
    assert cfg.parallel.strategy == "fsdp"
    assert cfg.data.datasets[0].weight == 0.5


# One mistake a line: its overrides (joined by " + ") => what the message says, naming the key.
MISTAKES = """
optim.lrr=1e-5 => unknown key optim.lrr; did you mean optim.lr?
trian.max_steps=3 => unknown key trian; did you mean train?
optim.lr=fast => optim.lr: expected a number, got 'fast'
data.packing=maybe => data.packing: expected true or false, got 'maybe'
train.fused_loss=sometimes => train.fused_loss: expected true or false, got 'sometimes'
optim.lr=0 => optim.lr: must be > 0, got 0.0
data.seq_len=8 => data.seq_len: must be >= 16, got 8
data.datasets.0.weight=-1 => data.datasets.0.weight: must be > 0, got -1.0
data.eval.generate=-1 => data.eval.generate: must be >= 0, got -1
data.eval.max_new_tokens=0 => data.eval.max_new_tokens: must be > 0, got 0
optim.betas=[0.9, 1.5] => optim.betas: two numbers in [0, 1), got [0.9, 1.5]
logging.forgetting_warn=0 => logging.forgetting_warn: nats of eval loss rise, > 0 (or null for no warning)
logging.peak_flops=-1 => logging.peak_flops: FLOP/s of one device, > 0
data.datasets.0.path=/nonexistent/x.jsonl => data.datasets.0.path: /nonexistent/x.jsonl does not exist
model.config=null + model.path=/nonexistent/model => model.path: /nonexistent/model is not a folder
"""


@pytest.mark.parametrize("overrides, expected", [line.split(" => ") for line in MISTAKES.strip().splitlines()])
def test_a_bad_value_names_its_key(tmp_path, overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, base_config(tmp_path)), overrides.split(" + "))
    assert expected in str(err.value)


def test_all_errors_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, base_config(tmp_path)), ["optim.lr=-1", "data.seq_len=4"])
    lines = str(err.value).splitlines()
    assert any(line.startswith("optim.lr") for line in lines)
    assert any(line.startswith("data.seq_len") for line in lines)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: x\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+: not valid YAML"):
        load_config(path)


@pytest.mark.slow
@pytest.mark.parametrize("entry", [["-m", "trainer"], ["-m", "launch.cli", "train"]])
def test_cli_exits_2_and_writes_nothing(tmp_path, entry):
    cfg = base_config(tmp_path)
    path = write_config(tmp_path, cfg)
    proc = subprocess.run([sys.executable, *entry, str(path), "optim.lrr=1e-5", "data.seq_len=4"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "unknown key optim.lrr; did you mean optim.lr?" in proc.stderr
    assert "data.seq_len: must be >= 16" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not Path(cfg["run"]["output_dir"]).exists()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    # paths to 8B checkpoints and cluster data only exist where they run
    cfg = load_config(path, check_files=False)
    assert cfg.train.max_steps or cfg.train.epochs
