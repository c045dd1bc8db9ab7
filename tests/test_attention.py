"""The reference varlen attention: what the FlashAttention path receives keeps documents apart."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

import trainer.attention  # noqa: F401  registers varlen_reference

TOL = 1e-5


def tiny(config: dict, cls=AutoModelForCausalLM, attention: str = "sdpa", **extra):
    params = dict(config, **extra)
    model_config = AutoConfig.for_model(params.pop("model_type"), **params)
    model_config.use_cache = False
    torch.manual_seed(0)
    return cls.from_config(model_config, attn_implementation=attention).eval()


def documents(*lengths: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 320, (n,), generator=gen) for n in lengths]


def alone(model, docs: list[torch.Tensor]) -> list[torch.Tensor]:
    model.set_attn_implementation("sdpa")
    return [model(doc[None]).logits[0] for doc in docs]


def packed(model, docs: list[torch.Tensor], cu: list[int] | None = None) -> list[torch.Tensor]:
    """Documents flattened into one row with cu_seq_lens, as the FlashAttention path gets them."""
    model.set_attn_implementation("varlen_reference")
    lengths = [len(d) for d in docs]
    cu = torch.tensor(cu if cu is not None else [0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    row = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    longest = int(cu.diff().max())
    logits = model(row, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                   max_length_q=longest, max_length_k=longest).logits[0]
    return list(logits.split(lengths))


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b))


def test_packed_documents_match_each_alone(tiny_llama_config):
    model = tiny(tiny_llama_config)
    docs = documents(9, 5, 14)
    assert max_diff(packed(model, docs), alone(model, docs)) < TOL


def test_packed_gradients_match_each_alone(tiny_llama_config):
    model = tiny(tiny_llama_config)
    docs = documents(9, 5, 14)

    def grads(logits):
        model.zero_grad()
        sum(l.square().mean() for l in logits).backward()
        return [p.grad.clone() for p in model.parameters()]

    for g_packed, g_alone in zip(grads(packed(model, docs)), grads(alone(model, docs))):
        assert torch.allclose(g_packed, g_alone, atol=TOL, rtol=0)


def test_changing_one_document_leaves_the_other_unchanged(tiny_llama_config):
    model = tiny(tiny_llama_config)
    a, b = documents(8, 6)
    a_changed = a.clone()
    a_changed[2:] = (a_changed[2:] + 17) % 320
    before, after = packed(model, [a, b]), packed(model, [a_changed, b])
    assert max_diff(before[:1], after[:1]) > 1e-3  # the change is visible in A ...
    assert max_diff(before[1:], after[1:]) == 0.0  # ... and nowhere in B


def test_one_sequence_over_two_documents_leaks(tiny_llama_config):
    """The comparison above detects a leak: cu_seq_lens spanning both documents breaks it."""
    model = tiny(tiny_llama_config)
    docs = documents(8, 6)
    leaked = packed(model, docs, cu=[0, 14])
    assert max_diff(leaked[1:], alone(model, docs)[1:]) > 1e-3


def test_packing_inferred_from_position_ids_for_one_row(tiny_llama_config):
    """Without cu_seq_lens, a single packed row is split where position_ids restart, as FA2 does."""
    model = tiny(tiny_llama_config, attention="varlen_reference")
    docs = documents(7, 10)
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    logits = model(torch.cat(docs)[None], position_ids=position_ids).logits[0]
    assert max_diff(list(logits.split([7, 10])), alone(model, docs)) < TOL


def test_padded_batch_matches_unpadded(tiny_llama_config):
    model = tiny(tiny_llama_config)
    docs = documents(11, 4, 7)
    width = max(len(d) for d in docs)
    for left in (False, True):
        rows, mask = [], []
        for d in docs:
            pad = torch.zeros(width - len(d), dtype=torch.long)
            keep = torch.ones(len(d), dtype=torch.long)
            rows.append(torch.cat([pad, d] if left else [d, pad]))
            mask.append(torch.cat([pad, keep] if left else [keep, pad]))
        mask = torch.stack(mask)
        model.set_attn_implementation("varlen_reference")
        logits = model(torch.stack(rows), attention_mask=mask).logits
        per_doc = [row[m.bool()] for row, m in zip(logits, mask)]
        assert max_diff(per_doc, alone(model, docs)) < TOL


def test_encoder_padded_batch_matches_sdpa(tiny_bert_config):
    """Non-causal (BERT): is_causal comes from the module, padding from the 2D mask."""
    model = tiny(tiny_bert_config, cls=AutoModelForSequenceClassification, num_labels=3)
    docs = documents(10, 6)
    expected = torch.cat([model(d[None]).logits for d in docs])
    rows = torch.stack([docs[0], torch.cat([docs[1], torch.zeros(4, dtype=torch.long)])])
    mask = (torch.arange(10)[None] < torch.tensor([[10], [6]])).long()
    model.set_attn_implementation("varlen_reference")
    assert torch.allclose(model(rows, attention_mask=mask).logits, expected, atol=TOL, rtol=0)


def test_traps_that_would_leak_under_flash_attention_are_refused(tiny_llama_config):
    model = tiny(tiny_llama_config, attention="varlen_reference")
    rows = torch.stack(documents(6, 6))
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    restart = torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)
    with pytest.raises(ValueError, match="batch size 2"):
        model(rows, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=3, max_length_k=3)
    with pytest.raises(ValueError, match="position_ids restart"):
        model(rows, position_ids=restart)
    with pytest.raises(ValueError, match="ignore cu_seq_lens"):
        model(rows[:1], attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0]]),
              cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=3, max_length_k=3)
    with pytest.raises(ValueError, match="rise from 0 to the 6"):
        short = torch.tensor([0, 3, 5], dtype=torch.int32)
        model(rows[:1], cu_seq_lens_q=short, cu_seq_lens_k=short, max_length_q=3, max_length_k=3)
    with pytest.raises(ValueError, match="max_length_q=2"):
        model(rows[:1], cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=2, max_length_k=3)
