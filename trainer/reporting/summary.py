"""What a run did, in `summary.json` and once on the console, at its end or at a stop.

Steps, wall time, tokens and tokens/s (over the time spent in optimizer steps, data
wait included, evaluation and checkpoints not), the first (step 0), best (lowest loss, or
highest accuracy for a choice set) and last evaluation of each dataset, forgetting (each
forgetting check's last and worst loss rise, or accuracy drop, since step 0, with its value
before and after), the held-out questions with their first and last greedy answers (the
base model's beside the fine-tuned one's), the newest checkpoint and the command that
exports it, and the run report (trainer/reporting/html_report.py, written here too). Wall time and the
evaluations carry over a resume through the checkpoint, so the summary of a resumed
run covers the whole run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from trainer.config.schema import Config
from trainer.data.eval_sets import forgetting_checks
from trainer.peft.methods import can_merge
from trainer.reporting.html_report import write_report
from trainer.runtime import restarts

log = logging.getLogger("finetrain")


def eval_by_dataset(results: dict) -> dict[str, dict]:
    """{dataset: {metric: value}} from eval/<dataset>/<metric> keys."""
    grouped: dict[str, dict] = {}
    for key, value in results.items():
        _, dataset, metric = key.split("/", 2)
        grouped.setdefault(dataset, {})[metric] = value
    return grouped


class RunSummary:
    """Collects what the summary reports as the run goes; its state rides in checkpoints."""

    def __init__(self, cfg: Config, is_main: bool):
        self.cfg = cfg
        self.is_main = is_main
        self.rehearsal = set(forgetting_checks(cfg))
        self.started = time.monotonic()
        self.seconds_before = 0.0  # wall time of the runs this one resumes
        self.step_seconds = 0.0  # in optimizer steps, over the whole run
        self.first: dict[str, dict] = {}
        self.best: dict[str, dict] = {}
        self.last: dict[str, dict] = {}
        self.forgetting: dict[str, dict] = {}
        self.answers: list[dict] = []  # per held-out question: its first and last generation

    def wall_time(self) -> float:
        return self.seconds_before + time.monotonic() - self.started

    def count_step(self, seconds: float) -> None:
        self.step_seconds += seconds

    def observe_eval(self, step: int, results: dict) -> None:
        for dataset, metrics in eval_by_dataset(results).items():
            record = {"step": step, **metrics}
            self.first.setdefault(dataset, record)
            self.last[dataset] = record
            if "loss" in metrics and metrics["loss"] <= self.best.get(dataset, {}).get("loss", float("inf")):
                self.best[dataset] = record
            elif "loss" not in metrics and "acc" in metrics and \
                    metrics["acc"] >= self.best.get(dataset, {}).get("acc", -1.0):
                self.best[dataset] = record
            if "loss_change" in metrics and dataset in self.rehearsal:
                change, previous = metrics["loss_change"], self.forgetting.get(dataset)
                largest = previous if previous and previous["max_loss_change"] >= change else \
                    {"max_loss_change": change, "max_at_step": step}
                self.forgetting[dataset] = {"loss_change": change, "max_loss_change": largest["max_loss_change"],
                                            "max_at_step": largest["max_at_step"]}
            elif "acc_change" in metrics and dataset in self.rehearsal:
                change, previous = metrics["acc_change"], self.forgetting.get(dataset)
                worst = previous if previous and previous["min_acc_change"] <= change else \
                    {"min_acc_change": change, "min_at_step": step}
                self.forgetting[dataset] = {"acc_before": self.first[dataset]["acc"], "acc": metrics["acc"],
                                            "acc_change": change, "min_acc_change": worst["min_acc_change"],
                                            "min_at_step": worst["min_at_step"]}

    def observe_generations(self, rows: list[dict]) -> None:
        """Keep each question's first answer (the model before training, when the run starts
        at step 0) and its latest."""
        if not self.answers:
            self.answers = [{"dataset": row["dataset"], "question": row["question"], "reference": row["reference"],
                             "first": {"step": row["step"], "answer": row["generation"]}} for row in rows]
        for kept, row in zip(self.answers, rows):
            kept["last"] = {"step": row["step"], "answer": row["generation"]}

    def state_dict(self) -> dict:
        return {"wall_time_s": self.wall_time(), "step_time_s": self.step_seconds, "first": self.first,
                "best": self.best, "last": self.last, "forgetting": self.forgetting, "answers": self.answers}

    def load_state_dict(self, state: dict) -> None:
        self.seconds_before, self.step_seconds = state["wall_time_s"], state["step_time_s"]
        self.first, self.best, self.last = state["first"], state["best"], state["last"]
        self.forgetting, self.answers = state["forgetting"], state["answers"]

    def write(self, status: str, step: int, total_steps: int, tokens: int, checkpoint: Path | None) -> dict:
        """Write summary.json and print the summary (rank 0); returns it."""
        seconds = self.wall_time()
        restart_count, recomputed = restarts.restart_totals(restarts.read(self.cfg.output_dir))
        export = None
        if checkpoint is not None:
            merge = " --merge" if can_merge(self.cfg.peft.method) else ""
            export = f"finetrain export {checkpoint} --out {self.cfg.output_dir / 'export'}{merge}"
        summary = {
            "status": status,
            "steps": step,
            "total_steps": total_steps,
            "wall_time_s": round(seconds, 3),
            "step_time_s": round(self.step_seconds, 3),
            "tokens": tokens,
            "tokens_per_s": tokens / self.step_seconds if self.step_seconds > 0 else 0.0,
            "restarts": restart_count,  # of the worker group after a failure, and the steps they made it do again
            "steps_recomputed": recomputed,
            "eval": {name: {"first": self.first.get(name), "best": self.best.get(name), "last": last}
                     for name, last in self.last.items()},
            "forgetting": self.forgetting,
            "answers": self.answers,
            "checkpoint": str(checkpoint) if checkpoint is not None else None,
            "export_command": export,
            "report": str(self.cfg.output_dir / "report.html"),
        }
        if self.is_main:
            path = self.cfg.output_dir / "summary.json"
            aside = path.with_name(".summary.json.tmp")
            aside.write_text(json.dumps(summary, indent=2) + "\n")
            os.replace(aside, path)
            try:
                write_report(self.cfg.output_dir)
            except Exception as err:  # the run's results are saved; a report that fails must not hide them
                log.warning("report.html not written (%s: %s); `finetrain report %s` tries again",
                            type(err).__name__, err, self.cfg.output_dir)
                summary["report"] = None
            print(format_summary(summary, path), flush=True)
        return summary


def format_summary(summary: dict, path: Path) -> str:
    """The summary as a person reads it at a glance: each eval metric from step 0 to the end,
    forgetting, the held-out answers before and after, and where the results are."""
    lines = [f"finetrain {summary['status']} at step {summary['steps']}/{summary['total_steps']} in "
             f"{summary['wall_time_s']:.1f}s: {summary['tokens']:,} tokens, {summary['tokens_per_s']:,.0f} tokens/s"
             + (f"; {summary['restarts']} restart(s), {summary['steps_recomputed']} step(s) done again"
                if summary.get("restarts") else "")]
    width = max((len(name) for name in summary["eval"]), default=0)
    for name, evals in summary["eval"].items():
        first, last, best = evals["first"] or evals["last"], evals["last"], evals["best"]
        changes = [f"{k} {first[k]:.4g} -> {v:.4g}" if k in first and first["step"] != last["step"] else f"{k} {v:.4g}"
                   for k, v in last.items() if isinstance(v, (int, float)) and k != "step" and not k.endswith("_change")]
        span = f" (step {first['step']} -> {last['step']})" if first["step"] != last["step"] else f" (step {last['step']})"
        best_text = ""
        if best and best is not last and best["step"] != last["step"]:
            key = "loss" if "loss" in best else "acc"
            best_text = f"; best {key} {best[key]:.4f} at step {best['step']}"
        lines.append(f"  eval {name:<{width}}  " + ", ".join(changes) + span + best_text)
    for name, change in summary["forgetting"].items():
        if "acc_change" in change:
            lines.append(f"  forgetting {name}: accuracy {change['acc_before']:.4f} -> {change['acc']:.4f}, "
                         f"{change['acc_change']:+.4f} since step 0 (lowest {change['min_acc_change']:+.4f} at step "
                         f"{change['min_at_step']})")
            continue
        lines.append(f"  forgetting {name}: loss change {change['loss_change']:+.4f} nats since step 0 "
                     f"(largest {change['max_loss_change']:+.4f} at step {change['max_at_step']})")
    answers = [a for a in summary.get("answers", []) if "last" in a]
    if answers:
        first_step, last_step = answers[0]["first"]["step"], answers[0]["last"]["step"]
        lines.append(f"  held-out questions, greedy answers at step {first_step} and at step {last_step}:")
        # step 0 answers come from the model as loaded: the base model
        labels = {"reference": "reference", "first": "base (step 0)" if first_step == 0 else f"step {first_step}",
                  "last": f"tuned (step {last_step})"}
        shown = ("reference", "first", "last") if last_step != first_step else ("reference", "first")
        width = max(len(labels[k]) for k in shown) + 1
        for number, answer in enumerate(answers, 1):
            lines.append(f"  {number}. [{answer['dataset']}] {_one_line(answer['question'])}")
            for k in shown:
                text = answer["reference"] if k == "reference" else answer[k]["answer"]
                lines.append(f"       {labels[k] + ':':<{width}} {_one_line(text)}")
    if summary["checkpoint"]:
        lines.append(f"  checkpoint: {summary['checkpoint']}")
        lines.append(f"  export:     {summary['export_command']}")
    lines.append(f"  summary:    {path}")
    if summary.get("report"):
        lines.append(f"  report:     {summary['report']}")
    return "\n".join(lines)


def _one_line(text: str, limit: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
