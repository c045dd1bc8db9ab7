"""The run report: `report.html` and its plots, from what a run folder holds.

Written at the end of every run and at a stop (by the run summary), and by `finetrain
report RUN_DIR` at any time, from `metrics.jsonl`, `summary.json`, `generations.jsonl` and
`config.yaml`, so it needs neither W&B nor a server: the page is plain HTML with PNG files
next to it (`report/*.png`, matplotlib), no script and nothing fetched from the network.

It shows the training curves (loss, learning rate, gradient norm, tokens/s, peak memory per
logged step; a preference run's rewards and reward accuracy), each eval set's loss and accuracy
(and the scores of generated answers, or a preference set's reward accuracy and margin) over
the steps, a forgetting check's margin drawn as a dashed line at its step-0 value plus (loss)
or minus (accuracy) the margin, the summary's first, best and last evaluations, and each
held-out question's answer at the first evaluation beside its answer at the last. A resumed run
drops the records its predecessor wrote past the checkpoint (reporting/metrics_log.py); should a
folder still hold a step twice (one written before that), the latest record of a step wins.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from trainer.config.schema import load_config
from trainer.data.eval_sets import forgetting_checks
from trainer.runtime.errors import UserError

PLOT_INCHES = (6.4, 3.2)
PLOT_DPI = 100  # 640 x 320 pixels
STEP_PLOTS = (("loss", "training loss", ("loss",)), ("lr", "learning rate", ("lr",)),
              ("grad_norm", "gradient norm (before clipping)", ("grad_norm",)),
              ("tokens_per_s", "tokens/s", ("tokens_per_s",)),
              # preference runs (docs/preference.md)
              ("rewards", "rewards of the chosen and rejected answers, and their margin",
               ("rewards/chosen", "rewards/rejected", "rewards/margins")),
              ("reward_accuracy", "reward accuracy (chosen rewarded above rejected)", ("rewards/accuracies",)))
PREFERENCE_EVAL_KEYS = ("rewards/accuracies", "rewards/margins")  # of preference eval sets
SCORE_KEYS = ("rougeL", "exact_match", "f1")  # 0-1 scores of generated answers
CORPUS_KEYS = ("bleu", "chrf")  # 0-100


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return rows


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, the latest record of each step (a resumed run logs again
    the steps after its checkpoint)."""
    by_step = {r["step"]: r[key] for r in records if isinstance(r.get(key), (int, float)) and "step" in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _margins(run_dir: Path) -> dict[str, float | None]:

    try:
        return forgetting_checks(load_config(run_dir / "config.yaml", check_files=False))
    except (UserError, OSError):
        return {}


class _Plots:
    """PNG files under `folder`, each recorded with its size in pixels."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.written: list[tuple[str, str, int, int]] = []  # (file name, title, width, height)

    def line(self, name: str, title: str, curves: dict[str, tuple[list, list]], ylabel: str = "",
             hline: tuple[float, str] | None = None) -> str | None:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        curves = {label: xy for label, xy in curves.items() if xy[0]}
        if not curves:
            return None
        fig = Figure(figsize=PLOT_INCHES, dpi=PLOT_DPI)
        fig.subplots_adjust(left=0.11, right=0.98, bottom=0.15, top=0.9)  # fixed: a layout engine costs 3x the plot
        ax = fig.subplots()
        for label, (steps, values) in curves.items():
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        if hline is not None:
            ax.axhline(hline[0], color="tab:red", linestyle="--", linewidth=1, label=hline[1])
        ax.set_title(title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(curves) > 1 or hline is not None:
            ax.legend(fontsize="small")
        file = f"{name}.png"
        fig.savefig(self.folder / file, dpi=PLOT_DPI, format="png")
        width, height = (round(v * PLOT_DPI) for v in PLOT_INCHES)
        self.written.append((file, title, width, height))
        return file


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write `report.html` (and `report/*.png`) into a run folder; returns its path."""
    run_dir = Path(run_dir)
    records = _read_jsonl(run_dir / "metrics.jsonl")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if not records and summary is None:
        raise UserError(f"{run_dir}: not a finetrain run folder (no metrics.jsonl or summary.json in it)")
    generations = _read_jsonl(run_dir / "generations.jsonl")
    margins = _margins(run_dir)
    folder = run_dir / "report"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):  # plots of an earlier report that this one may not draw
        old.unlink()
    plots = _Plots(folder)
    steps = [r for r in records if "loss" in r]
    sections = [("Training", [plots.line(name, title, {key: _series(steps, key) for key in keys})
                              for name, title, keys in STEP_PLOTS])]
    memory = sorted({k for r in steps for k in r if k.startswith("memory/")})
    sections[0][1].append(plots.line("memory", "peak memory (GiB)", {k.split("/", 1)[1]: _series(steps, k)
                                                                     for k in memory}))
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    for name in dict.fromkeys(k.split("/")[1] for r in evals for k in r if k.startswith("eval/")):
        sections.append((f"Eval set {name}", _eval_plots(plots, name, evals, margins.get(name, "absent"))))
    html_text = _page(run_dir, summary, sections, plots, generations, bool(evals))
    path = run_dir / "report.html"
    aside = run_dir / ".report.html.tmp"
    aside.write_text(html_text, encoding="utf-8")
    os.replace(aside, path)
    return path


def _eval_plots(plots: _Plots, name: str, evals: list[dict], margin) -> list[str | None]:
    """Loss, accuracy and answer scores of one eval set; a forgetting check's margin drawn."""
    key = f"eval/{name}/"
    out = []
    loss = _series(evals, key + "loss")
    if loss[0]:
        line = (loss[1][0] + margin, f"forgetting margin (+{margin:g})") if isinstance(margin, float) else None
        out.append(plots.line(f"eval-{name}-loss", f"{name}: eval loss", {"loss": loss}, hline=line))
    acc = {m: _series(evals, key + m) for m in ("acc", "acc_norm", "accuracy", "macro_f1")}
    if any(xy[0] for xy in acc.values()):
        first = acc["acc"][1][0] if acc["acc"][0] else None
        line = (first - margin, f"forgetting margin (-{margin:g})") \
            if isinstance(margin, float) and first is not None else None
        out.append(plots.line(f"eval-{name}-accuracy", f"{name}: accuracy", acc, hline=line))
    scores = {m: _series(evals, key + m) for m in SCORE_KEYS}
    out.append(plots.line(f"eval-{name}-answers", f"{name}: scores of generated answers", scores))
    corpus = {m: _series(evals, key + m) for m in CORPUS_KEYS}
    out.append(plots.line(f"eval-{name}-corpus", f"{name}: BLEU and chrF of generated answers (0-100)", corpus))
    rewards = {m: _series(evals, key + m) for m in PREFERENCE_EVAL_KEYS}
    out.append(plots.line(f"eval-{name}-rewards", f"{name}: reward accuracy and margin of held-out pairs", rewards))
    return out


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.5em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.plots { display: flex; flex-wrap: wrap; gap: 1em; } .note { color: #666; }
pre { background: #f8f8f8; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _page(run_dir: Path, summary: dict | None, sections, plots: _Plots, generations: list[dict],
          has_evals: bool) -> str:
    esc = html.escape
    sizes = {file: (width, height) for file, _, width, height in plots.written}
    titles = {file: title for file, title, _, _ in plots.written}
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>finetrain report: {esc(run_dir.name)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>finetrain report: {esc(str(run_dir))}</h1>"]
    if summary:
        parts.append(f"<p>{esc(summary['status'])} at step {summary['steps']}/{summary['total_steps']} in "
                     f"{summary['wall_time_s']:.1f} s: {summary['tokens']:,} tokens, "
                     f"{summary['tokens_per_s']:,.0f} tokens/s.</p>")
        parts.append(_summary_tables(summary))
    else:
        parts.append('<p class="note">No summary.json yet: the run has not ended or stopped.</p>')
    for title, files in sections:
        files = [f for f in files if f]
        if not files:
            continue
        parts.append(f"<h2>{esc(title)}</h2><div class=\"plots\">")
        for file in files:
            width, height = sizes[file]
            parts.append(f'<img src="report/{esc(file)}" width="{width}" height="{height}" alt="{esc(titles[file])}">')
        parts.append("</div>")
    if not has_evals:
        parts.append('<h2>Evaluation</h2><p class="note">This run has no evaluation (set data.eval.fraction, '
                     "data.eval.path or data.eval.sets).</p>")
    parts.append(_answers(generations))
    config = run_dir / "config.yaml"
    if config.is_file():
        parts.append(f"<h2>Config</h2><details><summary>config.yaml</summary><pre>{esc(config.read_text())}</pre>"
                     "</details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))


def _summary_tables(summary: dict) -> str:
    esc = html.escape
    rows = []
    for name, evals in summary.get("eval", {}).items():
        first, best, last = evals.get("first") or {}, evals.get("best") or {}, evals.get("last") or {}
        for metric, value in last.items():
            if metric == "step" or metric.endswith("_change") or not isinstance(value, (int, float)):
                continue
            rows.append(f"<tr><td>{esc(name)}</td><td>{esc(metric)}</td><td class=num>{_number(first.get(metric, ''))}"
                        f"</td><td class=num>{_number(value)}</td><td class=num>{_number(best.get(metric, ''))}"
                        f" (step {best.get('step', '')})</td></tr>")
    text = ""
    if rows:
        text += ("<h2>Evaluation: first, last and best</h2><table><tr><th>set</th><th>metric</th><th>first</th>"
                 "<th>last</th><th>at the best evaluation</th></tr>" + "".join(rows) + "</table>")
    forgetting = summary.get("forgetting") or {}
    if forgetting:
        text += "<h2>Forgetting</h2><table><tr><th>set</th><th>change since step 0</th><th>worst</th></tr>"
        for name, change in forgetting.items():
            if "acc_change" in change:
                now = f"accuracy {change['acc_before']:.4f} -> {change['acc']:.4f} ({change['acc_change']:+.4f})"
                worst = f"{change['min_acc_change']:+.4f} at step {change['min_at_step']}"
            else:
                now = f"loss {change['loss_change']:+.4f} nats"
                worst = f"{change['max_loss_change']:+.4f} at step {change['max_at_step']}"
            text += f"<tr><td>{esc(name)}</td><td>{esc(now)}</td><td>{esc(worst)}</td></tr>"
        text += "</table>"
    if summary.get("checkpoint"):
        text += (f"<p>Checkpoint: <code>{esc(summary['checkpoint'])}</code><br>Export: "
                 f"<code>{esc(summary['export_command'])}</code></p>")
    return text


def _answers(generations: list[dict]) -> str:
    """Each held-out question's answer at the first evaluation beside its answer at the last."""
    if not generations:
        return ""
    steps = sorted({g["step"] for g in generations})
    first = [g for g in generations if g["step"] == steps[0]]
    last = {(g["dataset"], g["prompt"]): g for g in generations if g["step"] == steps[-1]}
    esc = html.escape
    both = len(steps) > 1
    head = (f"<tr><th>set</th><th>question</th><th>reference</th><th>step {steps[0]}</th>"
            + (f"<th>step {steps[-1]}</th>" if both else "") + "</tr>")
    rows = []
    for g in first:
        later = last.get((g["dataset"], g["prompt"]))
        rows.append(f"<tr><td>{esc(g['dataset'])}</td><td>{esc(g.get('question', g['prompt']))}</td>"
                    f"<td>{esc(g['reference'])}</td><td>{esc(g['generation'])}</td>"
                    + (f"<td>{esc(later['generation']) if later else ''}</td>" if both else "") + "</tr>")
    return (f"<h2>Held-out answers, first and last evaluation</h2><table>{head}{''.join(rows)}</table>")
