"""The training loader and the evaluation sets, built from the config.

`build_train_loader` maps every data set from the tokenization cache (tokenizing it
first on a miss, once per node), applies `data.overlong` (text documents are split
across rows instead: continued pretraining loses nothing), sets the held-out examples
aside, and wraps the global row stream in a `TrainLoader` that hands each rank its rows
of every optimizer step: of the `global_batch_size` rows of a step, rank r takes the
r-th contiguous block of `micro_batch_size x num_micro_batches` rows.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from trainer.attention import NAME as VARLEN_REFERENCE
from trainer.config import Config, DatasetConfig, cache_root, dataset_name
from trainer.eval_sets import declared_sets

from trainer.errors import ConfigError, UserError
from trainer.data.builtin import builtin_format, is_builtin, materialize
from trainer.data.collate import FLAT_MULTIPLE, Batch, Collator
from trainer.data.formats import build_encoder, field_names, record_texts
from trainer.data.mixing import RandomPermutation
from trainer.data.packing import pack_pieces
from trainer.data.prepare import EncodingSpec, load_tokenized
from trainer.data.sequence_shard import sequence_shard
from trainer.data.sources import read_rows
from trainer.errors import DataError
from trainer.data.stream import ExampleSet, GlobalStream, StreamDataset
from trainer.data.tokenized import TokenizedDataset
from trainer.distributed import local_world_size, on_node_leaders
from trainer.peft import prepends_virtual_tokens

log = logging.getLogger("finetrain")

# 2: shuffles by RandomPermutation, examples as ids into memory-mapped arrays
STATE_VERSION = 2


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
               (data.format != "classification" and not data.example_targets(int(i))[1:seq_len].any())]
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
    choice sets (trainer/multiple_choice.py reads those)."""
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


def _collator(cfg: Config, datasets: list[StreamDataset], tokenizer, attention: str) -> Collator:
    # Sequence-parallel attention reads every backend's document bounds from cu_seq_lens: rows are
    # collated flattened, as for varlen attention, to a length that splits evenly over the group's
    # ranks (no filler document for the shard to add), and no seq_len^2 mask is built to be dropped.
    size = cfg.parallel.sequence_parallel
    layout = attention if size == 1 else VARLEN_REFERENCE
    return Collator(datasets, cfg.model.task, cfg.data.seq_len, cfg.data.packing, layout, tokenizer.pad_token_id,
                    mask_dtype=getattr(torch, cfg.model.dtype), flat_multiple=math.lcm(FLAT_MULTIPLE, size),
                    position_ids=not prepends_virtual_tokens(cfg.peft.method))


@dataclass
class _Step:
    """One optimizer step's micro-batches for this rank, and the stream's position after them."""

    batches: list[Batch]
    num_micro_batches: int
    stream_state: dict  # GlobalStream.state_dict() right after this step's rows were drawn
    epochs: dict[str, float]
    copied: object = None  # CUDA: the event recorded after the copy to the device

    def ready(self, device: torch.device | None) -> list[Batch]:
        """The batches, once usable on the current CUDA stream (their copy ran on a side stream)."""
        if self.copied is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(self.copied)
            for batch in self.batches:
                for tensor in batch.tensors():
                    tensor.record_stream(current)  # the allocator must not reuse them before the step ran
        return self.batches


@dataclass
class TrainLoader:
    """This rank's micro-batches of each optimizer step, from the global row stream.

    `next_step(n, prepare_next=True)` builds the following step's micro-batches in a background
    thread while the caller computes (on CUDA also pinning them and copying them to the device
    on a side stream), so the loop finds them ready. Only that thread touches the stream while it
    runs; each prepared step carries the stream's state right after its rows, and `state_dict()`
    returns the state after the last step handed out (consumed), never that of a step merely
    prepared: a checkpoint taken with a step prepared ahead resumes at the step that was never
    trained, and the prepared one is discarded."""

    stream: GlobalStream
    collator: Collator
    micro_batch_size: int
    global_batch_size: int
    rank: int
    world_size: int
    load_stats: dict
    cache_dir: Path | None = None  # where the rows of an epoch are counted once
    sequence_parallel: int = 1  # ranks that read the same rows, each keeping 1/N of their tokens
    device: torch.device | None = None  # CUDA: batches are copied there as they are prepared
    _epoch_rows: int | None = field(default=None, init=False)
    _ahead: Future | None = field(default=None, init=False)  # the next step, being prepared
    _consumed: _Step | None = field(default=None, init=False)  # the last step handed out
    _worker: ThreadPoolExecutor | None = field(default=None, init=False)
    _copy_stream: object = field(default=None, init=False)

    def next_step(self, num_micro_batches: int, prepare_next: bool = False) -> list[Batch]:
        """This rank's micro-batches of the next optimizer step (the one prepared ahead when
        there is one); with `prepare_next`, the step after it is prepared in the background."""
        ahead, self._ahead = self._ahead, None
        step = ahead.result() if ahead is not None else None
        if step is None or step.num_micro_batches != num_micro_batches:
            if step is not None:
                self.stream.load_state_dict(self._consumed.stream_state)  # prepared for another layout
            step = self._prepare(num_micro_batches)
        self._consumed = step
        if prepare_next:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="finetrain-data")
            self._ahead = self._worker.submit(self._prepare, num_micro_batches)
        return step.ready(self.device)

    @property
    def prepared_ahead(self) -> bool:
        """A step is being (or has been) prepared ahead and not handed out."""
        return self._ahead is not None

    def _prepare(self, num_micro_batches: int) -> _Step:
        # Every rank of a sequence group reads its data-parallel rank's rows, then keeps its shard.
        size = self.sequence_parallel
        readers, reader = self.world_size // size, self.rank // size  # data-parallel
        per_rank = self.micro_batch_size * num_micro_batches
        rows = [self.stream.next_row() for _ in range(per_rank * readers)]
        state, epochs = self.stream.state_dict(), self.stream.epochs
        mine = rows[reader * per_rank: (reader + 1) * per_rank]
        batches = [self.collator(mine[i: i + self.micro_batch_size]) for i in range(0, per_rank, self.micro_batch_size)]
        if size > 1:
            batches = [sequence_shard(b, self.rank % size, size, self.collator.pad_token_id) for b in batches]
        copied = None
        if self.device is not None and self.device.type == "cuda":
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(self._copy_stream):
                for batch in batches:
                    batch.pin_memory().to(self.device, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self._copy_stream)
        return _Step(batches, num_micro_batches, state, epochs, copied)

    def _discard_ahead(self) -> None:
        """Wait for a step being prepared, drop it, and put the stream back where the consumed steps left it."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead.result()
            self.stream.load_state_dict(self._consumed.stream_state)

    def close(self) -> None:
        """Stop preparing ahead (waits for a step in preparation); the loader stays usable."""
        self._discard_ahead()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def steps_per_epoch(self) -> float:
        """Optimizer steps of one epoch: one pass over the primary data set (the largest
        weight), with the other data sets mixed in at their weights."""
        if self._epoch_rows is None:
            self._epoch_rows = self.stream.epoch_rows(self.cache_dir)
        return self._epoch_rows / self.global_batch_size

    @property
    def dataset_examples(self) -> dict[str, int]:
        """Training examples of each data set (held-out ones excluded)."""
        return {ds.name: len(ds.examples) for ds in self.stream.datasets}

    @property
    def stats(self) -> dict:
        """Counters for the metrics: over-long and bad rows per data set (at load) and the
        epochs drawn of each data set so far (by the steps handed out)."""
        drawn = self._consumed.epochs if self._consumed is not None else self.stream.epochs
        epochs = {f"{name}/epoch": round(value, 4) for name, value in drawn.items()}
        return {**self.load_stats, **epochs}

    def state_dict(self) -> dict:
        """The data position after the last step handed out (not after one prepared ahead)."""
        stream = self._consumed.stream_state if self._consumed is not None else self.stream.state_dict()
        return {"version": STATE_VERSION, "stream": stream}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(f"{state.get('version')}: this checkpoint's data position is of another version "
                            f"({STATE_VERSION} here); resume it with the finetrain that wrote it, or start over "
                            "with checkpoint.resume=never")
        self._discard_ahead()
        self.stream.load_state_dict(state["stream"])
        self._consumed = None


def build_train_loader(cfg: Config, tokenizer, attention: str, rank: int, world_size: int,
                       data: RunData | None = None, device: torch.device | None = None) -> TrainLoader:
    """This rank's loader of the run's training stream (`data`: the run's data, loaded here when
    not given; `device`: where the batches go, copied as they are prepared when it is a GPU)."""
    start = time.perf_counter()
    data = data or RunData.load(cfg, tokenizer)
    stream = data.stream(cfg)
    log.info("training data: %s examples ready in %.1f s", " + ".join(f"{len(ds.examples):,} {ds.name}"
                                                                     for ds in stream.datasets),
             time.perf_counter() - start)
    return TrainLoader(stream, _collator(cfg, stream.datasets, tokenizer, attention), cfg.train.micro_batch_size,
                       cfg.train.global_batch_size, rank, world_size, data.stats, cache_root(cfg),
                       cfg.parallel.sequence_parallel, device)


def build_eval_sets(cfg: Config, tokenizer, attention: str, rank: int, world_size: int,
                    data: RunData | None = None) -> dict[str, list[Batch]]:
    """Per eval data set scored by its loss (choice sets are not), this rank's evaluation
    micro-batches. Examples are dealt to ranks round-robin (to sequence groups, with sequence
    parallelism: each rank keeps its shard), then packed (within one data set only) or padded."""
    data = data or RunData.load(cfg, tokenizer, report=False)
    readers, reader = world_size // cfg.parallel.sequence_parallel, rank // cfg.parallel.sequence_parallel
    result = {}
    for key, _, ds in data.evaluation:
        if len(ds.examples) < readers:
            held_out = not key.startswith("data.eval")
            raise ConfigError(f"{'data.eval' if held_out else key}: data set {ds.name!r} has {len(ds.examples)} "
                              f"{'held-out ' if held_out or key == 'data.eval' else ''}examples, fewer than the "
                              f"{readers} ranks that read them" + ("; raise data.eval.fraction" if held_out else ""))
        pieces = [p for e in ds.examples[reader::readers] for p in ds.pieces(0, int(e))]
        rows = pack_pieces(pieces, cfg.data.seq_len) if cfg.data.packing else [[p] for p in pieces]
        collate = _collator(cfg, [ds], tokenizer, attention)
        micro = cfg.train.micro_batch_size
        batches = [collate(rows[i: i + micro]) for i in range(0, len(rows), micro)]
        size = cfg.parallel.sequence_parallel
        result[ds.name] = batches if size == 1 else [sequence_shard(b, rank % size, size, tokenizer.pad_token_id)
                                                     for b in batches]
    return result


def held_out_conversations(cfg: Config, tokenizer, count: int,
                           data: RunData | None = None) -> dict[str, list[list[dict]]]:
    """Per chat or instruction eval data set, the conversations of its first `count`
    held-out examples that fit `data.seq_len` whole, one per prompt (a question asked twice
    is answered once), read back from the source file (the tokenized cache keeps token
    ids, not the text of each turn)."""
    cache_dir = cache_root(cfg)
    data = data or RunData.load(cfg, tokenizer, report=False)
    result = {}
    for key, ds_cfg, ds in data.evaluation:
        if ds_cfg.format not in ("chat", "instruction"):
            continue
        first_of_prompt = {}
        for e in ds.examples:
            if ds.data.length(int(e)) <= cfg.data.seq_len:
                first_of_prompt.setdefault(int(ds.data.prompt_keys[e]), int(e))
        rows = [int(ds.data.rows[e]) for e in sorted(first_of_prompt.values())[:count]]
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
