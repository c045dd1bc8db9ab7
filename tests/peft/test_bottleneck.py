"""Bottleneck adapter modules (peft.method bottleneck): identity at start, placed after the
attention and MLP blocks, only they train, the loss falls, resume is exact, the exported
adapter folder reloads onto the base, and merging is refused with the reason."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from helpers import causal_config, step_losses, write_config
from trainer.build import build_model
from trainer.checkpoint.export import export_checkpoint
from trainer.checkpoint.layout import complete_checkpoints
from trainer.config.schema import Config, ModelConfig, PeftConfig, load_config
from trainer.loop import Trainer
from trainer.peft.bottleneck import (ADAPTER, CONFIG_FILE, WEIGHTS_FILE, BottleneckAdapter, adapter_sites,
                                     is_bottleneck_model, load_bottleneck_adapters)
from trainer.peft.methods import merge_adapter, peft_config_problems
from trainer.runtime.errors import ConfigError, UserError


def bottleneck_model(model_config: dict, tokenizer, task: str = "causal_lm", **options):
    cfg = Config()
    cfg.model = ModelConfig(config=model_config, task=task, num_labels=2)
    cfg.peft = PeftConfig(method="bottleneck", options=options)
    return build_model(cfg, tokenizer, "sdpa")


def base_model(model_config: dict, tokenizer, task: str = "causal_lm"):
    cfg = Config()
    cfg.model = ModelConfig(config=model_config, task=task, num_labels=2)
    return build_model(cfg, tokenizer, "sdpa")


def ids_of(tokenizer) -> torch.Tensor:
    texts = ["The quick brown fox jumps over the lazy dog.", "What is two plus three? Two plus three is five."]
    return tokenizer(texts, return_tensors="pt", padding=True)["input_ids"]


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_adapted_model_computes_the_base_model_before_training(arch, tiny_llama_config, tiny_bert_config,
                                                               tiny_tokenizer):
    """Identity initialisation: up-projections start at zero, so the adapted model's outputs
    equal the base model's exactly (the same seed builds the same base weights)."""
    config = dict(tiny_llama_config if arch == "llama" else tiny_bert_config, initializer_range=0.3)
    task = "causal_lm" if arch == "llama" else "sequence_classification"
    adapted = bottleneck_model(config, tiny_tokenizer, task, reduction_factor=4).eval()
    base = base_model(config, tiny_tokenizer, task).eval()
    ids = ids_of(tiny_tokenizer)
    with torch.no_grad():
        assert torch.equal(adapted(input_ids=ids).logits, base(input_ids=ids).logits)
        # and the adapters are really in the path: a non-zero up-projection changes the output
        for module in adapted.modules():
            if isinstance(module, BottleneckAdapter):
                torch.nn.init.normal_(module.up.weight, std=0.5)
        assert not torch.allclose(adapted(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-3)


def test_adapters_sit_after_attention_and_mlp_of_every_layer(tiny_llama_config, tiny_bert_config, tiny_tokenizer):
    llama = bottleneck_model(tiny_llama_config, tiny_tokenizer)
    assert llama.bottleneck_adapters["modules"] == [f"model.layers.{i}.{name}" for i in range(2)
                                                    for name in ("self_attn.o_proj", "mlp.down_proj")]
    bert = bottleneck_model(tiny_bert_config, tiny_tokenizer, "sequence_classification", placement="attention",
                            reduction_factor=8)
    assert bert.bottleneck_adapters["modules"] == [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)]
    adapter = getattr(dict(bert.named_modules())["bert.encoder.layer.0.attention.output.dense"], ADAPTER)
    assert (adapter.down.in_features, adapter.down.out_features, adapter.up.out_features) == (32, 32 // 8, 32)
    assert adapter_sites(llama, ["mlp"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    # only the adapters train (and, for classification, the new head)
    assert all(ADAPTER in n for n, p in llama.named_parameters() if p.requires_grad)
    trainable = {n.split(".")[0] for n, p in bert.named_parameters() if p.requires_grad and ADAPTER not in n}
    assert trainable == {"classifier"}


@pytest.mark.parametrize("options, expected", [
    ({"reduction": 4}, "peft.options.reduction: not an option of bottleneck adapters; did you mean reduction_factor?"),
    ({"reduction_factor": 0}, "peft.options.reduction_factor: a number > 0"),
    ({"placement": ["mlp", "ffn"]}, "peft.options.placement: attention, mlp, both, or a list of attention and mlp"),
    ({"activation": "softmax"}, "peft.options.activation: one of relu, gelu, silu, swish, tanh, got 'softmax'"),
])
def test_wrong_options_name_the_key(options, expected):
    cfg = Config()
    cfg.model = ModelConfig(config={"model_type": "llama"})
    cfg.peft = PeftConfig(method="bottleneck", options=options)
    problems = peft_config_problems(cfg)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_a_model_without_a_linear_output_projection_is_refused(tiny_tokenizer):
    gpt2 = {"model_type": "gpt2", "vocab_size": 320, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128}
    with pytest.raises(ConfigError, match=r"peft.options.placement: attention, but layer 0 \(GPT2Block\) has no "
                                          r"attention block with a linear output projection"):
        bottleneck_model(gpt2, tiny_tokenizer)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A bottleneck run on the toy chat set, saving every 4 of 12 steps."""
    tmp = tmp_path_factory.mktemp("bottleneck")
    cfg = causal_config(tmp, rows=64, peft={"method": "bottleneck", "options": {"reduction_factor": 4}},
                        optim={"lr": 1e-2, "warmup_steps": 2}, train={"max_steps": 12, "save_every": 4},
                        checkpoint={"keep_last": 3})
    # A wider random init than the default 0.02, whose near-uniform outputs a frozen base
    # passes on almost whatever its adapters do.
    cfg["model"]["config"]["initializer_range"] = 0.3
    config = write_config(cfg, tmp / "config.yaml")
    trainer = Trainer(load_config(config))
    trainer.fit()
    trainer.strategy.model.eval()
    return {"trainer": trainer, "config": config, "tmp": tmp}


def test_loss_falls_and_only_the_adapters_change(trained):
    trainer = trained["trainer"]
    losses = step_losses(trainer.cfg.output_dir)
    assert losses[12] < losses[1] - 0.5, losses
    model = trainer.strategy.unwrapped_model()
    assert is_bottleneck_model(model)
    fresh = build_model(trainer.cfg, trainer.tokenizer, "sdpa")  # the same seed: the weights training started from
    start = dict(fresh.named_parameters())
    changed = {name for name, param in model.named_parameters() if not torch.equal(param, start[name])}
    adapters = {name for name, _ in model.named_parameters() if ADAPTER in name}
    assert changed and changed <= adapters
    assert {name for name in adapters if ".up." in name} <= changed  # every up-projection left zero


def test_resume_is_exact(trained):
    """Resumed from the checkpoint of step 4 (into a copy of the run), steps 5-12 log the
    uninterrupted run's losses."""
    trainer, tmp = trained["trainer"], trained["tmp"]
    expected = step_losses(trainer.cfg.output_dir)
    copy = tmp / "resumed"
    shutil.copytree(trainer.cfg.output_dir, copy)
    checkpoint = copy / "checkpoints" / "step-00000004"
    for later in complete_checkpoints(copy / "checkpoints")[1:]:
        shutil.rmtree(later)
    resumed = Trainer(load_config(trained["config"], [f"run.output_dir={copy}", f"checkpoint.resume={checkpoint}"]))
    assert resumed.start_step == 4
    resumed.fit()
    again = step_losses(copy)
    for step in range(5, 13):
        assert again[step] == pytest.approx(expected[step], rel=1e-6), step


def test_exported_adapter_folder_reloads_onto_the_base_to_the_same_logits(trained):
    trainer, tmp = trained["trainer"], trained["tmp"]
    checkpoint = complete_checkpoints(trainer.cfg.checkpoint_dir)[-1]
    folder = export_checkpoint(checkpoint, tmp / "adapter")  # what `finetrain export` runs
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("bottleneck")) == [CONFIG_FILE, WEIGHTS_FILE]
    assert not (folder / "model.safetensors").exists()  # the adapters only, not the base
    info = json.loads((folder / CONFIG_FILE).read_text())
    assert (info["reduction_factor"], info["placement"], info["bottleneck_size"]) == (4.0, ["attention", "mlp"], 8)

    ids = torch.tensor([trainer.tokenizer("reverse: alpha beta gamma")["input_ids"]] * 2)
    base = base_model(dict(trainer.cfg.model.config), trainer.tokenizer)
    with torch.no_grad():
        untouched = base(input_ids=ids).logits
        reloaded = load_bottleneck_adapters(base, folder).eval()(input_ids=ids).logits
        trained_logits = trainer.strategy.model(input_ids=ids).logits
    torch.testing.assert_close(reloaded, trained_logits, rtol=0, atol=1e-5)
    assert not torch.allclose(untouched, trained_logits, atol=1e-3)  # so the equality could fail

    other = base_model(dict(trainer.cfg.model.config, hidden_size=64, intermediate_size=64), trainer.tokenizer)
    with pytest.raises(UserError, match="adapters of hidden size 32, but LlamaForCausalLM has 64"):
        load_bottleneck_adapters(other, folder)


def test_merge_is_refused_saying_adapters_add_latency(trained, tiny_llama_config, tiny_tokenizer):
    trainer, tmp = trained["trainer"], trained["tmp"]
    with pytest.raises(UserError) as err:  # `finetrain export --merge`, before it builds anything
        export_checkpoint(complete_checkpoints(trainer.cfg.checkpoint_dir)[-1], tmp / "merged", merge=True)
    message = str(err.value)
    assert "\n" not in message and message.startswith("--merge: bottleneck adapters are layers of their own")
    assert "cannot be folded into the base weights, so they add latency by design" in message
    assert not (tmp / "merged").exists()
    with pytest.raises(UserError, match="add latency by design"):
        merge_adapter(bottleneck_model(tiny_llama_config, tiny_tokenizer))
