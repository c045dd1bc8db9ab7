"""Measures one real training step's memory on CPU, in a fresh process, for test_estimate.py.

    python tests/workers/estimate_probe.py '{"model": {...}, "micro": 4, "seq_len": 256, "checkpointing": false,
                                    "fused_loss": true}'

Prints JSON: the resident-memory growth from before the model is built to the peak of
one optimizer step (forward, backward, AdamW's first step, which allocates its state),
the bytes autograd saved for backward during the forward, and the bytes of the model's
output (the full logits; the summed loss with the fused head).

CPU memory is measured as the process's peak resident set (VmHWM), reset just before the
step's baseline is read (/proc/self/clear_refs), so an earlier peak (tokenizer training,
imports) cannot inflate it: it counts every byte the step touched, allocator slack included.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

import torch  # noqa: E402

from helpers import TOY_TEXTS, planned  # noqa: E402
from trainer.build import build_training  # noqa: E402
from trainer.config.schema import Config  # noqa: E402
from trainer.estimate.shapes import saved_tensor_bytes  # noqa: E402
from trainer.model.loss import forward_summed_loss  # noqa: E402
from trainer.model.structure import decoder_layers  # noqa: E402
from trainer.model.tokenizer import train_bpe_tokenizer  # noqa: E402
from trainer.runtime.distributed import init_distributed  # noqa: E402
from trainer.runtime.memory import peak_rss_bytes  # noqa: E402


def current_resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def reset_peak_resident() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size



def one_step(spec: dict, model_config: dict, tokenizer, dist_info) -> dict:
    cfg = Config()
    cfg.model.config = model_config
    cfg.parallel.strategy = "single"
    cfg.parallel.mixed_precision = "fp32"
    cfg.parallel.activation_checkpointing = spec["checkpointing"]
    cfg.train.micro_batch_size = spec["micro"]
    cfg.data.seq_len = spec["seq_len"]
    cfg.train.fused_loss = spec["fused_loss"]
    plan = planned(cfg)
    torch.manual_seed(0)
    ids = torch.randint(0, model_config["vocab_size"], (spec["micro"], spec["seq_len"]))

    reset_peak_resident()
    before = current_resident_bytes()
    strategy = build_training(cfg, plan, dist_info, tokenizer, total_steps=1).strategy
    model = strategy.unwrapped_model()
    outputs = []
    model.register_forward_hook(lambda module, args, output: outputs.append(output.logits))
    with saved_tensor_bytes(model, decoder_layers(model)) as saved:
        loss = forward_summed_loss(strategy.model, {"input_ids": ids}, ids, "causal_lm") / ids.numel()
    strategy.backward(loss)
    strategy.step()
    return {"growth": peak_rss_bytes() - before, "saved": saved,
            "logits": outputs[0].numel() * outputs[0].element_size()}


def main(spec: dict) -> None:
    tokenizer = train_bpe_tokenizer(TOY_TEXTS, vocab_size=300)
    dist = init_distributed()
    # The same step on a model too small to move the peak first: code that loads lazily
    # during a first step (kernels, modules imported on first use) is resident before the
    # baseline is read, so the growth measured next is the step's memory, not the library's.
    tiny = dict(spec["model"], hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, vocab_size=512)
    one_step({**spec, "micro": 1, "seq_len": 16}, tiny, tokenizer, dist)
    gc.collect()
    print(json.dumps(one_step(spec, spec["model"], tokenizer, dist)))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
