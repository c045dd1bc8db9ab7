"""The training loader: this rank's micro-batches of each optimizer step, cut from the global
row stream, the next step prepared in a background thread while the current one computes.
Of the `global_batch_size` rows of a step, rank r takes the r-th contiguous block of
`micro_batch_size x num_micro_batches` rows."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.config.schema import Config, cache_root
from trainer.data.collate import Batch, Collator, build_collator
from trainer.data.run_data import RunData
from trainer.data.sequence_shard import sequence_shard
from trainer.data.stream import GlobalStream
from trainer.runtime.errors import UserError

log = logging.getLogger("finetrain")


# 2: shuffles by RandomPermutation, examples as ids into memory-mapped arrays
STATE_VERSION = 2



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
    return TrainLoader(stream, build_collator(cfg, stream.datasets, tokenizer, attention), cfg.train.micro_batch_size,
                       cfg.train.global_batch_size, rank, world_size, data.stats, cache_root(cfg),
                       cfg.parallel.sequence_parallel, device)
