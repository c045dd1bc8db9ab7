"""The eval sets a run declares (`data.eval`), what each reports, and the checks of their keys.

`data.eval` is either one file (`path`: the set "eval") or a `fraction` held out of each
training data set (one set per data set, under its name); `data.eval.sets` adds more, each
`{name, path, format, fields, metrics, forgetting, max_examples}`. What a set reports
follows from its format: every set but a choice set its held-out loss (and perplexity, or
accuracy and macro-F1 for classification); chat and instruction sets, with
`data.eval.generate`, the scores of greedy answers named in `metrics` (default
`data.eval.metrics`); choice sets `acc` and `acc_norm` (trainer/eval/multiple_choice.py).

A forgetting check is a set that should not get worse while the task trains: the held-out
part of every training data set but the primary one (rehearsal data), and every set marked
`forgetting: true` (margin `logging.forgetting_warn`) or `forgetting: <margin>`. Loss-scored
sets warn when their loss rises past the margin in nats over step 0, choice sets when their
accuracy drops by more than the margin (0.1 = ten points).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.config.schema import Config, dataset_name
from trainer.data.mixing import primary_index

# data.eval.metrics name -> the key it is logged under (eval/<set>/<key>); the first three
# keep the names they were logged under before the metrics became configurable.
GENERATION_METRICS = {"rouge_l": "rougeL", "exact_match": "exact_match", "token_f1": "f1", "bleu": "bleu",
                      "chrf": "chrf"}
CHOICE_METRICS = ("acc", "acc_norm")
GENERATED_FORMATS = ("chat", "instruction")


@dataclass(frozen=True)
class EvalSet:
    name: str
    key: str  # the config key it comes from (data.eval, data.eval.sets.N, data.datasets.N)
    path: str
    format: str
    fields: dict
    metrics: tuple[str, ...]  # config names: GENERATION_METRICS keys, or CHOICE_METRICS
    forgetting: bool
    margin: float | None  # forgetting: warn past it (None: never)
    max_examples: int
    held_out: bool = False  # a fraction of the training data set of this name

    @property
    def logged_metrics(self) -> tuple[str, ...]:
        """The eval/<set>/<key> keys of its task metrics."""
        return tuple(GENERATION_METRICS.get(m, m) for m in self.metrics)


def declared_sets(cfg: Config) -> list[EvalSet]:
    """Every eval set of the run, in the order they are evaluated."""
    e, warn = cfg.data.eval, cfg.logging.forgetting_warn
    metrics = tuple(e.metrics)
    sets = []
    if e.path:
        sets.append(EvalSet("eval", "data.eval", e.path, e.format, dict(e.fields),
                            CHOICE_METRICS if e.format == "choice" else metrics, False, None, e.max_examples))
    elif e.fraction and cfg.data.datasets:
        primary = primary_index([ds.weight for ds in cfg.data.datasets])
        for i, ds in enumerate(cfg.data.datasets):
            rehearsal = i != primary
            sets.append(EvalSet(dataset_name(ds), f"data.datasets.{i}", ds.path, ds.format, dict(ds.fields), metrics,
                                rehearsal, warn if rehearsal else None, e.max_examples, held_out=True))
    for i, s in enumerate(e.sets):
        default = CHOICE_METRICS if s.format == "choice" else metrics
        forgetting = s.forgetting is not False
        margin = warn if s.forgetting is True else (float(s.forgetting) if forgetting else None)
        sets.append(EvalSet(s.name or Path(s.path).stem, f"data.eval.sets.{i}", s.path, s.format, dict(s.fields),
                            tuple(s.metrics) if s.metrics is not None else default, forgetting, margin,
                            s.max_examples or e.max_examples))
    return sets


def forgetting_checks(cfg: Config) -> dict[str, float | None]:
    """{set name: its margin (None: tracked, never warned about)} of every forgetting check."""
    return {s.name: s.margin for s in declared_sets(cfg) if s.forgetting}


def eval_config_problems(cfg: Config) -> list[str]:
    """What is wrong with the data.eval keys together (each key's own range is the schema's), one
    message per problem, each starting with its key: the run plan's eval rules."""
    errors: list[str] = []
    e, task = cfg.data.eval, cfg.model.task

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    need(not (e.path and e.fraction), "data.eval: set path or fraction, not both")
    errors += _metric_problems("data.eval.metrics", e.metrics, "chat")
    files = [("data.eval", e.path, e.format, e.fields)] if e.path else []
    names = {"eval"} if e.path else {dataset_name(ds) for ds in cfg.data.datasets} if e.fraction else set()
    for i, s in enumerate(e.sets):
        key = f"data.eval.sets.{i}"
        need(bool(s.path), f"{key}.path: required")
        name = s.name or Path(s.path).stem
        need(name not in names, f"{key}.name: {name!r} is used by another eval set (names key the metrics)")
        need("/" not in name, f"{key}.name: {name!r}: no '/' in a set's name (it is part of eval/<set>/<metric>)")
        names.add(name)
        if s.metrics is not None:
            errors += _metric_problems(f"{key}.metrics", s.metrics, s.format)
            generated = [m for m in s.metrics if m in GENERATION_METRICS]
            need(not generated or e.generate > 0, f"{key}.metrics: {', '.join(map(str, generated))} "
                 f"score{'s' if len(generated) == 1 else ''} greedy answers; set data.eval.generate to the number "
                 "of prompts to answer")
        if s.path:
            files.append((key, s.path, s.format, s.fields))
    for key, path, fmt, fields in files:
        errors += format_problems(cfg, f"{key}.format", fmt)
    if e.generate:
        formats = [fmt for _, _, fmt, _ in files] + ([ds.format for ds in cfg.data.datasets] if e.fraction else [])
        if task != "causal_lm":
            errors.append(f"data.eval.generate: answers are generated by a causal LM, not by model.task {task}; "
                          "classification evals report accuracy and macro-F1 (set data.eval.generate=0)")
        elif not formats:
            errors.append("data.eval.generate: there is no held-out data to prompt; set data.eval.fraction or "
                          "data.eval.path")
        elif not set(GENERATED_FORMATS) & set(formats):
            errors.append(f"data.eval.generate: prompts come from chat or instruction eval data, "
                          f"but the eval data is {', '.join(sorted(set(formats)))}")
    return errors


def _metric_problems(key: str, metrics, fmt: str) -> list[str]:
    if not isinstance(metrics, list) or not metrics:
        return [f"{key}: a non-empty list, got {metrics!r}"]
    if fmt == "choice":
        known = CHOICE_METRICS
    elif fmt in GENERATED_FORMATS:
        known = tuple(GENERATION_METRICS)
    else:
        return [f"{key}: {fmt} sets are scored by their loss; metrics apply to chat, instruction (generated answers) "
                "and choice sets"]
    return [f"{key}: unknown metric {m!r} for {fmt} sets; known: {', '.join(known)}" for m in metrics if m not in known]


def format_problems(cfg: Config, key: str, fmt: str) -> list[str]:
    """A data format (of a training data set or an eval set) against the task and the tokenizer;
    `fields` are checked where the data is read (trainer.data.formats.field_names)."""
    task = cfg.model.task
    if fmt == "choice" and task != "causal_lm":
        return [f"{key}: choice sets are scored by a causal LM's likelihood of each choice, not by model.task {task}"]
    if task == "reward_model" and fmt != "preference":
        return [f"{key}: model.task reward_model trains and evaluates on pairs (format preference), not {fmt}"]
    if task == "sequence_classification" and fmt not in ("classification", "choice"):
        return [f"{key}: model.task sequence_classification needs format classification, got {fmt}"]
    if task != "sequence_classification" and fmt == "classification":
        return [f"{key}: classification data needs model.task: sequence_classification"]
    if fmt == "tokenized" and cfg.model.tokenizer == "train-bpe":
        return [f"{key}: tokenized data needs the tokenizer it was tokenized with (model.tokenizer or model.path), "
                "not train-bpe"]
    return []
