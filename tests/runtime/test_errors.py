"""A user's mistake ends in one line `finetrain: <file>:<line>: <what>` (or the key) and exit
code 2, through `finetrain train` on one rank and on two (every rank stops), with no
traceback and nothing written that a later run would pick up."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, causal_config, run_cli, trainer_env, write_config


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def assert_one_line_error(proc, pattern: str, out: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, lines
    assert re.fullmatch(pattern, lines[0]), lines[0]
    # nothing a later run would resume from or append to
    assert not (out / "checkpoints").exists()
    assert not (out / "metrics.jsonl").exists()


def bad_key(tmp_path: Path) -> tuple[Path, str]:
    cfg = causal_config(tmp_path)
    cfg["optim"]["lrr"] = 1e-3
    path = write_config(cfg, tmp_path / "config.yaml")
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith("lrr:"))
    return path, rf"finetrain: {re.escape(str(path))}:{line}: unknown key optim\.lrr; did you mean optim\.lr\?"


def bad_row(tmp_path: Path) -> tuple[Path, str]:
    cfg = causal_config(tmp_path)
    data = Path(cfg["data"]["datasets"][0]["path"])
    rows = data.read_text().splitlines()
    rows[6] = '{"messages": [{"role": "user", "content": "hello"}]}'
    data.write_text("\n".join(rows) + "\n")
    path = write_config(cfg, tmp_path / "config.yaml")
    return path, rf"finetrain: {re.escape(str(data))}:7: conversation has no assistant turn .*"


def missing_file(tmp_path: Path) -> tuple[Path, str]:
    cfg = causal_config(tmp_path)
    cfg["data"]["datasets"][0]["path"] = str(tmp_path / "nowhere.jsonl")
    path = write_config(cfg, tmp_path / "config.yaml")
    return path, rf"finetrain: {re.escape(str(path))}:\d+: data\.datasets\.0\.path: .*nowhere\.jsonl does not exist"


def impossible_layout(tmp_path: Path) -> tuple[Path, str]:
    """6 rows per step cannot be split into micro-batches of 2 on 2 ranks (it can on one)."""
    cfg = causal_config(tmp_path, train={"micro_batch_size": 2, "global_batch_size": 6, "max_steps": 2})
    cfg["parallel"]["strategy"] = "ddp"
    path = write_config(cfg, tmp_path / "config.yaml")
    return path, (rf"finetrain: {re.escape(str(path))}:\d+: train\.global_batch_size: 6 rows per step do not split "
                  r"into micro-batches of 2 on 2 ranks.*")


MISTAKES = {"bad key": bad_key, "bad row": bad_row, "missing file": missing_file}


@pytest.mark.slow
@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_mistake_is_one_line_and_exit_2_on_one_rank(tmp_path, mistake):
    config, pattern = MISTAKES[mistake](tmp_path)
    proc = run_cli(config, check=False)
    assert_one_line_error(proc, pattern, tmp_path / "run")


@pytest.mark.slow
@pytest.mark.parametrize("mistake", [*MISTAKES, "impossible layout"])
def test_a_mistake_is_one_line_and_exit_2_on_two_ranks(tmp_path, mistake):
    config, pattern = {**MISTAKES, "impossible layout": impossible_layout}[mistake](tmp_path)
    proc = run_cli(config, "--nproc", "2", check=False)
    assert_one_line_error(proc, pattern, tmp_path / "run")


@pytest.mark.slow
def test_a_failed_start_leaves_the_previous_config_of_the_run(tmp_path):
    """Resuming with a mistake must not overwrite what the run folder says ran."""
    config, _ = bad_row(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("what ran before\n")
    assert run_cli(config, check=False).returncode == 2
    assert (out / "config.yaml").read_text() == "what ran before\n"


@pytest.mark.slow
def test_estimate_of_a_model_folder_without_its_config_is_one_line(tmp_path):
    """`finetrain estimate` reads only the model's config.json; a folder without it (say, the
    path the model will have on the cluster) is the user's to fix, not a traceback."""
    cfg = causal_config(tmp_path)
    del cfg["model"]["config"], cfg["model"]["tokenizer"]
    cfg["model"]["path"] = str(tmp_path / "models" / "llama")
    path = write_config(cfg, tmp_path / "config.yaml")
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip().endswith("models/llama"))
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "estimate", str(path), "--nodes", "1",
                           "--gpus-per-node", "8"], capture_output=True, text=True, cwd=REPO, env=trainer_env(),
                          timeout=300)
    assert_one_line_error(proc, rf"finetrain: {re.escape(str(path))}:{line}: model\.path: .*llama has no config\.json .*",
                          tmp_path / "run")


@pytest.mark.slow
def test_traceback_on_request(tmp_path):
    config, pattern = bad_row(tmp_path)
    proc = run_cli(config, check=False, env_extra={"FINETRAIN_TRACEBACK": "1"})
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "DataError" in proc.stderr
    assert re.fullmatch(pattern, error_lines(proc.stderr)[-1])


def test_the_launcher_exits_2_when_a_mistake_ends_the_ranks():
    """The first rank to report a mistake makes the elastic agent end the others while they are
    on their way out with the same mistake: still exit 2 and no more lines. A rank that
    crashed on its own (another code or signal) is named, exit 1."""
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from launch.elastic import failure_report

    def failed(*codes: int) -> dict:
        return {rank: ProcessFailure(rank, 1000 + rank, code, "<N/A>") for rank, code in enumerate(codes)}

    assert failure_report(failed(2, 2)) == (2, [])
    assert failure_report(failed(2, -signal.SIGTERM)) == (2, [])
    assert failure_report(failed(-signal.SIGKILL, 2)) == (2, [])
    assert failure_report(failed(5, 4)) == (5, [])  # a failed save, reported by the ranks
    code, lines = failure_report(failed(2, -signal.SIGABRT))
    assert code == 1 and lines[-1] == "rank 1 was killed by SIGABRT (see its output above)" and len(lines) == 2
    assert failure_report(failed(-signal.SIGTERM, -signal.SIGTERM))[0] == 1
    assert failure_report(failed(1, 2))[0] == 1
