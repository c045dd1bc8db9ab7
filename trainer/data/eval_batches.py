"""The evaluation data of a run: each eval set's micro-batches for this rank (for the held-out
loss), and the held-out conversations whose last answers are generated."""

from __future__ import annotations

from trainer.config.schema import Config, cache_root
from trainer.data.collate import Batch, build_collator
from trainer.data.formats import build_encoder
from trainer.data.packing import pack_pieces
from trainer.data.records import field_names
from trainer.data.run_data import RunData, resolve_source
from trainer.data.sequence_shard import sequence_shard
from trainer.data.sources import read_rows
from trainer.runtime.errors import ConfigError


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
        collate = build_collator(cfg, [ds], tokenizer, attention)
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
