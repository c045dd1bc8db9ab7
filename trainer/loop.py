"""The training loop, top to bottom.

`train(cfg)` sets up the process group, tokenizer, data, model and strategy,
resumes if a complete checkpoint exists, then runs optimizer steps: fetch this
rank's micro-batches for the step, count the step's target tokens over all ranks,
forward/backward each micro-batch on loss_sum / global_count, step, log, evaluate,
checkpoint. A stop signal (SIGTERM, SIGUSR1) ends the current step, saves, exits 0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time

import torch

from trainer.checkpoint import Checkpointer, seed_step
from trainer.config import Config, dataset_name, dump_yaml
from trainer.data import build_eval_sets, build_train_loader, describe_batch, training_texts
from trainer.distributed import DistInfo, all_reduce_max, all_reduce_sum, barrier, init_distributed
from trainer.evaluate import evaluate, model_logits, to_device
from trainer.loss import summed_loss
from trainer.metrics import MetricsLogger, StepTimer, flops_per_token, memory_stats, peak_flops
from trainer.models import build_model, load_tokenizer, parameter_counts, resolve_attention
from trainer.parallel import build_strategy, resolve_strategy

log = logging.getLogger("finetrain")


class StopSignal:
    """Turns SIGTERM/SIGUSR1 into a request to checkpoint after the current step.
    A second signal falls through to the default action (terminate)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self.previous = {}
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        log.warning("received %s: finishing this step, then checkpointing", signal.Signals(signum).name)
        self.requested = True
        signal.signal(signum, signal.SIG_DFL)

    def agreed(self) -> bool:
        """True on every rank once any rank was signalled (they must save together)."""
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        return bool(all_reduce_max(flag).item())

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def total_steps(cfg: Config, loader) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * loader.steps_per_epoch()))


def accumulation_steps(cfg: Config, world_size: int) -> int:
    rows_per_pass = cfg.train.micro_batch_size * world_size
    if cfg.train.global_batch_size % rows_per_pass:
        raise ValueError(
            f"train.global_batch_size {cfg.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size {cfg.train.micro_batch_size} x {world_size} ranks"
        )
    return cfg.train.global_batch_size // rows_per_pass


def train_step(strategy, batches: list, task: str) -> dict:
    """One optimizer step over this rank's micro-batches; returns global sums."""
    device = strategy.dist.device
    global_targets = all_reduce_sum(torch.tensor([sum(b.num_targets for b in batches)], dtype=torch.float64))
    # A step whose every label is masked still runs (all ranks must), with zero gradient.
    denominator = max(float(global_targets.item()), 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        with contextlib.nullcontext() if last else strategy.no_sync():
            labels = batch.labels.to(device)
            with strategy.autocast():
                logits = model_logits(strategy.model, to_device(batch.inputs, device), labels)
            summed = summed_loss(logits, labels, task)
            strategy.backward(summed / denominator)
        loss_sum += summed.detach().double().cpu()
    grad_norm = strategy.step()
    loss = float(all_reduce_sum(loss_sum.reshape(1)).item()) / denominator
    return {"loss": loss, "grad_norm": grad_norm, "targets": int(global_targets.item())}


def step_counts(batches: list, names: list[str]) -> torch.Tensor:
    """Per-step data counters of this rank, as one vector (one all-reduce for all)."""
    values = [sum(b.num_tokens for b in batches), sum(b.num_slots for b in batches)]
    for name in names:
        values.append(sum(b.examples.get(name, 0) for b in batches))
        values.append(sum(b.tokens.get(name, 0) for b in batches))
    return torch.tensor(values, dtype=torch.float64)


def prepare_run_dir(cfg: Config, dist_info: DistInfo) -> None:
    if dist_info.is_main:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / "config.yaml").write_text(dump_yaml(cfg))
    barrier()


def train(cfg: Config, debug: bool = False) -> dict:
    """Run (or resume) training as configured; returns the last logged record."""
    dist_info = init_distributed()
    strategy_name = resolve_strategy(cfg, dist_info.world_size)
    if debug:
        torch.use_deterministic_algorithms(True, warn_only=True)
    prepare_run_dir(cfg, dist_info)
    torch.manual_seed(cfg.run.seed)

    attention = resolve_attention(cfg.model, dist_info.device)
    # Rank 0 first: it may train or convert the tokenizer and fill the data cache.
    tokenizer = None
    for turn in (True, False):
        if dist_info.is_main == turn:
            tokenizer = load_tokenizer(cfg, lambda: training_texts(cfg))
        barrier()
    loader = build_train_loader(cfg, tokenizer, attention, dist_info.rank, dist_info.world_size)
    eval_sets = build_eval_sets(cfg, tokenizer, attention, dist_info.rank, dist_info.world_size)
    accum = accumulation_steps(cfg, dist_info.world_size)
    steps = total_steps(cfg, loader)

    strategy = build_strategy(cfg, dist_info)
    model = strategy.build_model(lambda: build_model(cfg, tokenizer, attention))
    trainable, total = parameter_counts(model)
    strategy.setup(model, steps)
    log.info("strategy %s on %d rank(s), attention %s, %d micro-batch(es) of %d per step, %d steps; "
             "%s of %s parameters trainable", strategy_name, dist_info.world_size, attention, accum,
             cfg.train.micro_batch_size, steps, f"{trainable:,}", f"{total:,}")

    checkpointer = Checkpointer(cfg, dist_info, strategy_name)
    state = {"step": 0, "counts": None, "wandb_run_id": None}
    resume_from = checkpointer.resume_path()
    if resume_from is not None:
        state = checkpointer.load(resume_from, strategy)
        loader.load_state_dict(state["loader"])

    names = [dataset_name(ds) for ds in cfg.data.datasets]
    counts = state["counts"] if state["counts"] is not None else torch.zeros(2 + 2 * len(names), dtype=torch.float64)
    metrics = MetricsLogger(cfg, dist_info.is_main, steps, state["step"], state["wandb_run_id"])
    flops_token = flops_per_token(getattr(strategy.unwrapped_model(), "config", None), total, cfg.data.seq_len)
    device_peak = peak_flops(dist_info.device)
    stop = StopSignal()
    step = state["step"]
    record: dict = {}

    def save():
        trainer_state = {"step": step, "loader": loader.state_dict(), "counts": counts,
                         "wandb_run_id": metrics.wandb_run_id}
        checkpointer.save(step, strategy, trainer_state, tokenizer)

    strategy.model.train()
    try:
        while step < steps:
            seed_step(cfg.run.seed, step, dist_info.rank)
            batches = loader.next_step(accum)
            if debug and step == state["step"] and dist_info.is_main:
                print(describe_batch(batches[0], tokenizer), flush=True)
            with StepTimer(dist_info.device) as timer:
                result = train_step(strategy, batches, cfg.model.task)
            step += 1
            step_data = all_reduce_sum(step_counts(batches, names))
            counts += step_data
            metrics.advance()

            if step % cfg.train.log_every == 0 or step == steps:
                real_tokens, row_tokens = float(step_data[0]), float(step_data[1])
                record = {
                    "step": step,
                    "loss": result["loss"],
                    "lr": strategy.lr(),
                    "grad_norm": result["grad_norm"],
                    "tokens": result["targets"],
                    "tokens_per_s": real_tokens / timer.seconds,
                    "packing_efficiency": real_tokens / max(row_tokens, 1.0),
                    "padding_tokens": int(row_tokens - real_tokens),
                    "step_time_s": timer.seconds,
                    "time": time.time(),
                }
                if device_peak:
                    record["mfu"] = flops_token * real_tokens / dist_info.world_size / timer.seconds / device_peak
                for i, name in enumerate(names):
                    record[f"data/{name}/examples"] = int(counts[2 + 2 * i])
                    record[f"data/{name}/tokens"] = int(counts[3 + 2 * i])
                for key, value in loader.stats.items():
                    record[f"data/{key}"] = value
                record.update(memory_stats(dist_info.device))
                metrics.log(record)

            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < steps and eval_sets:
                metrics.log({"step": step, **evaluate(strategy, eval_sets, cfg.model.task)})

            stopping = stop.agreed()
            if stopping or step == steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
                save()
            if stopping:
                log.warning("stopped at step %d after a signal; checkpoint saved, resume with the same command", step)
                return record

        if eval_sets:
            final_eval = evaluate(strategy, eval_sets, cfg.model.task)
            metrics.log({"step": step, **final_eval})
            record = {**record, **final_eval}
        return record
    finally:
        stop.restore()
        metrics.close()
