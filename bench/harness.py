"""What the training benchmarks share: the random 16M Llama, a measurement run in a fresh
process, finetrain's own loop with every optimizer step timed, and the machine's description.

Each measurement runs in a process of its own because peak resident memory can only grow: a
second run in the same process would report the first one's peak. Peak RSS is the process's own
VmHWM (/proc/self/status), not ru_maxrss, which a child started by fork + exec inherits from its
parent's peak at the fork.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# SmolLM2's 49,152-token vocabulary with tied embeddings on a small body (hidden 256, 4 layers):
# at 16M parameters the LM head is most of the FLOPs.
RANDOM_16M = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 256, "intermediate_size": 1024,
              "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
              "max_position_embeddings": 2048, "tie_word_embeddings": True}


def run_worker(script: str, worker_args: list[str], result_path: Path, threads: int, timeout: float = 7200) -> dict:
    """`python script --worker *worker_args result_path` in a fresh process with `threads`
    torch threads; returns the JSON the worker wrote to `result_path`."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, script, "--worker", *worker_args, str(result_path)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} --worker {' '.join(worker_args)}: exited {proc.returncode}\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(Path(result_path).read_text())


def peak_rss_mib() -> float:
    """This process's peak resident memory so far: VmHWM, where /proc has it."""
    from trainer.runtime.memory import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def matmul_peak(dtype_name: str, threads: int, size: int = 1024, repeats: int = 7) -> dict:
    """FLOP/s of a square matmul in `dtype_name` ("fp32", "bf16") on `threads` torch threads:
    the best of `repeats` by wall clock, and by CPU time of this process (which other load on
    the machine does not slow down): the denominators of MFU and of MFU per CPU-second."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
    a @ b
    wall = cpu = float("inf")
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        a @ b
        wall, cpu = min(wall, time.perf_counter() - w), min(cpu, time.process_time() - c)
    flops = 2 * size ** 3
    return {"flops_per_s": flops / wall, "flops_per_cpu_s": flops / max(cpu, 1e-9), "threads": threads,
            "size": size}


def step_end() -> dict:
    """When an optimizer step ended, in wall-clock and in CPU seconds of this process, and the
    peak resident memory by then (what happens after the last step, such as saving, is no
    part of training's peak)."""
    return {"end_s": time.perf_counter(), "end_cpu_s": time.process_time(), "rss_mib": peak_rss_mib()}


def train_finetrain(config: str):
    """Train through the loop's own Trainer, recording each optimizer step: the time of
    `train_step` alone (wall-clock and CPU seconds of this process, which other load on the
    machine does not inflate), `step_end()`, the real input tokens, targets, loss and preference
    pairs.
    Returns the Trainer (its model, trained) and the measurements."""
    import trainer.loop as loop
    from trainer.config.schema import load_config

    logging.basicConfig(level=logging.INFO)
    compile_lines: list[str] = []
    logging.getLogger("finetrain").addHandler(_CompileReport(compile_lines))
    steps = []
    step = loop.train_step

    def timed_step(strategy, batches, task, objective=None):
        wall, cpu = time.perf_counter(), time.process_time()
        result = step(strategy, batches, task, objective)
        steps.append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, **step_end(),
                      "real_tokens": sum(b.num_tokens for b in batches),
                      "slots": sum(b.num_slots for b in batches), "targets": result["targets"],
                      "loss": result["loss"], "pairs": result.get("preference", {}).get("pairs", 0)})
        return result

    loop.train_step = timed_step
    run = loop.Trainer(load_config(config))
    run.fit()
    return run, {"steps": steps, "peak_rss_mib": peak_rss_mib(), "parameters": run.num_params,
                 "attention": run.plan.attention,
                 "compile": next((line for line in compile_lines if "decoder layers compiled" in line), "")}


class _CompileReport(logging.Handler):
    """Keeps the messages of train.compile."""

    def __init__(self, lines: list):
        super().__init__()
        self.lines = lines

    def emit(self, record):
        if record.getMessage().startswith("train.compile"):
            self.lines.append(record.getMessage())


def machine() -> dict:
    """Where the numbers were taken; the load average says how busy the cores were."""
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()]}
