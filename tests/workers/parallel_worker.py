"""Runs a list of small training runs on every rank of a torchrun launch; writes what
each run measured (per-step loss, grad norm, lr, state bytes, export check) as JSON.

    torchrun --nproc-per-node N tests/workers/parallel_worker.py SPEC.json

Each run plans itself as a rank of the trainer does (trainer/plan.py: a refusal is a
result too), builds a tiny Llama (random init from a seed, or a saved folder) and the
strategy, and trains a few optimizer steps on fixed token rows of uneven length through
the loop's own `train_step`. Runs with `generate` then answer fixed prompts greedily,
as `data.eval.generate` does. `packed` runs put the same documents two to a row, collated
and (with `sequence_parallel`) cut for each sequence rank as the loader does; the
`isolation` check compares per-document logits under sequence parallelism with each
document run alone.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from helpers import (RUN_SEQ_LEN, VOCAB, Run, as_batches, make_config, make_dataset, make_model, planned,  # noqa: E402
                     rank_micro_batches, step_rows, toy_tokenizer)
from trainer.build import build_training  # noqa: E402
from trainer.config.schema import Config  # noqa: E402
from trainer.data.collate import Batch  # noqa: E402
from trainer.estimate.per_device import resident_state_bytes  # noqa: E402
from trainer.eval.generation import greedy_generate  # noqa: E402
from trainer.loop import train_step  # noqa: E402
from trainer.model.compile import BACKEND, CompileReport, backend_problem  # noqa: E402
from trainer.model.loss import IGNORE_INDEX  # noqa: E402
from trainer.optim import set_schedule_step  # noqa: E402
from trainer.runtime.distributed import agree, barrier, end_process, init_distributed  # noqa: E402
from trainer.runtime.errors import UserError  # noqa: E402

# Generation: 9 prompts in groups of 2 (5 groups: on 2 ranks one decodes a stand-in in the
# last round), stopping at every fifth token id, so answers end at different steps.
GENERATION_PROMPTS, GENERATION_GROUP = 9, 2
STOP_IDS = list(range(0, VOCAB, 5))
MAX_NEW_TOKENS = 12


def documents_dataset(ids: torch.Tensor, labels: torch.Tensor):
    """The rows of `step_rows` as tokenized documents (every token a target), for the collator."""
    lengths = (labels != IGNORE_INDEX).sum(1).tolist()
    return make_dataset([ids[b, :n].tolist() for b, n in enumerate(lengths)], [[True] * n for n in lengths],
                        seq_len=2 * RUN_SEQ_LEN), lengths


def packed_micro_batches(step: int, run: Run, cfg: Config, plan) -> list[Batch]:
    """The reference's documents of `step` (micro 8 x 1 rank: 8 documents), two to a packed row, as
    the loader hands them to this rank: its data-parallel block of rows, collated, and with
    sequence parallelism cut for its sequence rank (documents cross the cut)."""
    from trainer.data.collate import build_collator
    from trainer.data.packing import Piece
    from trainer.data.sequence_shard import sequence_shard

    ids, labels = step_rows(step, 8)
    dataset, lengths = documents_dataset(ids, labels)
    rows = [[Piece(0, 2 * r + i, 0, lengths[2 * r + i], True) for i in (0, 1)] for r in range(4)]
    size = run.sequence_parallel
    reader = dist.get_rank() // size
    per_rank = run.micro * run.accum
    mine = rows[reader * per_rank: (reader + 1) * per_rank]
    collate = build_collator(cfg, [dataset], toy_tokenizer(), plan.attention)
    batches = [collate(mine[i:i + run.micro]) for i in range(0, per_rank, run.micro)]
    return batches if size == 1 else [sequence_shard(b, dist.get_rank() % size, size) for b in batches]


# Every backend sequence parallelism runs on that a CPU has (flash_attention_2 and torch_varlen get
# the varlen reference's inputs).
ISOLATION_BACKENDS = ("sdpa", "sdpa_varlen", "varlen_reference")


@torch.no_grad()
def isolation(run: Run, out: Path) -> dict:
    """Per-document logits of one micro-batch under sequence parallelism (2 ranks, documents crossing
    the cut), gathered, against each document run alone: the largest difference per backend, and
    the same with the documents' bounds planted away (the whole micro-batch one document)."""
    from trainer.data.collate import Collator
    from trainer.data.packing import Piece
    from trainer.data.sequence_shard import sequence_shard
    from trainer.model.sequence_parallel import enable_sequence_parallel, whole_sequence_attention
    gen = torch.Generator().manual_seed(11)
    lengths = [13, 19, 7, 15, 9, 30]  # rows of 32: [13, 19] [7, 15, 9] [30], flattened pad-free to 93 + 3
    docs = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    dataset = make_dataset(docs, [[True] * n for n in lengths], seq_len=RUN_SEQ_LEN)
    pieces = [Piece(0, i, 0, n, True) for i, n in enumerate(lengths)]
    batch = Collator([dataset], "causal_lm", RUN_SEQ_LEN, True, "varlen_reference", 0)(
        [pieces[:2], pieces[2:5], pieces[5:]])
    starts = [0, 13, 32, 39, 54, 63]  # the document at 39-53 crosses the cut at 48
    result = {"max_abs_diff": {}, "leak_max_abs_diff": {}}
    for attention in ISOLATION_BACKENDS:
        cfg = make_config(dataclasses.replace(run, fused_loss=False), out, dist.get_world_size())
        model = make_model(cfg, attention).eval()
        enable_sequence_parallel(model, 2)
        with whole_sequence_attention(model):
            alone = [model(input_ids=torch.tensor([doc]), use_cache=False).logits[0] for doc in docs]
        for planted in (False, True):
            shard = sequence_shard(batch, dist.get_rank(), 2)
            if planted:
                whole = torch.tensor([0, 96], dtype=torch.int32)
                shard.inputs.update(cu_seq_lens_q=whole, cu_seq_lens_k=whole, max_length_q=96, max_length_k=96)
            local = model(**shard.inputs).logits[0]
            parts = [torch.empty_like(local) for _ in range(2)]
            dist.all_gather(parts, local)
            logits = torch.cat(parts)
            diff = max(float((logits[a:a + len(doc)] - ref).abs().max()) for a, doc, ref in zip(starts, docs, alone))
            result["leak_max_abs_diff" if planted else "max_abs_diff"][attention] = diff
    return result


def record_gradients(strategy) -> list[str]:
    """Names of the parameters that hold a gradient when the strategy steps (filled at each step)."""
    seen: list[str] = []
    step = strategy.step

    def step_and_record(**kwargs):  # skip=: train_step drops a non-finite step's update
        seen[:] = [name for name, p in strategy.unwrapped_model().named_parameters() if p.grad is not None]
        return step(**kwargs)

    strategy.step = step_and_record
    return seen


@torch.no_grad()
def export_difference(strategy, cfg: Config, full_state: dict) -> float:
    """Max |logits| difference between the trained (wrapped) model and a plain
    transformers/peft model loaded from `full_state_dict` (rank 0; -1 elsewhere)."""
    ids, _ = step_rows(999, 2)
    strategy.model.eval()
    trained = strategy.model(input_ids=ids).logits.float()
    strategy.model.train()
    if dist.get_rank() != 0:
        return -1.0
    plain = make_model(cfg)
    plain.load_state_dict(full_state, strict=True)
    plain.eval()
    return float((plain(input_ids=ids).logits.float() - trained).abs().max())


def generation_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(1, VOCAB, (int(torch.randint(3, 12, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(GENERATION_PROMPTS)]


def tied_intact(strategy) -> bool:
    model = strategy.unwrapped_model()
    return model.get_input_embeddings().weight is model.get_output_embeddings().weight


def execute(run: Run, out: Path) -> dict:
    dist_info = init_distributed()
    cfg = make_config(run, out, dist_info.world_size)
    if run.compile:  # compiled for real, not the eager fallback; counted from here on
        assert backend_problem(BACKEND, "cpu") is None, backend_problem(BACKEND, "cpu")
        compiled = CompileReport(layers=0)
    if run.check == "isolation":
        return isolation(run, out)
    try:  # what the trainer sets up under `agree`; a refusal is a result too
        plan = agree(lambda: planned(cfg, dist_info.world_size))
        strategy = build_training(cfg, plan, dist_info, toy_tokenizer(), run.steps,
                                  lambda: make_model(cfg, plan.attention)).strategy
    except UserError as err:
        return {"refused": str(err)}
    start = 0
    if run.load_dir:
        strategy.load(Path(run.load_dir))
        start = run.load_step
        set_schedule_step(strategy.optimizer, strategy.scheduler, cfg.optim, start)  # as Trainer.resume does
    result = {"losses": [], "grad_norms": [], "lrs": []}
    with_grad = record_gradients(strategy)
    if run.generate_first:
        result["first_generations"] = greedy_generate(strategy, generation_prompts(), GENERATION_GROUP, 0, STOP_IDS,
                                                      MAX_NEW_TOKENS)
    for step in range(start, run.steps):
        batches = packed_micro_batches(step, run, cfg, plan) if run.packed else as_batches(rank_micro_batches(step, run))
        record = train_step(strategy, batches, "causal_lm")
        for key in ("loss", "grad_norm", "lr"):
            result[key + ("es" if key == "loss" else "s")].append(record[key])
        if step == 0:
            result["with_grad"] = list(with_grad)  # torch strategies only (DeepSpeed keeps its own)
            result["trainable"] = [name for name, p in strategy.unwrapped_model().named_parameters() if p.requires_grad]
            bytes_here = resident_state_bytes(strategy)
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, bytes_here)
            result["state_bytes"] = everyone
        if run.save_at == step + 1:
            path = Path(run.save_dir)
            if dist.get_rank() == 0:
                path.mkdir(parents=True, exist_ok=True)
            barrier()
            strategy.save(path)
            barrier()
    if run.tied:
        result["tied_intact"] = tied_intact(strategy)
    if run.export_check or run.full_state_path:
        full_state = strategy.full_state_dict()
        assert dist.get_rank() == 0 or full_state == {}, "full_state_dict must be empty off rank 0"
        if run.export_check:
            result["export_max_abs_diff"] = export_difference(strategy, cfg, full_state)
        if run.full_state_path and dist.get_rank() == 0:
            torch.save(full_state, run.full_state_path)
    if run.generate:
        result["generations"] = greedy_generate(strategy, generation_prompts(), GENERATION_GROUP, 0, STOP_IDS,
                                                MAX_NEW_TOKENS)
    if run.compile:
        result["compile"] = compiled.counts()
    result["start_step"] = start
    return result


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    results = {}
    for fields in spec["runs"]:
        run = Run(**fields)
        results[run.name] = execute(run, out)
    if dist.get_rank() == 0:
        Path(spec["results"]).write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    end_process(0)  # as a finetrain rank ends
