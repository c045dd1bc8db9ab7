"""The training loader and the evaluation sets, built from the config.

`build_train_loader` tokenizes (or loads from the cache) every data set, applies
`data.overlong` (text documents are split across rows instead: continued pretraining
loses nothing), sets the held-out examples aside, and wraps the global row stream in
a `TrainLoader` that hands each rank its rows of every optimizer step: of the
`global_batch_size` rows of a step, rank r takes the r-th contiguous block of
`micro_batch_size x num_micro_batches` rows.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from trainer.config import Config, ConfigError, DatasetConfig, UserError, cache_root, dataset_name
from trainer.data.builtin import builtin_format, is_builtin, materialize
from trainer.data.collate import Batch, Collator
from trainer.data.formats import build_encoder, field_names, record_texts
from trainer.data.packing import pack_pieces
from trainer.data.sources import DataError, read_rows
from trainer.data.stream import GlobalStream, StreamDataset
from trainer.data.tokenized import TokenizedDataset, load_tokenized
from trainer.distributed import main_first

log = logging.getLogger("finetrain")

STATE_VERSION = 1


def resolve_source(path: str, fmt: str, key: str, cache_dir: Path) -> Path:
    """A data file or folder; a builtin data set is built into the cache first."""
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


def _tokenize_all(cfg: Config, tokenizer, rank: int, entries: list[tuple[str, str, DatasetConfig]],
                  report: bool = True) -> list[_Source]:
    """Tokenize (or load cached) data sets; rank 0 fills the cache before the others read it."""
    cache_dir = cache_root(cfg)

    def load_all() -> list[_Source]:
        sources = []
        for name, key, ds in entries:
            path = resolve_source(ds.path, ds.format, key, cache_dir)
            names = field_names(ds.format, ds.fields, f"{key}.fields")
            data = load_tokenized(path, ds.path, ds.format, names, tokenizer, cfg.data.train_on_prompt,
                                  cfg.data.on_bad_row, cache_dir)
            if data.skipped and report:
                log.warning("%s: skipped %d bad rows (data.on_bad_row=skip); first: %s", ds.path, data.skipped,
                            "; ".join(data.skipped_where[:3]))
            sources.append(_Source(name, data, ds.weight))
        return sources

    return main_first(load_all)


def _class_ids(sources: list[_Source], num_labels: int) -> dict[str, np.ndarray]:
    """Label ids per data set. Integer labels are ids; class names (strings) get ids in the
    sorted order of all names in the run's data, e.g. neg -> 0, pos -> 1."""
    names = sorted({label for s in sources for label in s.data.labels if isinstance(label, str)})
    if names and len(names) > num_labels:
        raise ConfigError(f"model.num_labels: {num_labels}, but the data has {len(names)} classes: {', '.join(names)}")
    mapping = {label: i for i, label in enumerate(names)}
    if names:
        log.info("class names -> label ids: %s", ", ".join(f"{k}={v}" for k, v in mapping.items()))
    ids = {}
    for s in sources:
        out = np.empty(len(s.data), dtype=np.int64)
        for i, label in enumerate(s.data.labels):
            if isinstance(label, str) != bool(names):
                kind = ("a class name", "integers") if isinstance(label, str) else ("an integer", "class names")
                raise DataError(f"{s.data.where(i)}: label {label!r} is {kind[0]}, but other labels are {kind[1]}")
            if isinstance(label, str):
                out[i] = mapping[label]
            elif 0 <= label < num_labels:
                out[i] = label
            else:
                raise DataError(f"{s.data.where(i)}: label {label} is not in [0, {num_labels}) (model.num_labels)")
        ids[s.name] = out
    return ids


def _usable(source: _Source, cfg: Config, stats: dict, report: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Examples that go into the stream and their lengths, after `data.overlong`. Text is
    split across rows instead; a truncated example left without targets is dropped."""
    data, seq_len = source.data, cfg.data.seq_len
    lengths = data.lengths.copy()
    if data.format == "text":
        return np.arange(len(data)), lengths
    over = np.flatnonzero(lengths > seq_len)
    keep = np.ones(len(data), dtype=bool)
    policy = cfg.data.overlong
    if len(over) and policy == "error":
        i = int(over[0])
        raise DataError(f"{data.where(i)}: example of {lengths[i]} tokens is longer than data.seq_len {seq_len} "
                        f"({len(over)} such examples; set data.overlong=truncate or drop)")
    truncated = dropped = 0
    for i in over:
        if policy == "drop" or (data.format != "classification" and not data.example_targets(i)[1:seq_len].any()):
            keep[i] = False
            dropped += 1
        else:
            lengths[i] = seq_len
            truncated += 1
    if len(over) and report:
        log.warning("%s: %d examples longer than data.seq_len %d: %d truncated, %d dropped (data.overlong=%s)",
                    data.source, len(over), seq_len, truncated, dropped, policy)
    stats[f"{source.name}/overlong_truncated"] = truncated
    stats[f"{source.name}/overlong_dropped"] = dropped
    stats[f"{source.name}/bad_rows_skipped"] = data.skipped
    return np.flatnonzero(keep), lengths


def _held_out(examples: np.ndarray, name: str, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) examples: a seeded random `data.eval.fraction` of each data set."""
    fraction = 0.0 if cfg.data.eval.path else cfg.data.eval.fraction
    count = min(int(round(fraction * len(examples))), cfg.data.eval.max_examples) if fraction else 0
    if fraction and count == 0:
        count = 1
    if count >= len(examples):
        raise ConfigError(f"data.eval.fraction: {fraction} of data set {name!r} ({len(examples)} examples) "
                         "leaves nothing to train on")
    rng = np.random.default_rng([cfg.run.seed, zlib.crc32(name.encode()), 0xE7A1])
    chosen = np.zeros(len(examples), dtype=bool)
    chosen[rng.permutation(len(examples))[:count]] = True
    return examples[~chosen], examples[chosen]


def _entries(cfg: Config) -> list[tuple[str, str, DatasetConfig]]:
    return [(dataset_name(ds), f"data.datasets.{i}", ds) for i, ds in enumerate(cfg.data.datasets)]


def _prepare(cfg: Config, tokenizer, rank: int, report: bool = True
             ) -> tuple[list[StreamDataset], list[np.ndarray], list[float], dict]:
    """Training data sets, their held-out examples, weights and load-time counters
    (warnings about the data are logged when `report`, i.e. once per run)."""
    sources = _tokenize_all(cfg, tokenizer, rank, _entries(cfg), report)
    classes = _class_ids(sources, cfg.model.num_labels) if cfg.model.task == "sequence_classification" else {}
    stats: dict = {}
    train, held = [], []
    for s in sources:
        examples, lengths = _usable(s, cfg, stats, report)
        if len(examples) == 0:
            raise DataError(f"{s.data.source}: no example fits data.seq_len {cfg.data.seq_len} "
                            f"(data.overlong={cfg.data.overlong})")
        kept, held_out = _held_out(examples, s.name, cfg)
        train.append(StreamDataset(s.name, s.data, kept, lengths, s.data.format == "text", classes.get(s.name)))
        held.append(held_out)
    return train, held, [s.weight for s in sources], stats


def _pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("model.tokenizer: has neither a pad nor an eos token to pad rows with")
    return pad


def _check_packing(cfg: Config) -> None:
    if cfg.data.packing and cfg.peft.method == "prompt_tuning":
        raise ConfigError("data.packing: prompt tuning prepends its virtual tokens to each row and drops position_ids, "
                         "so packed documents would attend to each other; set data.packing=false")


def _collator(cfg: Config, datasets: list[StreamDataset], tokenizer, attention: str) -> Collator:
    return Collator(datasets, cfg.model.task, cfg.data.seq_len, cfg.data.packing, attention, _pad_token_id(tokenizer),
                    mask_dtype=getattr(torch, cfg.model.dtype),
                    position_ids=cfg.peft.method != "prompt_tuning")


class TrainLoader:
    """This rank's micro-batches of each optimizer step, from the global row stream."""

    def __init__(self, stream: GlobalStream, collator: Collator, micro_batch_size: int, global_batch_size: int,
                 rank: int, world_size: int, load_stats: dict):
        self.stream = stream
        self.collator = collator
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.rank = rank
        self.world_size = world_size
        self.load_stats = load_stats
        self._epoch_rows: int | None = None

    def next_step(self, num_micro_batches: int) -> list[Batch]:
        per_rank = self.micro_batch_size * num_micro_batches
        rows = [self.stream.next_row() for _ in range(per_rank * self.world_size)]
        mine = rows[self.rank * per_rank: (self.rank + 1) * per_rank]
        return [self.collator(mine[i: i + self.micro_batch_size]) for i in range(0, per_rank, self.micro_batch_size)]

    def steps_per_epoch(self) -> float:
        """Optimizer steps of one epoch: one pass over the primary data set (the largest
        weight), with the other data sets mixed in at their weights."""
        if self._epoch_rows is None:
            self._epoch_rows = self.stream.epoch_rows()
        return self._epoch_rows / self.global_batch_size

    @property
    def dataset_examples(self) -> dict[str, int]:
        """Training examples of each data set (held-out ones excluded)."""
        return {ds.name: len(ds.examples) for ds in self.stream.datasets}

    @property
    def stats(self) -> dict:
        """Counters for the metrics: over-long and bad rows per data set (at load) and the
        epochs drawn of each data set so far."""
        epochs = {f"{name}/epoch": round(value, 4) for name, value in self.stream.epochs.items()}
        return {**self.load_stats, **epochs}

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(f"data loader state version {state.get('version')}, expected {STATE_VERSION}")
        self.stream.load_state_dict(state["stream"])


def build_train_loader(cfg: Config, tokenizer, attention: str, rank: int, world_size: int) -> TrainLoader:
    _check_packing(cfg)
    datasets, _, weights, stats = _prepare(cfg, tokenizer, rank, report=rank == 0)
    stream = GlobalStream(datasets, weights, cfg.data.mix_by, cfg.data.seq_len, cfg.data.packing, cfg.run.seed)
    return TrainLoader(stream, _collator(cfg, datasets, tokenizer, attention), cfg.train.micro_batch_size,
                       cfg.train.global_batch_size, rank, world_size, stats)


def _eval_datasets(cfg: Config, tokenizer, rank: int) -> list[tuple[str, DatasetConfig, StreamDataset]]:
    """The held-out examples of each eval data set, with the config key and the data set
    config they come from: the held-out fraction of each training data set, or
    `data.eval.path` as the data set "eval"."""
    if cfg.data.eval.path:
        classification = cfg.model.task == "sequence_classification"
        if (cfg.data.eval.format == "classification") != classification:
            raise ConfigError(f"data.eval.format: {cfg.data.eval.format} data cannot evaluate model.task {cfg.model.task}")
        eval_cfg = DatasetConfig(name="eval", path=cfg.data.eval.path, format=cfg.data.eval.format)
        sources = _tokenize_all(cfg, tokenizer, rank, [("eval", "data.eval", eval_cfg)])
        if cfg.model.task == "sequence_classification":
            train_sources = _tokenize_all(cfg, tokenizer, rank, _entries(cfg), report=False)
            classes = _class_ids(train_sources + sources, cfg.model.num_labels)
        else:
            classes = {}
        sets = []
        for s in sources:
            examples, lengths = _usable(s, cfg, {})
            sets.append(("data.eval", eval_cfg,
                         StreamDataset(s.name, s.data, examples, lengths, s.data.format == "text", classes.get(s.name))))
        return sets
    if cfg.data.eval.fraction:
        datasets, held, _, _ = _prepare(cfg, tokenizer, rank, report=False)
        return [(key, ds_cfg, StreamDataset(d.name, d.data, h, d.lengths, d.splittable, d.class_ids))
                for (_, key, ds_cfg), d, h in zip(_entries(cfg), datasets, held)]
    return []


def build_eval_sets(cfg: Config, tokenizer, attention: str, rank: int, world_size: int) -> dict[str, list[Batch]]:
    """Per data set, this rank's evaluation micro-batches: the held-out fraction of each
    training data set, or `data.eval.path` as the data set "eval". Examples are dealt to
    ranks round-robin, then packed (within one data set only) or padded."""
    _check_packing(cfg)
    result = {}
    for _, _, ds in _eval_datasets(cfg, tokenizer, rank):
        examples = ds.examples[: cfg.data.eval.max_examples]
        if len(examples) < world_size:
            raise ConfigError(f"data.eval: data set {ds.name!r} has {len(examples)} held-out examples, fewer than the "
                             f"{world_size} ranks; raise data.eval.fraction")
        pieces = [p for e in examples[rank::world_size] for p in ds.pieces(0, int(e), cfg.data.seq_len)]
        rows = pack_pieces(pieces, cfg.data.seq_len) if cfg.data.packing else [[p] for p in pieces]
        collate = _collator(cfg, [ds], tokenizer, attention)
        micro = cfg.train.micro_batch_size
        result[ds.name] = [collate(rows[i: i + micro]) for i in range(0, len(rows), micro)]
    return result


def held_out_conversations(cfg: Config, tokenizer, rank: int, count: int) -> dict[str, list[list[dict]]]:
    """Per chat or instruction eval data set, the conversations of its first `count`
    held-out examples that fit `data.seq_len` whole, read back from the source file
    (the tokenized cache keeps token ids, not the text of each turn)."""
    cache_dir = cache_root(cfg)
    result = {}
    for key, ds_cfg, ds in _eval_datasets(cfg, tokenizer, rank):
        if ds_cfg.format not in ("chat", "instruction"):
            continue
        whole = [int(e) for e in ds.examples[: cfg.data.eval.max_examples] if ds.lengths[e] == ds.data.lengths[e]]
        rows = [int(ds.data.rows[e]) for e in whole[:count]]
        wanted = set(rows)
        encoder = build_encoder(ds_cfg.format, tokenizer, field_names(ds_cfg.format, ds_cfg.fields, f"{key}.fields"),
                                train_on_prompt=False)
        found: dict[int, list[dict]] = {}
        for row in read_rows(resolve_source(ds_cfg.path, ds_cfg.format, key, cache_dir), cache_dir / "hf"):
            if row.number in wanted:
                found[row.number] = encoder.messages(row.record)
                if len(found) == len(wanted):
                    break
        result[ds.name] = [found[number] for number in rows]
    return result


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
