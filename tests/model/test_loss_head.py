"""The target-only, chunked LM head (`train.fused_loss`) computes the loss and gradients
of the plain head and full logits (float32, 1e-5 relative): alone, inside every peft
method, with tied embeddings, in evaluation; and where it cannot stand in, the plain
head runs and says why. Packed == padded with it: test_data_packing.py; every strategy:
test_parallel.py."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from trainer.build import build_model
from trainer.config.schema import Config, ModelConfig, PeftConfig, TrainConfig
from trainer.model.loss import IGNORE_INDEX, forward_summed_loss
from trainer.model.loss_head import TargetOnlyHead, fused_head, linear_cross_entropy, linear_token_log_probs
from trainer.runtime.errors import ConfigError

RTOL = 1e-5


def assert_close_in_norm(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL, what: str = "") -> None:
    """|got - want| <= rtol |want| over the whole tensor: float32 sums in another order
    differ elementwise by far more than 1e-5 where a gradient element cancels to ~0."""
    error = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
    assert error <= rtol, f"{what}: relative error {error:.2e} > {rtol:g}"


def plain_linear_cross_entropy(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")


def loss_and_grads(loss_fn, tensors):
    loss = loss_fn(*tensors)
    wanted = [t for t in tensors if torch.is_tensor(t) and t.requires_grad]
    return loss.detach(), torch.autograd.grad(loss * 0.37, wanted)  # a scale as the loop's 1/count


@pytest.mark.parametrize("chunk", [1, 7, 1000])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen_weight", [False, True])
def test_chunked_loss_and_gradients_equal_full_cross_entropy(chunk, bias, frozen_weight):
    torch.manual_seed(0)
    hidden = torch.randn(45, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=not frozen_weight)
    b = torch.randn(50, requires_grad=True) if bias else None
    targets = torch.randint(0, 50, (45,))
    want = loss_and_grads(plain_linear_cross_entropy, (hidden, weight, b, targets))
    got = loss_and_grads(lambda *t: linear_cross_entropy(*t, chunk=chunk), (hidden, weight, b, targets))
    torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=0)
    assert len(got[1]) == len(want[1]) == 1 + (not frozen_weight) + bias
    for g, w in zip(got[1], want[1]):
        assert_close_in_norm(g, w)


def test_under_bf16_autocast_the_matmuls_run_in_bf16_and_the_softmax_in_fp32():
    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(64, 32, requires_grad=True)
    targets = torch.randint(0, 64, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = loss_and_grads(plain_linear_cross_entropy, (hidden, weight, None, targets))
        got = loss_and_grads(lambda *t: linear_cross_entropy(*t, chunk=16), (hidden, weight, None, targets))
    exact = loss_and_grads(plain_linear_cross_entropy, (hidden, weight, None, targets))
    assert got[0].dtype == torch.float32 and [g.dtype for g in got[1]] == [torch.float32] * 2
    torch.testing.assert_close(got[0], want[0], rtol=1e-3, atol=0)
    assert not torch.equal(got[0], exact[0])  # the bf16 matmul did run
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_no_targets_give_zero_loss_and_zero_gradients():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, None, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and not weight.grad.any()


def test_evaluation_computes_no_gradient_buffers():
    hidden = torch.randn(12, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    targets = torch.randint(0, 10, (12,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, None, targets, chunk=5)
    assert not loss.requires_grad
    want = plain_linear_cross_entropy(hidden, weight, None, targets).detach()
    torch.testing.assert_close(loss, want, rtol=RTOL, atol=0)


# ----------------------------------------------------------------------------- in a model


def make_model(tokenizer, fused: bool, peft: str = "none", tied: bool = False, **config):
    from helpers import TINY_LLAMA

    cfg = Config(model=ModelConfig(config={**TINY_LLAMA, "tie_word_embeddings": tied, **config}, tokenizer="train-bpe"),
                 peft=PeftConfig(method=peft, r=4, num_virtual_tokens=3), train=TrainConfig(fused_loss=fused))
    model = build_model(cfg, tokenizer, "sdpa")
    torch.manual_seed(1)
    with torch.no_grad():  # peft starts lora_B at zero; random values give every adapter a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model


def padded_batch(seed: int = 0):
    """Three rows: a masked prompt of 5 tokens, one row ending in padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 320, (3, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "use_cache": False}, labels


def run(model, inputs, labels):
    model.zero_grad(set_to_none=True)
    loss = forward_summed_loss(model, inputs, labels, "causal_lm")
    (loss / 7).backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=0)
    assert got[1].keys() == want[1].keys() and got[1]
    for name in want[1]:
        assert_close_in_norm(got[1][name], want[1][name], what=name)


@pytest.mark.parametrize("peft", ["none", "lora", "dora", "ia3", "prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("tied", [False, True])
def test_fused_head_trains_like_the_plain_head(tiny_tokenizer, peft, tied):
    """Full fine-tuning (head trained) and every peft method (head frozen; prompt tuning's
    virtual tokens before the labels, prefix tuning's cache), tied embeddings or not."""
    inputs, labels = padded_batch()
    plain, fused = make_model(tiny_tokenizer, False, peft, tied), make_model(tiny_tokenizer, True, peft, tied)
    assert fused_head(plain) is None and isinstance(fused_head(fused), TargetOnlyHead)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    got = run(fused, inputs, labels)
    assert_same(got, run(plain, inputs, labels))
    if peft == "none":  # the head trains (tied: through the embedding it shares)
        assert ("model.embed_tokens.weight" if tied else "lm_head.weight") in got[1]


def test_fused_head_evaluates_like_the_plain_head(tiny_tokenizer):
    inputs, labels = padded_batch(seed=3)
    plain, fused = make_model(tiny_tokenizer, False), make_model(tiny_tokenizer, True)
    with torch.no_grad():
        got = forward_summed_loss(fused.eval(), inputs, labels, "causal_lm")
        want = forward_summed_loss(plain.eval(), inputs, labels, "causal_lm")
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)
    # outside a loss forward the head is the plain linear: generation and export see logits
    torch.testing.assert_close(fused(**inputs).logits, plain(**inputs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["lora on lm_head", "soft-capped logits", "fused_loss false", "classification"])
def test_plain_head_where_the_fused_head_cannot_stand_in(tiny_tokenizer, tiny_bert_config, case, caplog):
    from helpers import TINY_LLAMA

    cfg = Config(model=ModelConfig(config=dict(TINY_LLAMA), tokenizer="train-bpe"))
    if case == "lora on lm_head":
        cfg.peft = PeftConfig(method="lora", r=4, target_modules=["q_proj", "lm_head"])
    elif case == "soft-capped logits":
        cfg.model.config = {**TINY_LLAMA, "model_type": "gemma2", "head_dim": 8, "final_logit_softcapping": 30.0,
                            "tie_word_embeddings": True}
    elif case == "fused_loss false":
        cfg.train.fused_loss = False
    else:
        cfg.model = ModelConfig(config=tiny_bert_config, tokenizer="train-bpe", task="sequence_classification")
    with caplog.at_level(logging.INFO, logger="finetrain"):
        model = build_model(cfg, tiny_tokenizer, "eager" if case == "soft-capped logits" else "sdpa")
    assert fused_head(model) is None
    said = [r.message for r in caplog.records if r.message.startswith("train.fused_loss")]
    if case in ("lora on lm_head", "soft-capped logits"):
        assert len(said) == 1 and ("lora" in said[0].lower() if case.startswith("lora") else "softcapping" in said[0])
        inputs, labels = padded_batch()
        assert torch.isfinite(forward_summed_loss(model, inputs, labels, "causal_lm"))
    else:
        assert not said


def test_a_model_that_changes_the_head_output_is_refused(tiny_tokenizer):
    """A logit transform after the head that the install did not foresee: the first forward
    stops with a ConfigError naming the key, rather than training on a transformed loss."""
    model = make_model(tiny_tokenizer, True)
    model.register_forward_hook(lambda module, args, output: output.__setitem__("logits", output.logits * 2))
    inputs, labels = padded_batch()
    with pytest.raises(ConfigError, match=r"^train\.fused_loss: .* set train\.fused_loss=false"):
        forward_summed_loss(model, inputs, labels, "causal_lm")


@pytest.mark.parametrize("chunk", [5, 256])
def test_token_log_probs_and_their_gradients_equal_the_full_log_softmax(chunk):
    """The per-target log-probabilities preference losses weigh one by one (the gradient comes back
    per position and is formed in backward, recomputing each chunk's logits)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=gen, requires_grad=True)
    weight = torch.randn(40, 16, generator=gen, requires_grad=True)
    bias = torch.randn(40, generator=gen, requires_grad=True)
    targets = torch.randint(0, 40, (23,), generator=gen)
    upstream = torch.randn(23, generator=gen)  # a different weight on each position, as a sequence sum gives
    got = linear_token_log_probs(hidden, weight, bias, targets, chunk)
    want = F.linear(hidden, weight, bias).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL)
    for g, w in zip(torch.autograd.grad((got * upstream).sum(), (hidden, weight, bias)),
                    torch.autograd.grad((want * upstream).sum(), (hidden, weight, bias))):
        assert_close_in_norm(g, w)
