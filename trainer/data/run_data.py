"""The run's data, loaded once: every data set mapped from the tokenization cache (tokenized
first on a miss, once per node), `data.overlong` applied (text documents are split across
rows instead: continued pretraining loses nothing), the held-out examples set aside, and the
eval sets read from files of their own; shared by training, evaluation and generation."""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from trainer.config.schema import Config, DatasetConfig, cache_root, dataset_name
from trainer.data.builtin import builtin_format, is_builtin, materialize
from trainer.data.eval_sets import declared_sets
from trainer.data.formats import record_texts
from trainer.data.mixing import RandomPermutation
from trainer.data.preference_rows import trains_after_cut
from trainer.data.prepare import EncodingSpec, load_tokenized
from trainer.data.records import field_names
from trainer.data.hub_datasets import hub_data_files, is_hub_data
from trainer.data.sources import Source, read_rows
from trainer.data.stream import ExampleSet, GlobalStream, StreamDataset
from trainer.data.tokenized import TokenizedDataset
from trainer.runtime.distributed import local_world_size, on_node_leaders
from trainer.runtime.errors import ConfigError, DataError

log = logging.getLogger("finetrain")


def resolve_source(path: str, fmt: str, key: str, cache_dir: Path) -> Source:
    """A data file or folder; a builtin data set is built into the cache first; a hub data set
    (`hf:org/name...`) is the files of its split in the local Hugging Face cache."""
    if is_hub_data(path):
        return hub_data_files(path, key, cache_dir / "hf")
    if not is_builtin(path):
        return Path(path)
    try:
        native = builtin_format(path)
    except ValueError as err:
        raise ConfigError(f"{key}.path: {err}") from None
    if fmt != native:
        raise ConfigError(f"{key}.format: {path} is {native} data; set format: {native}")
    return materialize(path, cache_dir)


@dataclass
class _Source:
    """One configured data set, tokenized."""

    name: str
    data: TokenizedDataset
    weight: float


def _load_sources(cfg: Config, tokenizer, entries: list[tuple[str, str, DatasetConfig]], report: bool = True,
                  workers: int | None = None, progress: bool | None = None) -> list[_Source]:
    """The tokenized data sets, memory-mapped. On a cache miss the first rank of each node
    tokenizes them (with `workers` processes; by default one per local rank, since those
    ranks wait meanwhile) and every rank then maps the arrays; a bad row or a config
    mistake found while tokenizing is raised on every rank."""
    cache_dir = cache_root(cfg)
    workers = local_world_size() if workers is None else workers
    progress = cfg.logging.progress_bar if progress is None else progress

    def load(name: str, key: str, ds: DatasetConfig, **tokenizing) -> TokenizedDataset:
        path = resolve_source(ds.path, ds.format, key, cache_dir)
        spec = EncodingSpec(ds.format, field_names(ds.format, ds.fields, f"{key}.fields"), cfg.data.train_on_prompt,
                            tokenizer, tuple(ds.train_on))
        return load_tokenized(path, ds.path, spec, cfg.data.on_bad_row, cache_dir, **tokenizing)

    def fill_cache() -> None:
        for entry in entries:
            load(*entry, workers=workers, progress=progress)

    on_node_leaders(fill_cache, shared_errors=(DataError, ConfigError))
    sources = []
    for entry in entries:
        data = load(*entry)
        name, _, ds = entry
        if data.skipped and report:
            log.warning("%s: skipped %d bad rows (data.on_bad_row=skip); first: %s", ds.path, data.skipped,
                        "; ".join(data.skipped_where[:3]))
        sources.append(_Source(name, data, ds.weight))
    return sources


def _class_of_label(sources: list[_Source], num_labels: int) -> dict[str, np.ndarray]:
    """Per data set, the class id of each of its distinct labels. Integer labels are ids;
    class names (strings) get ids in the sorted order of all names in the run's data, e.g.
    neg -> 0, pos -> 1."""
    names = sorted({label for s in sources for label in s.data.label_values if isinstance(label, str)})
    if names and len(names) > num_labels:
        raise ConfigError(f"model.num_labels: {num_labels}, but the data has {len(names)} classes: {', '.join(names)}")
    mapping = {label: i for i, label in enumerate(names)}
    if names:
        log.info("class names -> label ids: %s", ", ".join(f"{k}={v}" for k, v in mapping.items()))
    ids = {}
    for s in sources:
        out = np.empty(len(s.data.label_values), dtype=np.int64)
        problems = []  # (first example with the label, what is wrong)
        for j, label in enumerate(s.data.label_values):
            if isinstance(label, str) != bool(names):
                kind = ("a class name", "integers") if isinstance(label, str) else ("an integer", "class names")
                problem = f"label {label!r} is {kind[0]}, but other labels are {kind[1]}"
            elif isinstance(label, str):
                out[j], problem = mapping[label], None
            elif 0 <= label < num_labels:
                out[j], problem = label, None
            else:
                problem = f"label {label} is not in [0, {num_labels}) (model.num_labels)"
            if problem:
                problems.append((int(s.data.examples_with_label(j)[0]), problem))
        if problems:
            example, problem = min(problems)
            raise DataError(f"{s.data.where(example)}: {problem}")
        ids[s.name] = out
    return ids


def _usable(source: _Source, cfg: Config, stats: dict, report: bool = True) -> ExampleSet:
    """Examples that go into the stream, after `data.overlong`: over-long examples are
    truncated (`StreamDataset.length`) or dropped, and one truncated to no target at all is
    dropped. Text is split across rows instead."""
    data, seq_len, policy = source.data, cfg.data.seq_len, cfg.data.overlong
    stats[f"{source.name}/bad_rows_skipped"] = data.skipped
    if data.format == "text":
        over = np.empty(0, dtype=np.int64)
    else:
        over = np.concatenate([start + np.flatnonzero(lengths > seq_len) for start, lengths in data.length_blocks()])
    if len(over) and policy == "error":
        i = int(over[0])
        raise DataError(f"{data.where(i)}: example of {data.length(i)} tokens is longer than data.seq_len {seq_len} "
                        f"({len(over)} such examples; set data.overlong=truncate or drop)")
    dropped = [int(i) for i in over if policy == "drop" or
               (data.format != "classification" and not trains_after_cut(data, int(i), seq_len))]
    truncated = len(over) - len(dropped)
    if len(over) and report:
        log.warning("%s: %d examples longer than data.seq_len %d: %d truncated, %d dropped (data.overlong=%s)",
                    data.source, len(over), seq_len, truncated, len(dropped), policy)
    stats[f"{source.name}/overlong_truncated"] = truncated
    stats[f"{source.name}/overlong_dropped"] = len(dropped)
    return ExampleSet(len(data), dropped)


def _held_out(examples: ExampleSet, name: str, cfg: Config) -> np.ndarray:
    """The held-out example ids: a seeded random `data.eval.fraction` of each data set (at
    most `data.eval.max_examples`)."""
    fraction = 0.0 if cfg.data.eval.path else cfg.data.eval.fraction
    count = min(int(round(fraction * len(examples))), cfg.data.eval.max_examples) if fraction else 0
    if fraction and count == 0:
        count = 1
    if count >= len(examples):
        raise ConfigError(f"data.eval.fraction: {fraction} of data set {name!r} ({len(examples)} examples) "
                          "leaves nothing to train on")
    order = RandomPermutation(len(examples), [cfg.run.seed, zlib.crc32(name.encode()), 0xE7A1])
    return np.sort(np.asarray([examples[order[k]] for k in range(count)], dtype=np.int64))


def _prompt_twins(data: TokenizedDataset, held_out: np.ndarray) -> np.ndarray:
    """Examples other than the held-out ones that share a held-out example's prompt (a
    question asked again, a duplicated row): trained on, they would leak the evaluation's
    questions, and often its answers, into training."""
    if not len(held_out):
        return held_out
    keys = np.unique(np.asarray(data.prompt_keys[held_out]))
    return np.setdiff1d(data.examples_with_prompt_keys(keys), held_out)


def _entries(cfg: Config) -> list[tuple[str, str, DatasetConfig]]:
    return [(dataset_name(ds), f"data.datasets.{i}", ds) for i, ds in enumerate(cfg.data.datasets)]


def _eval_file_entries(cfg: Config) -> list[tuple[str, str, DatasetConfig]]:
    """The eval sets read from files of their own (`data.eval.path`, `data.eval.sets`), but
    choice sets (trainer/eval/multiple_choice.py reads those)."""
    return [(s.name, s.key, DatasetConfig(name=s.name, path=s.path, format=s.format, fields=s.fields))
            for s in declared_sets(cfg) if not s.held_out and s.format != "choice"]


@dataclass
class RunData:
    """The run's data, tokenized, checked and split once, then shared by training, evaluation
    and generation: the training data sets (over-long, held-out and prompt-twin examples
    excluded), their weights, the load-time counters, and the evaluation sets scored by their
    loss (the held-out fraction of each training data set, or `data.eval.path` as the set "eval",
    then the `data.eval.sets` but choice sets), each with its config key and data set config."""

    train: list[StreamDataset]
    weights: list[float]
    stats: dict
    evaluation: list[tuple[str, DatasetConfig, StreamDataset]]

    @classmethod
    def load(cls, cfg: Config, tokenizer, report: bool = True, workers: int | None = None,
             progress: bool | None = None) -> "RunData":
        """Warnings about the data are logged when `report` (once per run)."""
        entries = _entries(cfg) + _eval_file_entries(cfg)
        sources = _load_sources(cfg, tokenizer, entries, report, workers, progress)
        # Class names get their ids over every data set of the run, evaluation included.
        classes = _class_of_label(sources, cfg.model.num_labels) if cfg.model.task == "sequence_classification" else {}
        train_sources, eval_sources = sources[:len(cfg.data.datasets)], sources[len(cfg.data.datasets):]
        stats: dict = {}
        train, evaluation = [], []
        for (_, key, ds_cfg), s in zip(entries, train_sources):
            usable = _usable(s, cfg, stats, report)
            if len(usable) == 0:
                raise DataError(f"{s.data.source}: no example fits data.seq_len {cfg.data.seq_len} "
                                f"(data.overlong={cfg.data.overlong})")
            held_out = _held_out(usable, s.name, cfg)
            twins = _prompt_twins(s.data, held_out)
            kept = ExampleSet(len(s.data), np.concatenate([usable.excluded, held_out, twins]))
            if len(kept) == 0:
                raise DataError(f"{s.data.source}: every example shares its prompt with a held-out one; "
                                "nothing is left to train on (lower data.eval.fraction)")
            stats[f"{s.name}/held_out_prompt_twins"] = len(np.setdiff1d(twins, usable.excluded))
            if report and stats[f"{s.name}/held_out_prompt_twins"]:
                log.info("%s: %d training examples share a prompt with a held-out example and are left out of "
                         "training", s.name, stats[f"{s.name}/held_out_prompt_twins"])
            splittable = s.data.format == "text"
            train.append(StreamDataset(s.name, s.data, kept, cfg.data.seq_len, splittable, classes.get(s.name)))
            if len(held_out):
                evaluation.append((key, ds_cfg, StreamDataset(s.name, s.data, held_out, cfg.data.seq_len, splittable,
                                                              classes.get(s.name))))
        limits = {s.name: s.max_examples for s in declared_sets(cfg)}
        for (_, key, ds_cfg), s in zip(entries[len(train_sources):], eval_sources):
            usable = _usable(s, cfg, {}, report)
            examples = np.asarray([usable[k] for k in range(min(len(usable), limits[s.name]))], dtype=np.int64)
            evaluation.append((key, ds_cfg, StreamDataset(s.name, s.data, examples, cfg.data.seq_len,
                                                          s.data.format == "text", classes.get(s.name))))
        return cls(train, [s.weight for s in train_sources], stats, evaluation)

    def stream(self, cfg: Config) -> GlobalStream:
        return GlobalStream(self.train, self.weights, cfg.data.mix_by, cfg.data.seq_len, cfg.data.packing, cfg.run.seed)


def prepare_data(cfg: Config, tokenizer, workers: int, progress: bool = True) -> dict[str, TokenizedDataset]:
    """Tokenize every training data set and `data.eval.path` into the cache (what a run
    would, ahead of it), with `workers` processes, and count the rows of an epoch when
    the run is set in epochs; returns the data sets by name."""
    data = RunData.load(cfg, tokenizer, report=False, workers=workers, progress=progress)
    if cfg.train.epochs is not None:
        log.info("one epoch: %d rows", data.stream(cfg).epoch_rows(cache_root(cfg)))
    return {ds.name: ds.data for ds in data.train} | {ds.name: ds.data for _, _, ds in data.evaluation}


def training_texts(cfg: Config) -> Iterator[str]:
    """The free text of every training record (bad rows skipped here; they are reported
    when the data is tokenized), to train a tokenizer on."""
    cache_dir = cache_root(cfg)
    for name, key, ds in _entries(cfg):
        path = resolve_source(ds.path, ds.format, key, cache_dir)
        names = field_names(ds.format, ds.fields, f"{key}.fields")
        try:
            for row in read_rows(path, cache_dir / "hf"):
                if row.record is not None:
                    yield from record_texts(ds.format, row.record, names)
        except DataError:
            continue
