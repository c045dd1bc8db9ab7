"""What a run trains, built the one way the trainer builds it: the model (the base model, quantized
where asked, wrapped by its adapter, with the target-only loss head) and the parallel strategy
around it, with its optimizer and schedule. The loop, export, the tests and the benchmarks build
through here, so none of them trains a model the trainer would not."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from trainer.config.schema import Config
from trainer.model.loading import load_base_model
from trainer.model.loss_head import install_fused_head
from trainer.model.structure import parameter_counts
from trainer.parallel.registry import build_strategy
from trainer.parallel.strategy import Strategy
from trainer.peft.methods import apply_peft
from trainer.runtime.distributed import DistInfo, agree

if TYPE_CHECKING:
    from trainer.config.plan_types import RunPlan

log = logging.getLogger("finetrain")


def build_model(cfg: Config, tokenizer: PreTrainedTokenizerBase, attention: str,
                total_steps: int | None = None) -> nn.Module:
    """The model on CPU in `model.dtype`, with its task head and peft wrapper. New weights
    (random init, a fresh classification head, adapters) come from `run.seed`, so every
    process builds the identical model. `total_steps`: the run's optimizer steps (default
    train.max_steps), which some adapter methods schedule over (AdaLoRA)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        model = load_base_model(cfg, tokenizer, attention)
        if cfg.peft.method != "none":
            model = apply_peft(model, cfg.peft, cfg.model.task, total_steps or cfg.train.max_steps)
    install_fused_head(model, cfg)
    trainable, total = parameter_counts(model)
    log.info("model %s (%s, %s): %s of %s parameters trainable (%.2f%%)", type(model).__name__, cfg.model.task,
             cfg.peft.method, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return model


@dataclass
class Training:
    """The strategy that trains the model (call `strategy.model` for forward), and the model's
    parameter counts, taken before sharding splits them."""

    strategy: Strategy
    trainable_params: int
    total_params: int


def build_training(cfg: Config, plan: "RunPlan", dist_info: DistInfo, tokenizer: PreTrainedTokenizerBase,
                   total_steps: int, make_model: Callable[[], nn.Module] | None = None) -> Training:
    """The strategy of the plan, the model built through it (zero3 builds it partitioned) and
    its set-up: per-layer options, sharding, optimizer and schedule over `total_steps`. Each
    phase agreed on by every rank, so a mistake any rank meets stops them all alike.
    `make_model`: another model to train (tests of hand-made models); `build_model` by default."""
    strategy = agree(lambda: build_strategy(cfg, dist_info, plan))
    make_model = make_model or (lambda: build_model(cfg, tokenizer, plan.attention, total_steps))
    model = agree(lambda: strategy.build_model(make_model))
    trainable, total = parameter_counts(model)
    agree(lambda: strategy.setup(model, total_steps))
    return Training(strategy, trainable, total)
