"""bench/gpu_check.py, where no CUDA GPU is visible, stops at once with one line and exit code 2
(the check itself needs a GPU; hiding every device makes this hold on any machine)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO
from runs import trainer_env


def test_without_a_gpu_one_line_and_exit_2():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True,
                          cwd=REPO, env={**trainer_env(), "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU"), proc.stderr[-3000:]
    assert proc.stdout == ""
