"""Throughput, MFU, memory; sinks: console progress, metrics.jsonl, generations.jsonl, and the
trackers: Weights & Biases, TensorBoard, MLflow.

Only rank 0 writes. Every record goes to `MetricsLogger.log`, which fans its scalars out to every
tracker alike (training, eval, rewards, memory, MFU: whatever a record holds). `metrics.jsonl` is
opened for append, so a resumed run adds to the records of the run it continues; the W&B and
MLflow run ids are kept in the checkpoint and TensorBoard writes into the run folder, so a resumed
run logs into the same run of each tracker. While the progress bar is on, warnings and log lines
are written through it (tqdm's write), so each stays a whole line.
Before it appends, a resumed run drops the records that the run it continues wrote after the
checkpoint it resumes from (work lost to a crash or a kill, done again now) and a last line cut
short by a kill, from metrics.jsonl and generations.jsonl alike: each step appears once, with the
value that counted, and every line of either file is whole JSON.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import netrc
import os
import platform
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from trainer.config.schema import Config, dataset_name, dump_yaml, flatten, to_dict
from trainer.runtime.errors import ConfigError, first_line
from trainer.runtime.memory import peak_rss_bytes

log = logging.getLogger("finetrain")

# Dense bf16 peak FLOP/s per device, for MFU. Other GPUs get MFU only from logging.peak_flops.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "B200": 2250e12,
}
CPU_MATMUL_SIZE = 1024
WANDB_RUN_ID_FILE = "wandb_run_id"  # in run.output_dir: the W&B run every attempt of the run logs into  # large enough for BLAS to reach its peak, small enough to time in a second


def peak_flops(device: torch.device, dtype: torch.dtype, override: float | None, cache_dir: Path) -> float | None:
    """Peak FLOP/s of one device, the denominator of MFU: `logging.peak_flops` when set,
    else a known GPU's dense bf16 peak, else (CPU) a matmul measured once and cached."""
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((value for key, value in PEAK_BF16_FLOPS.items() if key in name), None)
    if device.type == "cpu":
        return measured_cpu_flops(dtype, cache_dir / "peak_flops.json")
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measured_cpu_flops(dtype: torch.dtype, cache_file: Path) -> float:
    """FLOP/s of a square matmul in `dtype` on this process's threads (best of 5), cached
    per CPU model, thread count, dtype and torch version: a CPU has no datasheet peak that
    torch reaches, so MFU on a CPU is relative to what its BLAS does at best."""
    key = f"{cpu_model()} | {torch.get_num_threads()} threads | {dtype} | torch {torch.__version__}"
    cached = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    if key in cached:
        return cached[key]
    generator = torch.Generator().manual_seed(0)  # leaves the run's random streams alone
    a, b = (torch.randn(CPU_MATMUL_SIZE, CPU_MATMUL_SIZE, generator=generator).to(dtype) for _ in range(2))
    a @ b  # warm-up: thread pool, packing buffers
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    flops = 2 * CPU_MATMUL_SIZE**3 / best
    cached[key] = flops
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    aside = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
    aside.write_text(json.dumps(cached, indent=1))
    os.replace(aside, cache_file)
    log.info("CPU peak for MFU: %.1f GFLOP/s measured (%s); cached in %s, logging.peak_flops overrides it",
             flops / 1e9, key, cache_file)
    return flops


def flops_per_token(model_config, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus causal attention scores
    (12 · layers · hidden · seq_len / 2), the estimate of the PaLM paper's appendix."""
    layers = getattr(model_config, "num_hidden_layers", 0)
    hidden = getattr(model_config, "hidden_size", 0)
    return 6 * num_params + 6 * layers * hidden * seq_len


def memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {
            "memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "memory/max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    return {"memory/peak_rss_gib": peak_rss_bytes() / 2**30}


def git_commit() -> str | None:
    """The commit of the finetrain source that runs ("-dirty" with local changes), if a git checkout."""
    source = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def run_description(cfg: Config, strategy: str, world_size: int, trainable: int, total: int,
                    dataset_examples: dict[str, int]) -> dict:
    """What the resolved config does not say: the strategy picked, parameter counts, the data
    mix (each dataset's share of what data.mix_by counts), and the code's commit (for the W&B
    run config)."""
    weights = {dataset_name(ds): ds.weight for ds in cfg.data.datasets}
    formats = {dataset_name(ds): ds.format for ds in cfg.data.datasets}
    return {
        "strategy": strategy,
        "world_size": world_size,
        "parameters": {"total": total, "trainable": trainable},
        "data_mix": {name: {"share": weight / sum(weights.values()), "format": formats[name],
                            "train_examples": dataset_examples.get(name)} for name, weight in weights.items()},
        "git_commit": git_commit(),
    }


def wandb_credentials() -> bool:
    """An API key in the environment, or a netrc entry for the W&B host (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def past_resume_point(record: dict, step: int, total_steps: int) -> bool:
    """Whether a record was written after the checkpoint of `step` (the loop logs a step and runs its
    periodic evaluation before saving it; the evaluations at step 0 and after the last step come
    after the save)."""
    logged = record.get("step")
    if not isinstance(logged, int) or "restart" in record:  # a restart happened, whatever the step resumed from
        return False
    if logged != step:
        return logged > step
    return "loss" not in record and step in (0, total_steps)


def trim_records(path: Path, step: int, total_steps: int) -> int:
    """Drop from a JSON Lines file of the run the records written after the checkpoint of `step`,
    and any line that is not whole JSON (a write cut short by a kill); written aside and renamed,
    so a kill meanwhile leaves the file as it was. Returns the highest training step dropped (or
    `step` when none)."""
    if not path.is_file():
        return step
    kept, dropped, highest = [], 0, step
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short (or not UTF-8 any more)
                dropped += 1
                continue
            if isinstance(record, dict) and past_resume_point(record, step, total_steps):
                dropped += 1
                if "loss" in record:
                    highest = max(highest, record["step"])
                continue
            kept.append(line if line.endswith(b"\n") else line + b"\n")
    if dropped:
        aside = path.with_name(f".{path.name}.tmp")
        aside.write_bytes(b"".join(kept))
        os.replace(aside, path)
        log.info("%s: %d record(s) written after the checkpoint of step %d dropped (done again now)",
                 path, dropped, step)
    return highest


# The package each tracker needs, and the extra of finetrain that installs it.
TRACKER_PACKAGES = {"logging.tensorboard": ("tensorboard", "tensorboard"), "logging.mlflow": ("mlflow", "mlflow")}


def tracker_problems(cfg: Config) -> list[str]:
    """Trackers asked for whose package is not installed (one line each, before the run starts)."""
    wanted = {"logging.tensorboard": cfg.logging.tensorboard, "logging.mlflow": cfg.logging.mlflow.experiment}
    return [f"{key}: needs the {package} package: pip install 'finetrain[{extra}]' (or make setup)"
            for key, (package, extra) in TRACKER_PACKAGES.items()
            if wanted[key] and importlib.util.find_spec(package) is None]


def scalars_of(record: dict) -> dict[str, float]:
    """The record's numbers but its step and wall time (which every tracker keeps with each value):
    what every tracker logs of it."""
    return {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardTracker:
    """Event files in `run.output_dir/tensorboard`. A resumed run writes on in the same folder from
    the step after its checkpoint: events of later steps left by the run before (work a crash lost,
    recomputed now) are purged by TensorBoard's readers, so each step shows the value that counted."""

    def __init__(self, out: Path, cfg: Config, start_step: int, run_description: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("config", "```yaml\n" + dump_yaml(cfg) + "```", global_step=start_step)
        self.writer.add_text("finetrain", "```json\n" + json.dumps(run_description, indent=1) + "\n```",
                             global_step=start_step)

    def log(self, step: int, scalars: dict[str, float], wall_time: float) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step, walltime=wall_time)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """An MLflow run in `logging.mlflow.experiment`: the config as its parameters (dotted keys), every
    scalar as a metric at its step. A resumed run continues the MLflow run whose id the checkpoint
    holds (its parameters stay those it started with: MLflow's are immutable; keys changed on resume
    are listed in the run's log)."""

    MAX_PARAMS_PER_CALL = 100  # MLflow's limit of one log_batch
    MAX_PARAM_CHARS = 6000

    def __init__(self, cfg: Config, run_id: str | None, run_description: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        settings = cfg.logging.mlflow
        self.client = MlflowClient(tracking_uri=settings.tracking_uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(settings.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(settings.experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=cfg.run.name).info.run_id
        values = {**flatten(to_dict(cfg)), **flatten({"finetrain": run_description})}
        params = [Param(key, str(value)[: self.MAX_PARAM_CHARS]) for key, value in values.items()]
        for first in range(0, len(params), self.MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[first: first + self.MAX_PARAMS_PER_CALL])

    def log(self, step: int, scalars: dict[str, float], wall_time: float) -> None:
        from mlflow.entities import Metric

        stamp = int(wall_time * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def start_mlflow(cfg: Config, run_id: str | None, run_description: dict) -> MlflowTracker:
    """The MLflow run; a store or server that refuses it (a wrong tracking_uri, a file store MLflow
    keeps only on request) is one line naming logging.mlflow."""
    from mlflow.exceptions import MlflowException

    try:
        return MlflowTracker(cfg, run_id, run_description)
    except MlflowException as err:
        raise ConfigError(f"logging.mlflow: {cfg.logging.mlflow.tracking_uri or 'MLflow'} refuses the run: "
                          f"{first_line(err)}") from None


class MetricsLogger:
    """Rank 0's sinks: metrics.jsonl, generations.jsonl, the trackers (W&B, TensorBoard, MLflow),
    the progress bar."""

    def __init__(self, cfg: Config, is_main: bool, total_steps: int, start_step: int, wandb_run_id: str | None,
                 run_description: dict | None = None, mlflow_run_id: str | None = None):
        self.cfg = cfg
        self.is_main = is_main
        self.jsonl = None
        self.wandb = None
        self.progress = None
        self.trackers: list[TensorBoardTracker | MlflowTracker] = []  # besides W&B, which also takes tables
        self.console = contextlib.ExitStack()
        self.wandb_run_id = wandb_run_id or uuid.uuid4().hex[:12]
        self.last_dropped_step = start_step
        self.mlflow_run_id = mlflow_run_id
        if not is_main:
            return
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.generations_path = out / "generations.jsonl"
        # The highest step a crashed or killed run logged past the checkpoint resumed from.
        self.last_dropped_step = trim_records(out / "metrics.jsonl", start_step, total_steps)
        trim_records(self.generations_path, start_step, total_steps)
        if cfg.logging.jsonl:
            self.jsonl = open(out / "metrics.jsonl", "a")
        if cfg.logging.wandb.mode != "disabled":
            self.wandb_run_id = self._one_wandb_run(out, wandb_run_id)
            self.wandb = self._start_wandb(out, run_description or {})
        if cfg.logging.tensorboard:
            self.trackers.append(TensorBoardTracker(out, cfg, start_step, run_description or {}))
        if cfg.logging.mlflow.experiment:
            mlflow = start_mlflow(cfg, mlflow_run_id, run_description or {})
            self.mlflow_run_id = mlflow.run_id
            self.trackers.append(mlflow)
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.progress = tqdm(total=total_steps, initial=start_step, desc=cfg.run.name, unit="step",
                                 dynamic_ncols=True, file=sys.stderr)
            self._write_console_through_progress_bar()

    def _write_console_through_progress_bar(self) -> None:
        """Log lines and Python warnings printed while the bar is drawn would land on its line:
        they go through tqdm's write (which clears the bar, prints the line, redraws the bar)."""
        self.console.enter_context(logging_redirect_tqdm())
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            text = warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n")
            self.progress.write(text, file=sys.stderr)

        warnings.showwarning = show
        self.console.callback(setattr, warnings, "showwarning", shown)

    def _one_wandb_run(self, out: Path, from_checkpoint: str | None) -> str:
        """The W&B run id of this run folder: the checkpoint's when resuming, else the one an earlier
        attempt that saved no checkpoint started (a restart soon after the start), else this id;
        kept in the folder so that every attempt logs into one W&B run."""
        path = out / WANDB_RUN_ID_FILE
        run_id = from_checkpoint
        if run_id is None and path.is_file():
            run_id = path.read_text().strip() or None
        run_id = run_id or self.wandb_run_id
        path.write_text(run_id + "\n")
        return run_id

    def _start_wandb(self, out: Path, run_description: dict):
        import wandb

        w = self.cfg.logging.wandb
        mode = w.mode
        if mode == "online" and not wandb_credentials():
            log.warning("logging.wandb.mode online: no W&B API key (WANDB_API_KEY, or `wandb login`); logging "
                        "offline to %s instead, upload it later with `wandb sync`", out / "wandb")
            mode = "offline"
        return wandb.init(
            project=w.project, entity=w.entity, tags=list(w.tags), name=self.cfg.run.name,
            id=self.wandb_run_id, resume="allow", mode=mode, dir=str(out),
            config={**to_dict(self.cfg), "finetrain": run_description},
        )

    def log(self, record: dict) -> None:
        if not self.is_main:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])
        scalars, wall_time = scalars_of(record), record.get("time") or time.time()
        for tracker in self.trackers:
            tracker.log(record["step"], scalars, wall_time)
        if self.progress is not None:
            if "loss" in record:
                self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                          tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            evals = {k: v for k, v in record.items() if k.startswith("eval/") and k.endswith(("/loss", "/rougeL", "/acc"))}
            if evals:
                self.progress.write(f"step {record['step']}: " + "  ".join(f"{k}={v:.4f}" for k, v in evals.items()))

    def log_event(self, record: dict) -> None:
        """A record of something that happened to the run (a restart), in metrics.jsonl only: the
        trackers take steps in increasing order, and the run's step went back to the checkpoint."""
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def log_generations(self, step: int, rows: list[dict]) -> None:
        """Greedy answers of one evaluation: appended to generations.jsonl, and a W&B table."""
        if not self.is_main or not rows:
            return
        with open(self.generations_path, "a") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.wandb is not None:
            import wandb

            columns = list(rows[0])
            table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
            self.wandb.log({"eval/generations": table}, step=step)

    def log_answers(self, step: int, answers: list[dict]) -> None:
        """Each held-out question's first answer (the model before training, for a run from
        step 0) beside its latest: a W&B table, logged once at the end of the run."""
        if self.wandb is None or not answers:
            return
        import wandb

        columns = ["dataset", "question", "reference", "first_step", "first_answer", "last_step", "last_answer"]
        data = [[a["dataset"], a["question"], a["reference"], a["first"]["step"], a["first"]["answer"],
                 a["last"]["step"], a["last"]["answer"]] for a in answers]
        self.wandb.log({"eval/answers_first_and_last": wandb.Table(columns=columns, data=data)}, step=step)

    def advance(self, steps: int = 1) -> None:
        if self.progress is not None:
            self.progress.update(steps)

    def close(self) -> None:
        self.console.close()
        if self.progress is not None:
            self.progress.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
        for tracker in self.trackers:
            tracker.close()


class StepTimer:
    """Wall time of a block (synchronising CUDA so the time is real)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = 0.0

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
