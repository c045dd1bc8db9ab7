"""The reference varlen attention: what the FlashAttention path receives keeps documents apart."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

import trainer.model.attention  # noqa: F401  registers varlen_reference

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


# ----------------------------------------------------------------------------- torch_varlen (torch's FlashAttention)


class FakeVarlen:
    """Stands in for torch.nn.attention.varlen.varlen_attn on CPU (the real one runs on CUDA only):
    records what it is called with and computes it with the reference kernel, reading the arguments
    as torch's API defines them (window_size (-1, 0) is causal; enable_gqa; scale)."""

    def __init__(self):
        self.calls = []

    def __call__(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                 window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        from trainer.model.attention import VarlenCall, reference_varlen

        assert query.dtype in (torch.float16, torch.bfloat16) and query.dim() == 3
        assert isinstance(max_q, int) and isinstance(max_k, int)
        assert enable_gqa == (query.shape[1] != key.shape[1])
        self.calls.append(dict(q=query, k=key, v=value, cu_q=cu_seq_q, cu_k=cu_seq_k, max_q=max_q, max_k=max_k,
                               scale=scale, window_size=window_size))
        left, right = window_size
        call = VarlenCall(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=right == 0,
                          scale=scale, sliding_window=None if left < 0 else left + 1)
        return reference_varlen(call)


class FakeVarlenTorch210(FakeVarlen):
    """torch 2.10's signature: `is_causal`, no scale or GQA (the backend adapts its call)."""

    def __call__(self, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        assert query.shape[1] == key.shape[1]  # kv heads repeated for it
        return super().__call__(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=query.shape[-1] ** -0.5,
                                window_size=(-1, 0) if is_causal else (-1, -1))


@pytest.fixture
def recorded(monkeypatch):
    """Every call of the reference kernel, and a fake torch varlen_attn (see FakeVarlen)."""
    import torch.nn.attention.varlen as varlen

    import trainer.model.attention as attention

    calls, kernel = [], attention.reference_varlen

    def reference(call):
        calls.append(call)
        return kernel(call)

    fake = FakeVarlen()
    monkeypatch.setattr(attention, "reference_varlen", reference)
    monkeypatch.setattr(varlen, "varlen_attn", fake)
    return calls, fake


def bf16(model, **inputs):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(**inputs).logits.float()


def input_layouts(docs: list[torch.Tensor]) -> dict[str, dict]:
    """The same documents as every input the trainer and generation give attention: packed with
    cu_seq_lens, packed with packing inferred from position_ids, padded rows, plain rows."""
    lengths = [len(d) for d in docs]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    width = max(lengths)
    padded = torch.stack([torch.cat([d, torch.zeros(width - len(d), dtype=torch.long)]) for d in docs])
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return {
        "packed": dict(input_ids=torch.cat(docs)[None], position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=width, max_length_k=width),
        "inferred": dict(input_ids=torch.cat(docs)[None], position_ids=positions),
        "padded": dict(input_ids=padded, attention_mask=mask),
        "rows": dict(input_ids=torch.stack([docs[0][:5], docs[1]])),
    }


def test_torch_varlen_receives_what_the_reference_receives(tiny_llama_config, recorded):
    """On every input the trainer and generation give it (packed rows flattened with cu_seq_lens,
    padded rows, plain rows, a KV cache), torch_varlen calls torch's kernel with exactly the
    tokens, cu_seq_lens and lengths the reference kernel gets, causal as window (-1, 0), GQA and
    the model's scale passed on; so its logits are the reference's (bf16 autocast, as it trains)."""
    reference_calls, fake = recorded
    model = tiny(tiny_llama_config)
    docs = documents(9, 5, 14)
    lengths = [len(d) for d in docs]
    cases = input_layouts(docs)
    del cases["inferred"]
    for name, inputs in cases.items():
        logits = {}
        for backend in ("varlen_reference", "torch_varlen"):
            model.set_attn_implementation(backend)
            reference_calls.clear(), fake.calls.clear()
            logits[backend] = bf16(model, **inputs)
        assert len(fake.calls) == len(reference_calls) == tiny_llama_config["num_hidden_layers"], name
        for mine, ref in zip(fake.calls, reference_calls):
            for key in ("q", "k", "v", "cu_q", "cu_k"):
                assert torch.equal(mine[key], getattr(ref, key)), (name, key)
            assert (mine["max_q"], mine["max_k"], mine["scale"]) == (ref.max_q, ref.max_k, ref.scale), name
            assert mine["window_size"] == (-1, 0) and ref.causal, name
        assert torch.equal(logits["torch_varlen"], logits["varlen_reference"]), name
        if name == "packed":  # and that is each document alone
            alone_logits = [bf16(model, input_ids=d[None])[0] for d in docs]
            model.set_attn_implementation("torch_varlen")
            assert max_diff(list(logits["torch_varlen"][0].split(lengths)), alone_logits) < 0.05

    # a KV cache (generation): queries are the last positions, causal alignment bottom-right
    model.config.use_cache = True
    prompt = torch.stack([docs[0][:5], torch.cat([torch.zeros(2, dtype=torch.long), docs[1][:3]])])
    prompt_mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])  # left padding, as trainer.eval.generation pads
    for backend in ("varlen_reference", "torch_varlen"):
        model.set_attn_implementation(backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=4, do_sample=False,
                                 use_cache=True)
        logits[backend] = out
    assert torch.equal(logits["torch_varlen"], logits["varlen_reference"])
    assert any(call["q"].shape[0] == 2 and call["max_k"] > 1 for call in fake.calls)  # one new token per row


def test_torch_varlen_on_the_torch_210_signature(tiny_llama_config, monkeypatch):
    """torch 2.10's varlen_attn takes is_causal and neither scale nor GQA: the backend repeats the
    kv heads and scales the queries itself, and the result is the reference's."""
    import torch.nn.attention.varlen as varlen

    monkeypatch.setattr(varlen, "varlen_attn", FakeVarlenTorch210())
    model = tiny(tiny_llama_config)
    docs = documents(9, 5)
    inputs = dict(input_ids=torch.stack(docs[:1]))
    logits = {}
    for backend in ("varlen_reference", "torch_varlen"):
        model.set_attn_implementation(backend)
        logits[backend] = bf16(model, **inputs)
    assert torch.equal(logits["torch_varlen"], logits["varlen_reference"])


def test_torch_varlen_is_refused_on_cpu_in_one_line(tmp_path):
    from trainer.config.schema import Config, DatasetConfig, ModelConfig
    from trainer.plan import resolve_attention
    from trainer.runtime.errors import ConfigError

    cfg = Config(model=ModelConfig(config={"model_type": "llama"}, attention="torch_varlen"),
                 data=Config().data)
    cfg.data.datasets = [DatasetConfig(name="d", path="d", format="text")]
    with pytest.raises(ConfigError) as err:
        resolve_attention(cfg, "cpu")
    message = str(err.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("model.attention: torch_varlen cannot run here: torch's FlashAttention kernels run on "
                              "a CUDA GPU, and this process runs on cpu"), message
    from trainer.model.attention import activate_flash_attention_3

    assert not activate_flash_attention_3(torch.device("cpu"))


# ----------------------------------------------------------------------------- sdpa_varlen (sdpa per document)


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_sdpa_varlen_computes_what_the_reference_does(tiny_llama_config, sliding_window):
    """sdpa one sequence at a time: the reference's logits and gradients (float32, 1e-5) on every
    input (packed with cu_seq_lens, packing inferred from position_ids, padded rows, plain rows),
    with a sliding window too (Mistral), and the same greedy answers with a left-padded KV cache."""
    config = dict(tiny_llama_config, model_type="mistral", sliding_window=sliding_window) if sliding_window \
        else tiny_llama_config
    model = tiny(config)
    docs = documents(9, 5, 14)
    cases = input_layouts(docs)
    mask = cases["padded"]["attention_mask"]
    for name, inputs in cases.items():
        results = {}
        for backend in ("varlen_reference", "sdpa_varlen"):
            model.set_attn_implementation(backend)
            model.zero_grad()
            logits = model(**inputs).logits
            logits.square().mean().backward()
            results[backend] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
        (ref_logits, ref_grads), (logits, grads) = results["varlen_reference"], results["sdpa_varlen"]
        if name == "padded":  # outputs at padding positions are not compared
            ref_logits, logits = ref_logits[mask.bool()], logits[mask.bool()]
        torch.testing.assert_close(logits, ref_logits, rtol=TOL, atol=TOL, msg=lambda m: f"{name}: {m}")
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=TOL, atol=TOL, msg=lambda m: f"{name}: {m}")
    prompt = torch.stack([docs[0][:5], torch.cat([torch.zeros(2, dtype=torch.long), docs[1][:3]])])
    prompt_mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    model.config.use_cache = True
    answers = {}
    for backend in ("varlen_reference", "sdpa_varlen"):
        model.set_attn_implementation(backend)
        answers[backend] = model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=6, do_sample=False,
                                          use_cache=True)
    assert torch.equal(answers["sdpa_varlen"], answers["varlen_reference"])


def test_sdpa_varlen_computes_in_float32_on_cpu_under_bf16_autocast():
    """Under bf16 autocast on a CPU the per-document attention runs in fp32 (torch's CPU flash
    backward is several times slower in bf16), autocast not casting it back, and hands bf16 back:
    the result is the fp32 computation's, rounded once."""
    from trainer.model.attention import VarlenCall, sdpa_varlen

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(20, h, 8, generator=gen).to(torch.bfloat16).requires_grad_() for h in (4, 2, 2))
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    call = VarlenCall(q, k, v, cu, cu, 13, 13, causal=True, scale=8 ** -0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sdpa_varlen(call)
    fp32 = VarlenCall(q.float(), k.float(), v.float(), cu, cu, 13, 13, causal=True, scale=8 ** -0.5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, sdpa_varlen(fp32).to(torch.bfloat16))
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16
