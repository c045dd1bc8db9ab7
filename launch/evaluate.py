"""`finetrain eval MODEL --tasks ...`: lm-evaluation-harness on a finetrain checkpoint, a run
folder (its newest checkpoint) or a Hugging Face folder (a full model, or a peft adapter folder).

The model is rebuilt in each process as `finetrain export` rebuilds it: a peft checkpoint is
merged into the base weights in memory (`--no-merge`: base + adapter through peft). Tasks come
from local disk only (the harness runs with the Hugging Face hub and datasets offline):

- a finetrain `format: choice` data file (JSON Lines, JSON, Parquet, CSV, a `builtin:` choice set,
  or `hf:org/name[:config]:split` from the local Hugging Face cache; `--fields` maps MMLU-,
  HellaSwag- or ARC-shaped records as `data.eval.sets.N.fields` does) becomes a harness task of the same name as the file: the context as the prompt, each
  choice after the harness's default delimiter " ", scored with acc and acc_norm, which is
  how finetrain's own choice eval sets score it;
- a task YAML file of the harness (its folder is added to the include path);
- a task or group name: from the `--include-path` folders; without them, from the harness's
  own registry (whose data must then be in the local datasets cache).

`--nproc N` runs N local ranks under torch's elastic agent (one model per rank; the harness
splits the documents by rank and gathers the results on rank 0 over torch.distributed).
Rank 0 prints the harness's table and writes the results as JSON: for a checkpoint or run
folder `RUN/lm_eval/<checkpoint>.json`, for a Hugging Face folder `<folder>/lm_eval.json`
(`--out` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
from pathlib import Path

from launch.elastic import run_ranks
from trainer.checkpoint.layout import COMPLETE_MARK
from trainer.config.schema import HUB_DATA_PREFIX, cache_root, is_hub_id
from trainer.rank import setup_logging
from trainer.runtime.errors import DataError, UserError, report_user_error

log = logging.getLogger("finetrain")

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def add_eval_parser(sub) -> None:
    parser = sub.add_parser("eval", help="run lm-evaluation-harness tasks on a checkpoint, run folder or HF folder")
    add_eval_arguments(parser)
    parser.add_argument("--nproc", type=int, default=1, help="local ranks (documents are split among them)")
    parser.set_defaults(run=cmd_eval)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a checkpoint, a run folder (its newest checkpoint) or a Hugging Face folder")
    parser.add_argument("--tasks", required=True,
                        help="comma-separated: finetrain choice files, harness task YAML files, or task names")
    parser.add_argument("--include-path", action="append", default=[],
                        help="a folder of harness task YAML files; task names are looked up there (else in the "
                             "harness's registry)")
    parser.add_argument("--fields", default="",
                        help="field mapping of choice files, e.g. context=ctx,choices=endings,answer=label")
    parser.add_argument("--limit", type=int, help="evaluate the first N documents of each task")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per forward")
    parser.add_argument("--no-merge", action="store_true", help="peft checkpoints: evaluate base + adapter unmerged")
    parser.add_argument("--out", help="results JSON (default: RUN/lm_eval/<checkpoint>.json, or HF_DIR/lm_eval.json)")


def cmd_eval(args) -> int:
    """Check what can be checked in this process, then evaluate here or on N local ranks."""
    try:
        if args.nproc < 1:
            raise UserError(f"--nproc {args.nproc}: must be >= 1")
        resolve_model_path(Path(args.model))
        if _missing_packages():
            raise UserError("finetrain eval runs lm-evaluation-harness: pip install 'finetrain[eval]'")
    except UserError as err:
        return report_user_error(err)
    if args.nproc == 1:
        return run_eval(args)

    return run_ranks(rank_arguments(args), args.nproc, module="launch.evaluate")


def rank_arguments(args) -> list[str]:
    """The command line of `python -m launch.evaluate` for each rank."""
    argv = [args.model, "--tasks", args.tasks, "--batch-size", str(args.batch_size)]
    for path in args.include_path:
        argv += ["--include-path", path]
    for flag, value in (("--fields", args.fields), ("--limit", args.limit), ("--num-fewshot", args.num_fewshot),
                        ("--out", args.out)):
        if value not in (None, ""):
            argv += [flag, str(value)]
    return argv + (["--no-merge"] if args.no_merge else [])


def _missing_packages() -> list[str]:
    import importlib.util

    return ["lm-eval"] if importlib.util.find_spec("lm_eval") is None else []


# --------------------------------------------------------------------------- the model


def resolve_model_path(path: Path) -> tuple[str, Path]:
    """(kind, path): `checkpoint` (a complete checkpoint, or a run folder's newest), `adapter`
    (a peft adapter folder) or `hf` (a Hugging Face model folder)."""
    # here, not at the top: torch loads when the command runs, and the command line starts without it
    from trainer.checkpoint.export import newest_checkpoint

    if is_hub_id(str(path)):  # a hub id: its snapshot in the local Hugging Face cache
        # here, not at the top: torch loads when the command runs, and the command line starts without it
        from trainer.model.loading import resolve_model_path as resolve_hub_model

        path = Path(resolve_hub_model(str(path), weights=True, key="finetrain eval"))
    if not path.is_dir():
        raise UserError(f"{path}: not a folder (a checkpoint, a run folder, a Hugging Face folder or hub id)")
    if (path / COMPLETE_MARK).is_file() or (path / "config.yaml").is_file():
        return "checkpoint", newest_checkpoint(path)
    if (path / "adapter_config.json").is_file():
        return "adapter", path
    if (path / "config.json").is_file():
        return "hf", path
    raise UserError(f"{path}: neither a finetrain checkpoint or run folder (COMPLETE, config.yaml) nor a Hugging Face "
                    "folder (config.json, adapter_config.json)")


def load_model(path: Path, merge: bool, device):
    """(the model in eval mode on `device`, its tokenizer, where results go by default)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, path = resolve_model_path(path)
    if kind == "checkpoint":
        # here, not at the top: torch loads when the command runs, and the command line starts without it
        from trainer.checkpoint.export import trained_model

        model, tokenizer, cfg = trained_model(path, merge=merge)
        if cfg.model.task != "causal_lm":
            raise UserError(f"{path}: model.task {cfg.model.task}; the harness evaluates causal language models")
        run_dir = path.parent.parent if path.parent.name == cfg.checkpoint.dir.rstrip("/").split("/")[-1] else path
        default_out = run_dir / "lm_eval" / f"{path.name}.json"
    elif kind == "adapter":
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if merge:
            model = model.merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(path)
        default_out = path / "lm_eval.json"
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(path)
        default_out = path / "lm_eval.json"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = True  # generation tasks decode with the KV cache (training turns it off)
    return model.to(device).eval(), tokenizer, default_out


# --------------------------------------------------------------------------- the tasks


def _task_name(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_") or "choice_task"


def parse_fields(text: str) -> dict[str, str]:
    fields = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UserError(f"--fields: {item!r} is not finetrain_name=file_name (e.g. context=question)")
        fields[key] = value
    return fields


def choice_task(source: str, fields: dict, folder: Path, cache_dir: Path) -> str:
    """Write a finetrain choice file as a harness task (its questions as JSON Lines and a task
    YAML) into `folder`; returns the task's name."""
    import yaml

    # here, not at the top: torch loads when the command runs, and the command line starts without it
    from trainer.data.formats import choice_question, context_fallback_note
    from trainer.data.records import RowError, field_names
    from trainer.data.run_data import resolve_source
    from trainer.data.sources import location, read_rows

    path = resolve_source(source, "choice", "--tasks", cache_dir)
    names = field_names("choice", fields, "--fields")
    name = _task_name(Path(source.removeprefix("builtin:").removeprefix(HUB_DATA_PREFIX).replace(":", "_")).stem)
    rows = []
    for row in read_rows(path, cache_dir / "hf"):
        try:
            if row.error is not None:
                raise RowError(row.error)
            q = choice_question(row.record, names)
            if q.context_from != names["context"] and not rows:
                log.info("%s", context_fallback_note(source))
        except RowError as err:
            raise DataError(f"{location(source, row.number, row.by_line)}: {err}") from None
        rows.append({"context": q.context, "choices": list(q.choices), "answer": q.answer})
    if not rows:
        raise DataError(f"{source}: no question in it")
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context",
            "doc_to_choice": "choices", "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return name


def resolve_tasks(specs: list[str], include: list[str], fields: dict, folder: Path,
                  cache_dir: Path) -> tuple[list[str], list[str], bool]:
    """(task names, include paths, whether the harness's own registry is needed)."""
    names, paths, registry = [], [str(Path(p).resolve()) for p in include], False
    for p in paths:
        if not Path(p).is_dir():
            raise UserError(f"--include-path {p}: not a folder")
    for spec in specs:
        path = Path(spec)
        if spec.startswith(("builtin:", HUB_DATA_PREFIX)) or (path.suffix.lower() in DATA_SUFFIXES and path.is_file()):
            names.append(choice_task(spec, fields, folder, cache_dir))
            if str(folder.resolve()) not in paths:
                paths.append(str(folder.resolve()))
        elif path.suffix.lower() in (".yaml", ".yml"):
            if not path.is_file():
                raise UserError(f"--tasks {spec}: no such file")
            found = re.search(r"^task:\s*(\S+)", path.read_text(), re.MULTILINE)
            if not found:
                raise UserError(f"--tasks {spec}: a harness task YAML needs a `task:` name")
            names.append(found.group(1).strip("'\""))
            if str(path.parent.resolve()) not in paths:
                paths.append(str(path.parent.resolve()))
        elif path.suffix.lower() in DATA_SUFFIXES:
            raise UserError(f"--tasks {spec}: no such file")
        else:
            names.append(spec)
            registry = not include  # names from the include paths only, when there are some
    return names, paths, registry


# --------------------------------------------------------------------------- a rank


def _lm_class():
    import torch
    import torch.distributed as dist
    from lm_eval.models.huggingface import HFLM

    class RankedHFLM(HFLM):
        """The harness's HF model on a model built here, splitting documents over this
        process group's ranks (the harness's own multi-process path needs accelerate's
        launcher and loads the model itself)."""

        def __init__(self, model, tokenizer, rank: int, world_size: int, **kwargs):
            super().__init__(pretrained=model, tokenizer=tokenizer, **kwargs)
            self._rank, self._world_size = rank, world_size

        def all_gather(self, tensor):
            if self.world_size <= 1:
                return tensor
            parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(parts, tensor.contiguous())
            return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

        def barrier(self):
            if self.world_size > 1:
                dist.barrier()

    return RankedHFLM


def run_eval(args) -> int:
    """Evaluate on this rank (of WORLD_SIZE); rank 0 prints and writes the results."""
    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"  # tasks from local disk only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch.distributed as dist

    # here, not at the top: torch loads when the command runs, and the command line starts without it
    from trainer.runtime.distributed import init_distributed, shutdown

    dist_info, started_here = None, not dist.is_initialized()
    try:
        dist_info = init_distributed()
        model, tokenizer, default_out = load_model(Path(args.model), merge=not args.no_merge, device=dist_info.device)
        with tempfile.TemporaryDirectory(prefix="finetrain-eval-tasks-") as work:
            names, paths, registry = resolve_tasks([t for t in args.tasks.split(",") if t], args.include_path,
                                                   parse_fields(args.fields), Path(work), cache_root())
            results = _evaluate(model, tokenizer, dist_info, names, paths, registry, args)
    except UserError as err:
        return report_user_error(err)
    finally:
        if dist_info is not None and started_here:
            shutdown()
    if results is None:  # not rank 0
        return 0
    from lm_eval.utils import make_table

    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    out = Path(args.out) if args.out else default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = {k: v for k, v in results.items() if k not in ("samples",)}
    saved["finetrain"] = {"model": str(Path(args.model).resolve()), "merged": not args.no_merge,
                          "tasks": names, "world_size": dist_info.world_size}
    out.write_text(json.dumps(saved, indent=2, default=str) + "\n")
    print(f"results: {out}")
    return 0


def _evaluate(model, tokenizer, dist_info, names, paths, registry, args):
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    datasets.disable_progress_bars()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # its warnings about a model passed in built (it is built here on purpose, one per rank)
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    lm = _lm_class()(model, tokenizer, dist_info.rank, dist_info.world_size, batch_size=args.batch_size)
    manager = TaskManager(include_path=paths or None, include_defaults=registry)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        where = " and ".join(filter(None, [", ".join(paths) if paths else "", "the harness's registry" if registry else ""]))
        raise UserError(f"--tasks: no task {', '.join(unknown)} in {where or 'the include paths'} (a task YAML, "
                        "a choice data file, or a name from --include-path)")
    try:
        return simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=args.limit,
                               num_fewshot=args.num_fewshot, log_samples=False)
    except (FileNotFoundError, ConnectionError) as err:
        raise UserError(f"--tasks: a task's data is not on this machine and finetrain eval runs offline "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); pass a local task "
                        "YAML or a choice data file") from None


def main(argv: list[str] | None = None) -> int:
    """What each rank of `finetrain eval --nproc N` runs: `python -m launch.evaluate ...`."""

    parser = argparse.ArgumentParser(prog="python -m launch.evaluate")
    add_eval_arguments(parser)
    setup_logging()
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    # here, not at the top: torch loads when the command runs, and the command line starts without it
    from trainer.runtime.distributed import end_process

    end_process(main())
