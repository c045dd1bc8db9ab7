"""Runs a list of small training runs on every rank of a torchrun launch; writes what
each run measured (per-step loss, grad norm, lr, state bytes, export check) as JSON.

    torchrun --nproc-per-node N tests/parallel_worker.py SPEC.json

Each run plans itself as a rank of the trainer does (trainer/plan.py: a refusal is a
result too), builds a tiny Llama (random init from a seed, or a saved folder) and the
strategy, and trains a few optimizer steps on fixed token rows of uneven length through
the loop's own `train_step`. Runs with `generate` then answer fixed prompts greedily,
as `data.eval.generate` does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import TINY_LLAMA, TOY_TEXTS, planned  # noqa: E402
from trainer.compile import BACKEND, CompileReport, backend_problem  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.data.collate import Batch  # noqa: E402
from trainer.distributed import agree, barrier, end_process, init_distributed  # noqa: E402
from trainer.errors import UserError  # noqa: E402
from trainer.estimate import resident_state_bytes  # noqa: E402
from trainer.generate import greedy_generate  # noqa: E402
from trainer.loop import train_step  # noqa: E402
from trainer.loss import IGNORE_INDEX, count_targets  # noqa: E402
from trainer.models import build_model, train_bpe_tokenizer  # noqa: E402
from trainer.optim import set_schedule_step  # noqa: E402
from trainer.parallel import build_strategy  # noqa: E402

SEQ_LEN = 32
VOCAB = TINY_LLAMA["vocab_size"]
# Generation: 9 prompts in groups of 2 (5 groups: on 2 ranks one decodes a stand-in in the
# last round), stopping at every fifth token id, so answers end at different steps.
GENERATION_PROMPTS, GENERATION_GROUP = 9, 2
STOP_IDS = list(range(0, VOCAB, 5))
MAX_NEW_TOKENS = 12


@dataclasses.dataclass
class Run:
    name: str
    strategy: str
    micro: int = 2
    accum: int = 2
    steps: int = 4
    peft: str = "none"  # a peft.method
    peft_options: dict = dataclasses.field(default_factory=dict)  # peft.options
    quantization: str = "none"  # model.quantization (nf4: QLoRA on model_path)
    model_path: str | None = None  # a saved folder (pretrained-style); None: seeded random init
    tied: bool = False
    activation_checkpointing: bool = False
    offload: str = "none"
    mixed_precision: str = "fp32"
    deepspeed_config: str | None = None
    replicate: int = 1  # fsdp: HSDP replicas
    save_at: int | None = None  # save after this many steps into save_dir
    save_dir: str | None = None
    load_dir: str | None = None  # resume from here (saved after load_step steps)
    load_step: int = 0
    export_check: bool = False
    fused_loss: bool = True  # false: the plain head and full logits
    compile: bool = False
    full_state_path: str | None = None  # write full_state_dict here (rank 0) after the last step
    generate: bool = False  # greedy answers to fixed prompts after the last step
    generate_first: bool = False  # and before the first step (as the loop's step-0 evaluation does)


def model_config(run: Run) -> dict:
    return {**TINY_LLAMA, "tie_word_embeddings": run.tied}


@functools.cache
def tokenizer():
    return train_bpe_tokenizer(TOY_TEXTS, vocab_size=VOCAB)


def make_config(run: Run, out: Path, world_size: int) -> Config:
    cfg = Config()
    cfg.run.output_dir = str(out / run.name)
    cfg.model.path = run.model_path
    cfg.model.config = None if run.model_path else model_config(run)
    cfg.model.quantization = run.quantization
    cfg.data.cache_dir = str(out / "cache")
    cfg.data.packing = False  # the rows are made here (step_rows), one document per row
    cfg.peft.method, cfg.peft.r, cfg.peft.alpha, cfg.peft.num_virtual_tokens = run.peft, 4, 8.0, 4
    cfg.peft.options = dict(run.peft_options)
    cfg.parallel.strategy = run.strategy
    cfg.parallel.mixed_precision = run.mixed_precision
    cfg.parallel.activation_checkpointing = run.activation_checkpointing
    cfg.parallel.offload = run.offload
    cfg.parallel.deepspeed_config = run.deepspeed_config
    cfg.parallel.replicate = run.replicate
    cfg.optim.lr = 1e-2
    cfg.optim.weight_decay = 0.1
    cfg.optim.warmup_steps = 1
    cfg.optim.max_grad_norm = 1.0
    cfg.train.micro_batch_size = run.micro
    cfg.train.global_batch_size = run.micro * run.accum * world_size
    cfg.train.max_steps = run.steps
    cfg.train.fused_loss = run.fused_loss
    cfg.train.compile = run.compile
    return cfg


def make_model(cfg: Config):
    return build_model(cfg, tokenizer(), "sdpa")


def step_rows(step: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global rows: token sequences, each row a random length, right-padded
    (labels -100 past the end), the same on every rank and world size."""
    gen = torch.Generator().manual_seed(1000 + step)
    # Counting sequences (start, stride random): learnable, so the loss falls quickly.
    starts = torch.randint(1, VOCAB, (rows, 1), generator=gen)
    strides = torch.randint(1, 4, (rows, 1), generator=gen)
    ids = 1 + (starts + strides * torch.arange(SEQ_LEN)[None, :]) % (VOCAB - 1)
    lengths = torch.randint(4, SEQ_LEN + 1, (rows,), generator=gen)
    labels = ids.clone()
    labels[torch.arange(SEQ_LEN)[None, :] >= lengths[:, None]] = IGNORE_INDEX
    ids[labels == IGNORE_INDEX] = 0
    return ids, labels


def rank_micro_batches(step: int, run: Run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = run.micro * run.accum
    ids, labels = step_rows(step, per_rank * world)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    ids, labels = ids[mine], labels[mine]
    return [(ids[i:i + run.micro], labels[i:i + run.micro]) for i in range(0, per_rank, run.micro)]


def as_batches(micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Batch]:
    return [Batch(inputs={"input_ids": ids}, labels=labels, num_targets=count_targets(labels, "causal_lm"),
                  num_tokens=int((labels != IGNORE_INDEX).sum()), num_slots=labels.numel(), examples={}, tokens={})
            for ids, labels in micro_batches]


def record_gradients(strategy) -> list[str]:
    """Names of the parameters that hold a gradient when the strategy steps (filled at each step)."""
    seen: list[str] = []
    step = strategy.step

    def step_and_record():
        seen[:] = [name for name, p in strategy.unwrapped_model().named_parameters() if p.grad is not None]
        return step()

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
    try:  # what the trainer sets up under `agree`; a refusal is a result too
        plan = agree(lambda: planned(cfg, dist_info.world_size))
        strategy = agree(lambda: build_strategy(cfg, dist_info, plan))
        model = agree(lambda: strategy.build_model(lambda: make_model(cfg)))
        agree(lambda: strategy.setup(model, run.steps))
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
        record = train_step(strategy, as_batches(rank_micro_batches(step, run)), "causal_lm")
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
