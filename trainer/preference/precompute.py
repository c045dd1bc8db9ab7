"""`preference.reference: precomputed`: one pass of the initial model over every preference sequence
of the run before step 1, its summed log-probabilities stored beside the tokenized cache.

Per data set (a training data set, its held-out part included, or an eval set of its own), the
table is `[examples, 2]` float64: each example's chosen and rejected sequence (an unpaired
completion in column 0), computed for every example of the tokenized data set, so that it does
not depend on which are held out. It lives in `<cache>/reference/<tokenized entry>-<key>/`, the key
hashing what decides the values: the model (its folder's fingerprint, or its config and seed), the
adapter it starts with, the master and compute dtypes, `data.seq_len` and `data.overlong` (they
cut the sequences); the tokenized entry's own name already holds the data, the tokenizer and the
chat template.

The pass is split over the ranks and resumable: the examples go in chunks of `CHUNK_EXAMPLES`,
dealt round-robin to the ranks, and each chunk is written (aside, then renamed) as soon as it is
done, so a pass stopped midway resumes with the chunks it finished, at any world size. Every rank
runs the same number of forwards (a sharded model needs them all), and the ranks exchange their
chunks at the end, so every node ends with the whole table and writes it once (`logps.npy`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer.config.schema import Config, cache_root, to_dict
from trainer.data.collate import Batch, build_collator
from trainer.data.packing import pack_pieces
from trainer.data.preference_rows import PREFERENCE_FORMATS
from trainer.data.run_data import RunData
from trainer.data.sources import source_fingerprint
from trainer.data.stream import StreamDataset
from trainer.model.loading import resolve_model_path
from trainer.parallel.strategy import Strategy
from trainer.preference.reference_model import evaluating
from trainer.preference.scoring import score_sequences
from trainer.runtime import faults
from trainer.runtime.distributed import DistInfo, all_reduce_max

log = logging.getLogger("finetrain")

CHUNK_EXAMPLES = 256
TABLE = "logps.npy"
# Bump when the same model and data would give other values (a change to scoring or collation).
VERSION = 1


def preference_sets(data: RunData) -> dict[str, StreamDataset]:
    """Every preference data set of the run by name (a training set and its held-out part share
    one), as StreamDatasets over all of their examples."""
    sets = {}
    for ds in [*data.train, *(ds for _, _, ds in data.evaluation)]:
        if ds.data.format in PREFERENCE_FORMATS and ds.name not in sets:
            sets[ds.name] = dataclasses.replace(ds, examples=np.arange(len(ds.data)))
    return sets


def model_key(cfg: Config) -> str:
    """What decides the initial model's log-probabilities, hashed."""
    m = cfg.model
    model = {"path": source_fingerprint(resolve_model_path(m.path, cache_root(cfg)))} if m.path else \
        {"config": m.config, "seed": cfg.run.seed}
    adapter = dict(to_dict(cfg)["peft"], seed=cfg.run.seed)
    if cfg.peft.adapter_path:
        adapter["adapter_path"] = source_fingerprint(cfg.peft.adapter_path)
    described = {"version": VERSION, "model": model, "adapter": adapter, "dtype": m.dtype,
                 "quantization": m.quantization, "compute": cfg.parallel.mixed_precision,
                 "seq_len": cfg.data.seq_len, "overlong": cfg.data.overlong}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:20]


def table_folder(cfg: Config, dataset: StreamDataset) -> Path:
    entry = dataset.data.folder.name if dataset.data.folder is not None else dataset.name
    return cache_root(cfg) / "reference" / f"{entry}-{model_key(cfg)}"


def precompute_reference(cfg: Config, strategy: Strategy, data: RunData, tokenizer, attention: str,
                         dist_info: DistInfo) -> dict[str, np.ndarray]:
    """The reference tables of every preference data set of the run, computed where missing (a
    collective: every rank calls it, with the model as it is at step 0)."""
    tables = {}
    for name, dataset in preference_sets(data).items():
        folder = table_folder(cfg, dataset)
        tables[name] = _table(cfg, strategy, dataset, folder, tokenizer, attention, dist_info)
    return tables


def _all_ranks(flag: bool) -> bool:
    return not bool(all_reduce_max(torch.tensor([0 if flag else 1], dtype=torch.int32)).item())


def _gather(value) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _table(cfg: Config, strategy: Strategy, dataset: StreamDataset, folder: Path, tokenizer, attention: str,
           dist_info: DistInfo) -> np.ndarray:
    final = folder / TABLE
    if _all_ranks(final.is_file()):
        return np.load(final)
    examples = len(dataset.data)
    chunks = range(-(-examples // CHUNK_EXAMPLES))
    found = {c: np.load(folder / _chunk_name(c)) for c in chunks if (folder / _chunk_name(c)).is_file()}
    holders: dict[int, int] = {}  # chunk -> the lowest rank that has it
    for rank, have in enumerate(_gather(sorted(found))):
        for c in have:
            holders.setdefault(c, rank)
    todo = [c for c in chunks if c not in holders]
    mine = todo[dist_info.rank::dist_info.world_size]
    if dist_info.is_main:
        log.info("preference.reference precomputed: %s: %d of %d chunks of %d examples to compute (%d found in %s)",
                 dataset.name, len(todo), len(chunks), CHUNK_EXAMPLES, len(holders), folder)
    computed = _compute(cfg, strategy, dataset, mine, folder, tokenizer, attention)
    shared = {c: values for c, values in found.items() if holders[c] == dist_info.rank}
    table = np.full((examples, 2), np.nan)
    for part in _gather({**shared, **computed}):
        for c, values in part.items():
            table[c * CHUNK_EXAMPLES: c * CHUNK_EXAMPLES + len(values)] = values
    if dist_info.local_rank == 0:
        _write_atomically(final, table)
    return table


def _chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}.npy"


def _write_atomically(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.{os.getpid()}.npy")
    np.save(aside, values)
    os.replace(aside, path)


def _compute(cfg: Config, strategy: Strategy, dataset: StreamDataset, chunks: list[int], folder: Path, tokenizer,
             attention: str) -> dict[int, np.ndarray]:
    """This rank's chunks, each written once done; every rank runs as many forwards as the busiest."""
    collate = build_collator(cfg, [dataset], tokenizer, attention)
    micro = cfg.train.micro_batch_size
    work: list[tuple[int, Batch | None]] = []  # (chunk, micro-batch); None closes a chunk
    for c in chunks:
        ids = range(c * CHUNK_EXAMPLES, min((c + 1) * CHUNK_EXAMPLES, len(dataset.data)))
        pieces = [p for e in ids for p in dataset.pieces(0, e)]
        rows = pack_pieces(pieces, cfg.data.seq_len) if cfg.data.packing else [[p] for p in pieces]
        work += [(c, collate(rows[i:i + micro])) for i in range(0, len(rows), micro)] + [(c, None)]
    forwards = sum(batch is not None for _, batch in work)
    rounds = int(all_reduce_max(torch.tensor([forwards], dtype=torch.int64)).item())
    model, device = strategy.model, strategy.dist.device
    values: dict[int, np.ndarray] = {}
    done = 0
    with torch.no_grad(), evaluating(model), strategy.autocast():
        for c, batch in work:
            if batch is None:
                _write_atomically(folder / _chunk_name(c), values[c])
                continue
            table = values.setdefault(c, np.full((min(CHUNK_EXAMPLES, len(dataset.data) - c * CHUNK_EXAMPLES), 2),
                                                 np.nan))
            sums = score_sequences(model, batch, device, cfg.model.task)[0].policy.double().cpu().numpy()
            for value, (_, example, part) in zip(sums, batch.preference.keys):
                table[example - c * CHUNK_EXAMPLES, part] = value
            done += 1
            faults.touch()
        # A rank with less work repeats a forward, so that the forwards of a sharded model stay together.
        stand_in = next((batch for _, batch in work if batch is not None), None) or collate([dataset.pieces(0, 0)])
        for _ in range(rounds - done):
            score_sequences(model, stand_in, device, cfg.model.task)
    return values
