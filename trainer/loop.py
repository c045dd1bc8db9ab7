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
import os
import signal
import time

import torch

from trainer.build import build_training
from trainer.checkpoint.checkpointer import Checkpointer
from trainer.checkpoint.run_folder import claim_run_folder
from trainer.config.schema import Config, cache_root, dataset_name, dump_yaml, load_config
from trainer.data.collate import describe_batch
from trainer.data.end_of_turn import check_end_of_turn
from trainer.data.loader import build_train_loader
from trainer.data.run_data import RunData, training_texts
from trainer.eval.evaluator import Evaluator, to_device
from trainer.model.activation_offload import activation_offload
from trainer.model.attention import TORCH_VARLEN, activate_flash_attention_3
from trainer.model.loss import forward_summed_loss
from trainer.model.tokenizer import describe_template, load_tokenizer
from trainer.optim import set_schedule_step
from trainer.peft.methods import with_adapter_penalty
from trainer.plan import plan_run, resume_changes
from trainer.preference.objective import PreferenceObjective, build_objective
from trainer.reporting.metrics_log import (MetricsLogger, StepTimer, flops_per_token, memory_stats, peak_flops,
                                           run_description)
from trainer.reporting.summary import RunSummary
from trainer.runtime import faults, restarts
from trainer.runtime.distributed import agree, all_reduce_max, all_reduce_sum, init_distributed, main_first
from trainer.runtime.errors import ConfigError, UserError, say
from trainer.runtime.precision import compute_precision

log = logging.getLogger("finetrain")


class StopSignal:
    """Turns SIGTERM/SIGUSR1 into a request to checkpoint after the current step.

    The same request often arrives twice within a moment: Slurm signals every process of
    a job step, and the launcher above this rank forwards the signal too. A repeat within
    REPEAT_WINDOW_S is that same request; a later second signal falls through to the
    default action (terminate at once)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    REPEAT_WINDOW_S = 1.0

    def __init__(self):
        self.requested_at: float | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.requested_at is None:
            self.requested_at = now
            log.warning("received %s: finishing this step, then checkpointing", signal.Signals(signum).name)
        elif now - self.requested_at > self.REPEAT_WINDOW_S:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def agreed(self) -> bool:
        """True on every rank once any rank was signalled (they must save together)."""
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        return bool(all_reduce_max(flag).item())

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch for one optimizer step; a function of (seed, step, rank) only."""
    torch.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def total_steps(cfg: Config, loader) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * loader.steps_per_epoch()))


def train_step(strategy, batches: list, task: str, objective: PreferenceObjective | None = None) -> dict:
    """One optimizer step over this rank's micro-batches; returns global sums. A step whose loss or
    gradient norm is not finite leaves the weights as they were (`nonfinite`; the same on every rank:
    both values are global before the strategy decides). With a preference `objective` each
    micro-batch's loss is its share of the step's preference and language-model means
    (trainer/preference/objective.py), and the step's rewards come back under `preference`."""
    device = strategy.dist.device
    offload = strategy.cfg.train.activation_offload
    global_targets = all_reduce_sum(torch.tensor([sum(b.num_targets for b in batches)], dtype=torch.float64))
    # A step whose every label is masked still runs (all ranks must), with zero gradient.
    denominator = max(float(global_targets.item()), 1.0)
    if objective is not None:
        objective.begin_step(strategy, batches)
    loss_sum = torch.zeros((), dtype=torch.float64)
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        with contextlib.nullcontext() if last else strategy.no_sync():
            labels = batch.labels.to(device)
            with strategy.autocast(), activation_offload(offload):
                if objective is None:
                    summed = with_adapter_penalty(strategy.model, forward_summed_loss(
                        strategy.model, to_device(batch.inputs, device), labels, task, batch.labels_shifted),
                        batch.num_targets)
                    share = summed / denominator
                else:  # the adapter's penalty once per step: an equal part on every micro-batch of every rank
                    share = with_adapter_penalty(strategy.model, objective.micro_batch_loss(strategy, batch),
                                                 1 / (len(batches) * strategy.dist.world_size))
                    summed = share.detach().double() * denominator
            strategy.backward(share)
        loss_sum += summed.detach().double().cpu()
    loss = float(all_reduce_sum(loss_sum.reshape(1)).item()) / denominator
    lr = strategy.lr()  # the rate this update uses; the scheduler moves on in step()
    grad_norm = strategy.step(skip=not math.isfinite(loss))
    result = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "targets": int(global_targets.item()),
              "nonfinite": not (math.isfinite(loss) and math.isfinite(grad_norm))}
    if objective is not None:
        result["preference"] = objective.step_metrics()
    return result


def step_counts(batches: list, names: list[str]) -> torch.Tensor:
    """Per-step data counters of this rank, as one vector (one all-reduce for all)."""
    values = [sum(b.num_tokens for b in batches), sum(b.num_slots for b in batches)]
    for name in names:
        values.append(sum(b.examples.get(name, 0) for b in batches))
        values.append(sum(b.tokens.get(name, 0) for b in batches))
    return torch.tensor(values, dtype=torch.float64)


class Trainer:
    """Everything a run needs, set up in the order it is needed; `fit()` is the loop.

    Each phase of the set-up runs under `agree`/`main_first`: a user's mistake that any rank
    meets (a bad key, a bad row, a missing file) stops every rank with the same message."""

    def __init__(self, cfg: Config, stop: StopSignal | None = None, debug: bool = False):
        self.cfg = cfg
        self.stop = stop or StopSignal()
        self.debug = debug
        faults.start(cfg.parallel)  # heartbeat (under finetrain's launcher) and collective timeouts
        faults.enter("setup")
        self.dist = dist_info = init_distributed(faults.collective_timeout_s(cfg.parallel.init_timeout_s))
        world = dist_info.world_size
        # What the run decides once, checked before anything heavy starts (as `finetrain train` did).
        self.plan = plan = agree(lambda: plan_run(cfg, world, dist_info.device.type))
        self.summary = RunSummary(cfg, dist_info.is_main)  # wall time counts from here
        # One run per folder: rank 0 holds it from before the run writes anything until its end.
        self.run_folder = agree(lambda: claim_run_folder(cfg) if dist_info.is_main else None)
        if debug:
            torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(cfg.run.seed)

        # Rank 0 first: it may train or convert the tokenizer and fill the data cache.
        self.tokenizer = main_first(lambda: load_tokenizer(cfg, lambda: training_texts(cfg)))
        self.data = agree(lambda: RunData.load(cfg, self.tokenizer))
        self.loader = build_train_loader(cfg, self.tokenizer, plan.attention, dist_info.rank, world, self.data,
                                         dist_info.device)
        if plan.attention == TORCH_VARLEN:
            activate_flash_attention_3(dist_info.device)
        # A trained assistant turn must end with the template's end-of-turn token among its targets.
        turn_report = agree(lambda: check_end_of_turn(cfg, self.tokenizer, describe_template(cfg, self.tokenizer)))
        if debug and dist_info.is_main:
            print("\n".join(turn_report or ["end-of-turn check: no chat or instruction data"]), flush=True)
        self.evaluator = agree(lambda: Evaluator.from_config(cfg, plan, self.tokenizer, self.data, dist_info))
        self.total_steps = agree(lambda: total_steps(cfg, self.loader))

        training = build_training(cfg, plan, dist_info, self.tokenizer, self.total_steps)
        self.strategy = training.strategy
        # Preference data: the loss and its reference model, from the model as it is before any resume.
        self.objective = agree(lambda: build_objective(cfg, plan, self.strategy, self.data, self.tokenizer, dist_info,
                                                       self.total_steps))
        self.evaluator.objective = self.objective
        trainable, self.num_params = training.trainable_params, training.total_params
        precision, why = compute_precision(cfg.parallel.mixed_precision, cfg.model.dtype, dist_info.device.type)
        log.info("strategy %s on %d rank(s)%s, compute %s (%s), attention %s, %d micro-batch(es) of %d per step, "
                 "%d steps; %s of %s parameters trainable", plan.strategy, world,
                 f" in sequence groups of {plan.mesh.sequence}" if plan.mesh.sequence > 1 else "", precision, why,
                 plan.attention,
                 plan.accumulation, cfg.train.micro_batch_size, self.total_steps, f"{trainable:,}", f"{self.num_params:,}")

        self.dataset_names = [dataset_name(ds) for ds in cfg.data.datasets]
        self.checkpointer = Checkpointer(cfg, dist_info, plan)
        self.step = 0
        self.counts = torch.zeros(2 + 2 * len(self.dataset_names), dtype=torch.float64)
        self.skipped_steps = self.skipped_in_a_row = 0  # steps whose update was dropped (train.on_nonfinite)
        self.checkpoint = None  # the newest checkpoint this run resumed from or wrote
        tracker_runs = agree(self.resume) or {}
        self.start_step = self.step
        description = run_description(cfg, plan.strategy, world, trainable, self.num_params,
                                      self.loader.dataset_examples) if dist_info.is_main else None
        self.metrics = agree(lambda: MetricsLogger(cfg, dist_info.is_main, self.total_steps, self.step,
                                                   tracker_runs.get("wandb"), description, tracker_runs.get("mlflow")))
        if dist_info.is_main:  # only now: a run that could not start leaves the last config.yaml as it was
            (cfg.output_dir / "config.yaml").write_text(dump_yaml(cfg))
            if restarts.is_restart(cfg.output_dir):
                self.report_restart()

    def report_restart(self) -> None:
        """Rank 0 of a restarted attempt, resumed: the restart with its cause (what the failed attempt
        left in the journal), the rank, the step resumed from and the steps done again, in the journal
        and metrics.jsonl; on the console in one line under plain torchrun (finetrain's launcher has
        already said it)."""
        out = self.cfg.output_dir
        journal = restarts.read(out)
        failed = restarts.failure_cause(journal, self.dist.world_size)
        reached = max(failed["steps_done"], self.metrics.last_dropped_step)
        # numbered over the run (a job started again counts on), where the line counts this launch's
        record = {"step": self.step, "restart": restarts.restart_totals(journal)[0] + 1, "cause": failed["cause"],
                  "rank": failed["rank"], "resumed_from": self.step, "steps_recomputed": max(0, reached - self.step)}
        restarts.append(out, record)
        self.metrics.log_event(record)
        where = f"step {self.step}" if self.checkpoint is not None else "the start (no checkpoint yet)"
        number, allowed = restarts.this_restart(journal)
        line = (f"restart {number} of {allowed}: {failed['cause']}; resumed from {where}, "
                f"{record['steps_recomputed']} step(s) to do again")
        if os.environ.get(faults.WATCH_DIR_ENV):
            log.warning("%s", line)
        else:
            say(line)

    def resume(self) -> dict | None:
        """Continue from the checkpoint `checkpoint.resume` names, if any; returns its W&B and MLflow
        run ids ({"wandb": ..., "mlflow": ...}).
        Keys changed since the checkpoint take effect from the first resumed step (the learning
        rate follows this run's schedule), or the resume is refused naming those that cannot."""
        resume_from = self.checkpointer.resume_path()
        if resume_from is None:
            return None
        try:
            saved = load_config(resume_from / "config.yaml", check_files=False)
        except ConfigError as err:
            raise UserError(f"{resume_from / 'config.yaml'}: {str(err).splitlines()[0]}") from None
        changes = resume_changes(saved, self.cfg)
        state = self.checkpointer.load(resume_from, self.strategy)
        self.loader.load_state_dict(state["loader"])
        self.step, self.counts = state["step"], state["counts"]
        self.skipped_steps, self.skipped_in_a_row = state.get("skipped_steps", 0), state.get("skipped_in_a_row", 0)
        self.evaluator.forgetting.load_state_dict(state["forgetting"])
        self.summary.load_state_dict(state["summary"])
        # Dropped (non-finite) steps did not advance the schedule: it counts the updates made.
        set_schedule_step(self.strategy.optimizer, self.strategy.scheduler, self.cfg.optim,
                          self.step - self.skipped_steps)
        if changes and self.dist.is_main:
            log.info("resuming %s at step %d with %d key(s) changed since it was saved (in effect from step %d):\n  %s",
                     resume_from, self.step, len(changes), self.step + 1, "\n  ".join(changes))
        self.checkpoint = resume_from
        return {"wandb": state["wandb_run_id"], "mlflow": state.get("mlflow_run_id")}

    def save(self, wait: bool = False) -> None:
        trainer_state = {"step": self.step, "loader": self.loader.state_dict(), "counts": self.counts,
                         "wandb_run_id": self.metrics.wandb_run_id, "mlflow_run_id": self.metrics.mlflow_run_id,
                         "forgetting": self.evaluator.forgetting.state_dict(),
                         "summary": self.summary.state_dict(), "skipped_steps": self.skipped_steps,
                         "skipped_in_a_row": self.skipped_in_a_row}
        with faults.long_phase("checkpoint", self.step):
            self.checkpoint = self.checkpointer.save(self.step, self.strategy, trainer_state, self.tokenizer, wait=wait)

    def fit(self) -> dict:
        """Train to the last step (or a stop signal); returns the last logged record."""
        cfg, strategy = self.cfg, self.strategy
        flops_token = flops_per_token(getattr(strategy.unwrapped_model(), "config", None), self.num_params, cfg.data.seq_len)
        device_peak = peak_flops(self.dist.device, strategy.compute_dtype(), cfg.logging.peak_flops,
                                 cache_root(cfg)) if self.dist.is_main else None
        stop = self.stop
        record: dict = {}
        ended = None  # "finished" or "stopped": summarised once the progress bar is closed
        if self.step == 0:
            self.evaluate()  # the baseline that loss_change (forgetting) is measured against
        strategy.model.train()
        try:
            while self.step < self.total_steps:
                seed_step(cfg.run.seed, self.step, self.dist.rank)
                faults.enter("data", self.step + 1)
                with StepTimer(self.dist.device) as data_timer:  # ~0 once the step was prepared ahead
                    batches = self.loader.next_step(self.plan.accumulation,
                                                    prepare_next=self.step + 1 < self.total_steps)
                if self.debug and self.step == self.start_step and self.dist.is_main:
                    print(describe_batch(batches[0], self.tokenizer), flush=True)
                faults.enter("compute", self.step + 1)
                with StepTimer(self.dist.device) as compute_timer:
                    result = train_step(strategy, batches, cfg.model.task, self.objective)
                self.step += 1
                faults.step_done(self.step)
                self.skipped_in_a_row = self.skipped_in_a_row + 1 if result["nonfinite"] else 0
                self.skipped_steps += result["nonfinite"]
                self.summary.count_step(data_timer.seconds + compute_timer.seconds)
                step_data = all_reduce_sum(step_counts(batches, self.dataset_names))
                self.counts += step_data
                self.metrics.advance()

                if self.step % cfg.train.log_every == 0 or self.step == self.total_steps or result["nonfinite"]:
                    record = self.step_record(result, step_data, data_timer.seconds, compute_timer.seconds,
                                              flops_token, device_peak)
                    self.metrics.log(record)
                if result["nonfinite"]:
                    reason = faults.nonfinite_stop(cfg, self.step, result, self.skipped_in_a_row)
                    if reason:  # every rank alike; nothing is saved
                        self.checkpointer.wait()  # a save of an earlier (good) step may be in flight: seal it
                        raise faults.NonFiniteStep(f"{reason}; {faults.last_good(self.checkpoint)}")
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < self.total_steps:
                    self.evaluate()

                self.checkpointer.poll()  # seal a checkpoint written in the background once it is
                stopping = stop.agreed()
                periodic = cfg.train.save_every and self.step % cfg.train.save_every == 0
                last = self.step == self.total_steps
                if stopping or periodic or last:
                    self.save(wait=stopping or last)
                if stopping:
                    if self.dist.is_main:
                        ahead = (" (the next step's data, prepared ahead, is discarded: the checkpoint holds the "
                                 "data position of the steps trained)") if self.loader.prepared_ahead else ""
                        log.warning("stopped at step %d by a signal; checkpoint saved%s (checkpoint.resume=auto "
                                    "continues from it)", self.step, ahead)
                    ended = "stopped"
                    return record
            record = {**record, **self.evaluate()}
            ended = "finished"
            return record
        finally:
            faults.enter("finishing")
            self.loader.close()  # waits for a step being prepared ahead: under the long bound of finishing
            self.checkpointer.close()
            if ended:
                self.metrics.log_answers(self.step, self.summary.answers)
            self.metrics.close()
            if ended:
                self.summary.write(ended, self.step, self.total_steps, int(self.counts[0]), self.checkpoint)
            if self.run_folder is not None:
                self.run_folder.release()

    def evaluate(self) -> dict:
        """Held-out loss (and task metrics) per dataset, and the loss change since step 0:
        on rehearsal data a rising `loss_change` is forgetting."""
        with faults.long_phase("eval", self.step):
            results, generations = self.evaluator.run(self.strategy, self.step)
        if results:
            self.metrics.log({"step": self.step, **results})
            self.metrics.log_generations(self.step, generations)
            self.summary.observe_eval(self.step, results)
            self.summary.observe_generations(generations)
        return results

    def step_record(self, result: dict, step_data: torch.Tensor, data_seconds: float, compute_seconds: float,
                    flops_token: float, device_peak) -> dict:
        real_tokens, row_tokens = float(step_data[0]), float(step_data[1])
        seconds = data_seconds + compute_seconds
        record = {
            "step": self.step,
            "loss": result["loss"],
            "lr": result["lr"],
            "grad_norm": result["grad_norm"],
            "skipped_steps": self.skipped_steps,  # steps whose update was dropped (non-finite loss or gradients)
            "tokens": result["targets"],
            "tokens_per_s": real_tokens / seconds,
            # real tokens over the positions computed (pad-free packed rows: ~1), and the padding computed
            "packing_efficiency": real_tokens / max(row_tokens, 1.0),
            "padding_tokens": int(row_tokens - real_tokens),
            "step_time_s": seconds,
            "data_wait_s": data_seconds,
            "compute_s": compute_seconds,
            # what checkpoints cost training since the previous record: a blocking save's whole
            # write, an asynchronous one's copy to host memory (and any wait for the write before)
            "checkpoint_wait_s": self.checkpointer.waited_s,
            "time": time.time(),
        }
        if self.cfg.data.packing:  # the packer's fill rate: real tokens over the rows' budget of data.seq_len each
            record["row_fill"] = real_tokens / (self.cfg.train.global_batch_size * self.cfg.data.seq_len)
        if device_peak:
            record["mfu"] = flops_token * real_tokens / self.dist.world_size / seconds / device_peak
        if "preference" in result:  # rewards/..., logps/..., loss/...; pairs (or KTO completions) per second
            record.update(result["preference"])
            record["pairs_per_s"] = record["pairs"] / seconds
        for i, name in enumerate(self.dataset_names):
            record[f"data/{name}/examples"] = int(self.counts[2 + 2 * i])
            record[f"data/{name}/tokens"] = int(self.counts[3 + 2 * i])
        for key, value in self.loader.stats.items():
            record[f"data/{key}"] = value
        record.update(memory_stats(self.dist.device))
        self.checkpointer.waited_s = 0.0
        return record


def train(cfg: Config, stop: StopSignal | None = None, debug: bool = False) -> dict:
    return Trainer(cfg, stop, debug).fit()
