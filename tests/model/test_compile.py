"""train.compile where the backend cannot compile: one warning, and the layers stay eager.
(Compiled layers following the eager curve on single and fsdp: test_parallel.py.)"""

from __future__ import annotations

import logging

import torch

import trainer.model.compile
from trainer.build import build_model
from trainer.config.schema import Config, ModelConfig
from trainer.model.structure import decoder_layers


def test_a_backend_that_cannot_compile_leaves_the_layers_eager_with_one_warning(tiny_tokenizer, tiny_llama_config,
                                                                                  monkeypatch, caplog):
    attempts = []

    def no_compiler(graph_module, example_inputs):
        """Fails as inductor does on a machine without a C++ compiler."""
        attempts.append(1)
        raise RuntimeError("Failed to find a working C++ compiler")

    monkeypatch.setattr(trainer.model.compile, "BACKEND", no_compiler)
    cfg = Config(model=ModelConfig(config=tiny_llama_config, tokenizer="train-bpe"))
    model = build_model(cfg, tiny_tokenizer, "sdpa")
    forwards = [layer.forward for layer in decoder_layers(model)]
    with caplog.at_level(logging.INFO, logger="finetrain"):
        assert not trainer.model.compile.compile_decoder_layers(model, torch.device("cpu"))
    warnings = [r.getMessage() for r in caplog.records if r.name == "finetrain" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "C++ compiler" in warnings[0] and "running eager" in warnings[0], warnings
    assert [layer.forward for layer in decoder_layers(model)] == forwards
    ids = torch.randint(1, 300, (2, 8))
    model(input_ids=ids).logits.sum().backward()  # trains eagerly
    assert not trainer.model.compile.compile_decoder_layers(model, torch.device("cpu"))
    assert len(attempts) == 1  # the backend is probed once per process
