"""`finetrain export`: a Hugging Face folder from a checkpoint (or a run folder's newest).

The model is rebuilt from the checkpoint's own config.yaml and tokenizer, in one process,
and the trained weights are loaded into it the way the strategy that wrote them saved them
(DCP shards or DeepSpeed's files). Out comes the full model (safetensors, config,
tokenizer) that plain transformers loads, the peft adapter folder, or with `merge` the
merged model. The checkpoint's checksums are verified first, and a DCP checkpoint is read
without running code from it (trainer/parallel/dcp.py); DeepSpeed reads its own files
with pickle, so a zero1-3 checkpoint must come from a source one trusts.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from trainer.build import build_model
from trainer.checkpoint.layout import COMPLETE_MARK, checkpoint_problem, complete_checkpoints, read_mark
from trainer.checkpoint.trainer_state import read_trainer_state
from trainer.config.schema import Config, load_config
from trainer.model.quantization import dequantized_state_dict
from trainer.parallel.registry import strategy_for_format
from trainer.peft.bottleneck import is_bottleneck_model, save_bottleneck_adapters
from trainer.peft.methods import has_adapter, is_peft_model, merge_adapter, merge_problem, trained_adapters
from trainer.runtime.errors import UserError

log = logging.getLogger("finetrain")


def newest_checkpoint(path: Path) -> Path:
    """`path` if it is a complete checkpoint; for a run folder, its newest complete checkpoint."""
    path = Path(path)
    if (path / COMPLETE_MARK).is_file() or not (path / "config.yaml").is_file():
        return path
    run_cfg = load_config(path / "config.yaml", check_files=False)
    found = complete_checkpoints(path / run_cfg.checkpoint.dir)
    if not found:
        raise UserError(f"{path}: a run folder without a complete checkpoint in {run_cfg.checkpoint.dir}/")
    return found[-1]


def export_checkpoint(checkpoint: Path, out: Path, merge: bool = False) -> Path:
    """Write a Hugging Face folder from a checkpoint (or a run folder's newest): the full
    model, the peft adapter (loads with `peft.PeftModel.from_pretrained`), the bottleneck
    adapters (load with `trainer.peft.bottleneck.load_bottleneck_adapters`), or with `merge` the
    merged model."""

    checkpoint = newest_checkpoint(checkpoint)
    if merge:  # refused before anything is built
        problem = merge_problem(load_config(checkpoint / "config.yaml", check_files=False).peft.method)
        if problem:
            raise UserError(f"--{problem} (checkpoint {checkpoint})")
    model, tokenizer, cfg = trained_model(checkpoint, merge)
    if not merge and has_adapter(model) and cfg.model.config is not None:
        log.warning("the adapter's base model is a random init (model.config); export with --merge for a standalone model")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if is_bottleneck_model(model):
        save_bottleneck_adapters(model, out)
    elif is_peft_model(model):  # the trained adapter, without the frozen copy a continued run keeps
        model.save_pretrained(out, safe_serialization=True, selected_adapters=trained_adapters(model))
    else:
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def trained_model(checkpoint: Path, merge: bool = False) -> tuple[torch.nn.Module, object, Config]:
    """(the model of a complete checkpoint, rebuilt in this process from its own config.yaml
    and tokenizer with the trained weights loaded; its tokenizer; its config). With `merge` a
    peft adapter is merged into the weights (a plain transformers model); without, a peft
    model is returned as base + adapter."""
    from transformers import AutoTokenizer


    mark = read_mark(checkpoint)
    problem = checkpoint_problem(checkpoint)
    if problem is not None:
        raise UserError(f"{checkpoint} fails its checksums ({problem}); refusing to export it")
    read_trainer_state(checkpoint)  # not needed here, but a checkpoint whose state is refused is refused whole
    cfg = load_config(checkpoint / "config.yaml", check_files=False)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "tokenizer")
    model = build_model(cfg, tokenizer, attention="sdpa")
    strategy_for_format(mark["format"]).load_weights(checkpoint, model)
    if merge and is_peft_model(model):
        if cfg.model.quantization != "none":
            model = dequantized_copy(model, cfg, tokenizer)
        model = merge_adapter(model)
    return model, tokenizer, cfg


def dequantized_copy(model: torch.nn.Module, cfg: Config, tokenizer) -> torch.nn.Module:
    """The QLoRA `model` (adapter included) rebuilt without quantization, each 4-bit weight
    replaced by its dequantized matrix: merging the adapter into it gives a plain model (no
    quantization_config) that computes what training computed. Merging into the 4-bit
    layers themselves would re-quantize the sum and lose the adapter's small updates."""

    plain_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantization="none"))
    plain = build_model(plain_cfg, tokenizer, attention="sdpa")
    plain.load_state_dict(dequantized_state_dict(model, getattr(torch, cfg.model.dtype)), strict=True)
    return plain
