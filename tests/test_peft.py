"""peft methods: only the adapter trains, it learns, and merging changes nothing."""

from __future__ import annotations

import pytest
import torch

from trainer.config import Config, ModelConfig, PeftConfig
from trainer.models import build_model
from trainer.peft import is_peft_model, merge_adapter

METHODS = ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning"]
ADAPTER_NAMES = {"lora": ("lora_",), "dora": ("lora_",), "ia3": ("ia3_",),
                 "prompt_tuning": ("prompt_encoder",), "prefix_tuning": ("prompt_encoder",)}
HEAD_NAMES = ("score", "classifier")


def peft_model(model_config: dict, tokenizer, method: str, task: str = "causal_lm", attention: str = "sdpa", **peft_keys):
    cfg = Config()
    cfg.model = ModelConfig(config=model_config, task=task, num_labels=2)
    cfg.peft = PeftConfig(method=method, r=4, alpha=8, num_virtual_tokens=4, **peft_keys)
    return build_model(cfg, tokenizer, attention)


def fixed_batch(tokenizer) -> dict:
    texts = ["The quick brown fox jumps over the lazy dog.", "What is two plus three? Two plus three is five."]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


def train(model, batch: dict, steps: int, lr: float) -> list[float]:
    torch.manual_seed(0)  # dropout (BERT's) draws from the global RNG
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("method", METHODS)
def test_only_the_adapter_trains_and_loss_falls(method, tiny_llama_config, tiny_tokenizer):
    # A wider random init than the default 0.02, whose near-uniform outputs an adapter of a
    # few hundred parameters (ia3, prompt tuning) barely moves in a few steps.
    model = peft_model(dict(tiny_llama_config, initializer_range=0.3), tiny_tokenizer, method)
    assert is_peft_model(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(any(tag in n for tag in ADAPTER_NAMES[method]) for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = train(model, fixed_batch(tiny_tokenizer), steps=8, lr=1e-1)
    assert losses[-1] < losses[0] - 0.25, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_ia3_scales_mlp_inputs_and_other_outputs(tiny_llama_config, tiny_tokenizer):
    model = peft_model(tiny_llama_config, tiny_tokenizer, "ia3")
    layer = model.get_base_model().model.layers[0]
    assert layer.mlp.down_proj.is_feedforward
    assert not any(m.is_feedforward for m in (layer.mlp.up_proj, layer.mlp.gate_proj, layer.self_attn.k_proj))
    assert not hasattr(model.get_base_model().lm_head, "ia3_l")


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_merged_model_gives_the_adapter_logits(method, tiny_llama_config, tiny_tokenizer):
    model = peft_model(tiny_llama_config, tiny_tokenizer, method)
    batch = fixed_batch(tiny_tokenizer)
    train(model, batch, steps=4, lr=5e-2)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        adapted = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
        merged_model = merge_adapter(model)
        merged = merged_model(**inputs).logits
    assert not is_peft_model(merged_model) and type(merged_model).__name__ == "LlamaForCausalLM"
    assert float((adapted - base).abs().max()) > 1e-2  # the adapter does something, so equality means something
    assert torch.allclose(merged, adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_cannot_merge(method, tiny_llama_config, tiny_tokenizer):
    model = peft_model(tiny_llama_config, tiny_tokenizer, method)
    with pytest.raises(ValueError, match=f"peft.method {method} cannot be merged"):
        merge_adapter(model)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_lora_classification_trains_the_head(arch, tiny_llama_config, tiny_bert_config, tiny_tokenizer):
    model_config = tiny_llama_config if arch == "llama" else tiny_bert_config
    model = peft_model(model_config, tiny_tokenizer, "lora", task="sequence_classification")
    head = [n for n, p in model.named_parameters() if p.requires_grad and any(h in n for h in HEAD_NAMES)]
    assert head, "the new classification head must be trainable"
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in head}
    batch = fixed_batch(tiny_tokenizer)
    batch["labels"] = torch.tensor([0, 1])
    losses = train(model, batch, steps=10, lr=3e-2)
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in head)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        adapted = model(**inputs).logits
        merged = merge_adapter(model)(**inputs).logits  # the trained head survives the merge
    assert torch.allclose(merged, adapted, atol=1e-5, rtol=0)


def test_prefix_tuning_padded_on_varlen_reference_matches_sdpa(tiny_llama_config, tiny_tokenizer):
    """Prefix tuning hands attention more keys than queries: the reference aligns them as flash_attn does."""
    batch = fixed_batch(tiny_tokenizer)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = {}
    for attention in ("sdpa", "varlen_reference"):
        model = peft_model(tiny_llama_config, tiny_tokenizer, "prefix_tuning", attention=attention).eval()
        with torch.no_grad():
            logits[attention] = model(**inputs).logits * inputs["attention_mask"][..., None]
    assert torch.allclose(logits["sdpa"], logits["varlen_reference"], atol=1e-5, rtol=0)


def test_methods_a_model_cannot_take_are_refused(tiny_llama_config, tiny_tokenizer):
    with pytest.raises(ValueError, match="peft.method prompt_tuning: LlamaForSequenceClassification classifies"):
        peft_model(tiny_llama_config, tiny_tokenizer, "prompt_tuning", task="sequence_classification")
    with pytest.raises(ValueError, match="peft.method lora: cannot be applied to LlamaForCausalLM"):
        peft_model(tiny_llama_config, tiny_tokenizer, "lora", target_modules=["no_such_proj"])
    with pytest.raises(ValueError, match="peft.target_modules: \\['no_such_proj'\\] selects no linear layer"):
        peft_model(tiny_llama_config, tiny_tokenizer, "ia3", target_modules=["no_such_proj"])
