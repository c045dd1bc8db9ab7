"""peft methods: any of the installed peft's by name, options checked by its config class;
only the adapter trains, it learns, merging changes nothing, the saved adapter reloads."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import causal_config, planned, write_config
from trainer.build import build_model, build_training
from trainer.config.schema import Config, ModelConfig, PeftConfig, load_config
from trainer.peft.methods import (UNTRAINABLE, can_merge, is_peft_model, known_methods, merge_adapter,
                                  peft_config_problems, peft_keys)
from trainer.plan import plan_run
from trainer.runtime.errors import ConfigError

# The methods users reach for (the strategy x method matrix of tests/parallel/test_strategies.py).
METHODS = ["lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "loha", "lokr", "oft", "vera", "adalora",
           "ln_tuning"]
ADAPTER_NAMES = {"lora": ("lora_",), "dora": ("lora_",), "ia3": ("ia3_",),
                 "prompt_tuning": ("prompt_encoder",), "prefix_tuning": ("prompt_encoder",), "loha": ("hada_",),
                 "lokr": ("lokr_",), "oft": ("oft_",), "vera": ("vera_lambda_",), "adalora": ("lora_",),
                 "ln_tuning": ("ln_tuning_layers",)}
MERGEABLE = [m for m in METHODS if m not in ("prompt_tuning", "prefix_tuning")]
HEAD_NAMES = ("score", "classifier")


def peft_model(model_config: dict, tokenizer, method: str, task: str = "causal_lm", attention: str = "sdpa",
               total_steps: int = 8, **keys):
    """A tiny model with the adapter of `method` (small sizes where the method takes them)."""
    cfg = Config()
    cfg.model = ModelConfig(config=model_config, task=task, num_labels=2)
    generic = {key: value for key, value in (("r", 4), ("alpha", 8), ("num_virtual_tokens", 4))
               if key in peft_keys(method) and key not in keys}
    cfg.peft = PeftConfig(method=method, **generic, **keys)
    return build_model(cfg, tokenizer, attention, total_steps)


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


@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_model_gives_the_adapter_logits(method, tiny_llama_config, tiny_tokenizer):
    assert can_merge(method)
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
    assert not can_merge(method)
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


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_reloads_onto_the_base_with_the_same_logits(method, tmp_path, tiny_llama_config, tiny_tokenizer):
    """What `finetrain export` writes without --merge (the peft adapter folder) loads with
    peft onto a freshly built base and computes the trained model's logits."""
    from peft import PeftModel

    config = dict(tiny_llama_config, initializer_range=0.3)
    model = peft_model(config, tiny_tokenizer, method)
    batch = fixed_batch(tiny_tokenizer)
    train(model, batch, steps=3, lr=5e-2)
    model.save_pretrained(tmp_path / "adapter")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    base = peft_model(config, tiny_tokenizer, "none")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    length = inputs["input_ids"].shape[1]  # prompt tuning's logits include its virtual tokens
    with torch.no_grad():
        trained, again = model(**inputs).logits[:, -length:], reloaded(**inputs).logits[:, -length:]
        with model.disable_adapter():
            untouched = model(**inputs).logits
    assert float((trained - untouched).abs().max()) > 1e-3  # the adapter changed something
    torch.testing.assert_close(again, trained, rtol=0, atol=1e-5)


def checked(method: str, options: dict | None = None, **keys) -> list[str]:
    """peft_config_problems of a config with these peft keys (packing off: prompt methods)."""
    cfg = Config()
    cfg.model = ModelConfig(config={"model_type": "llama"})
    cfg.data.packing = False
    cfg.train.max_steps = 10
    cfg.peft = PeftConfig(method=method, options=options or {}, **keys)
    return peft_config_problems(cfg)


def test_every_method_of_the_installed_peft_is_known():
    import peft
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    names = {t.value.lower() for t in PEFT_TYPE_TO_CONFIG_MAPPING}
    assert names <= set(known_methods()) and {"none", "dora", "bottleneck"} <= set(known_methods())
    assert len(names) > 30, peft.__version__
    for method in sorted(names - set(UNTRAINABLE)):  # options left to each config's defaults are valid
        assert checked(method) == [], method


def test_options_reach_the_method_config(tiny_llama_config, tiny_tokenizer):
    lora = peft_model(tiny_llama_config, tiny_tokenizer, "lora", options={"use_rslora": True})
    q_proj = lora.get_base_model().model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # alpha / sqrt(r): rsLoRA
    oft = peft_model(tiny_llama_config, tiny_tokenizer, "oft", options={"oft_block_size": 8})
    assert oft.peft_config["default"].oft_block_size == 8
    assert oft.get_base_model().model.layers[0].self_attn.q_proj.oft_R["default"].weight.shape[0] == 32 // 8
    loha = peft_model(tiny_llama_config, tiny_tokenizer, "loha", r=2)
    assert loha.get_base_model().model.layers[0].mlp.up_proj.hada_w1_a["default"].shape[1] == 2  # peft.r -> r
    adalora = peft_model(tiny_llama_config, tiny_tokenizer, "adalora", r=4, total_steps=30)
    assert (adalora.peft_config["default"].target_r, adalora.peft_config["default"].init_r,
            adalora.peft_config["default"].total_step) == (4, 6, 30)


@pytest.mark.parametrize("method, options, keys, expected", [
    ("loha", {"rnk_dropout": 0.1}, {}, "peft.options.rnk_dropout: not an option of peft's LoHaConfig (peft.method loha); "
                                       "did you mean rank_dropout?"),
    ("lora", {"lora_alpha": 4}, {}, "peft.options.lora_alpha: set peft.alpha instead"),
    ("lora", {"task_type": "SEQ_CLS"}, {}, "peft.options.task_type: set from model.task, not an option"),
    ("adalora", {"total_step": 3}, {}, "peft.options.total_step: set to the run's optimizer steps, not an option"),
    ("adalora", {"tinit": 20}, {}, "peft.options: adalora (AdaLoraConfig) refuses them: "),
    ("loha", {}, {"dropout": 0.1}, "peft.dropout: peft.method loha has no input dropout; see peft.options "
                                   "(rank_dropout, module_dropout)"),
    ("oft", {}, {"r": 4}, "peft.r: peft.method oft has no rank; see peft.options (r, oft_block_size, block_share)"),
    ("prefix_tuning", {}, {"alpha": 2.0}, "peft.alpha: peft.method prefix_tuning has no scaling alpha; leave it unset"),
    ("lorra", {}, {}, "peft.method: 'lorra' is not a method of peft"),
    ("poly", {}, {}, "peft.method: poly routes each row through skills chosen by a task id"),
])
def test_wrong_peft_keys_are_one_line_naming_the_key(method, options, keys, expected):
    problems = checked(method, options, **keys)
    assert len(problems) == 1 and problems[0].startswith(expected), problems
    assert "\n" not in problems[0]


def test_a_wrong_option_stops_the_run_with_one_line_and_exit_2(tmp_path, capsys):
    """As every entry point reports it: one line at the key's line of the config, exit code 2."""
    from trainer.runtime.errors import report_user_error

    cfg = causal_config(tmp_path, peft={"method": "loha", "options": {"rank_dropuot": 0.1}})
    path = write_config(cfg, tmp_path / "config.yaml")
    with pytest.raises(ConfigError) as err:
        plan_run(load_config(path), 1, "cpu")
    assert report_user_error(err.value, path) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "rank_dropuot" in text)
    assert len(lines) == 1 and re.fullmatch(
        rf"finetrain: {re.escape(str(path))}:{line}: peft\.options\.rank_dropuot: not an option of peft's LoHaConfig "
        r"\(peft\.method loha\); did you mean rank_dropout\?", lines[0]), lines
    assert load_config(path, ["peft.options={rank_dropout: 0.1}"]).peft.options == {"rank_dropout": 0.1}


def test_a_method_the_model_cannot_take_is_refused_at_build(tiny_llama_config, tiny_tokenizer):
    with pytest.raises(ConfigError, match=r"peft.method vblora: cannot be applied to LlamaForCausalLM: .*in_features.* "
                                          r"must be divisible by .*vector_length"):
        peft_model(tiny_llama_config, tiny_tokenizer, "vblora")


def test_adalora_penalty_and_rank_allocation_run_in_the_step(tiny_llama_config, tiny_tokenizer):
    """AdaLoRA: the orthogonality penalty is part of the training loss (once per step, however
    the rows are split), and the rank budget is re-allocated after every optimizer step:
    singular values over the budget are masked to zero."""
    from trainer.model.loss import forward_summed_loss
    from trainer.peft.methods import adapter_regularizer, with_adapter_penalty
    from trainer.runtime.distributed import DistInfo

    cfg = Config()
    cfg.model = ModelConfig(config=dict(tiny_llama_config, initializer_range=0.3))
    cfg.peft = PeftConfig(method="adalora", r=2, options={"init_r": 4, "tinit": 1, "tfinal": 1, "deltaT": 1})
    cfg.optim.lr = 1e-2
    steps = cfg.train.max_steps = 6
    model = build_model(cfg, tiny_tokenizer, "sdpa", total_steps=steps)
    batch = fixed_batch(tiny_tokenizer)
    labels = batch.pop("labels")
    penalty = float(adapter_regularizer(model))
    assert penalty > 0
    with torch.no_grad():
        assert adapter_regularizer(model) is None  # evaluation losses are plain cross-entropy
    def training_loss(inputs, rows):  # as the loop's train_step sums a micro-batch's loss
        return float(with_adapter_penalty(model, forward_summed_loss(model, inputs, rows, "causal_lm"),
                                          int((rows[:, 1:] != -100).sum())))

    plain = training_loss(batch, labels)
    halves = sum(training_loss({k: v[i:i + 1] for k, v in batch.items()}, labels[i:i + 1]) for i in range(2))
    targets = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        no_penalty = float(forward_summed_loss(model, batch, labels, "causal_lm"))
    assert plain == pytest.approx(no_penalty + penalty * targets, rel=1e-5)
    assert halves == pytest.approx(plain, rel=1e-5)

    one_rank = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo")
    strategy = build_training(cfg, planned(cfg), one_rank, tiny_tokenizer, steps, lambda: model).strategy
    ranks = []
    for _ in range(steps):
        forward_summed_loss(strategy.model, batch, labels, "causal_lm").backward()
        strategy.step()
        e = [p for n, p in model.named_parameters() if ".lora_E." in n]
        ranks.append(sum(int((p != 0).sum()) for p in e))
    # 4 singular values per adapted layer at first, 2 on average once the budget is final
    assert ranks[0] == 4 * len(e) and ranks[-1] == 2 * len(e), ranks


def test_adalora_resumes_exactly_with_its_importance_scores(tmp_path):
    """AdaLoRA's importance averages steer which singular values it masks; they are saved
    beside the checkpoint, so a run resumed from step 3 logs the uninterrupted losses."""
    import shutil

    from helpers import step_losses
    from trainer.checkpoint.layout import complete_checkpoints
    from trainer.loop import Trainer

    cfg = causal_config(tmp_path, peft={"method": "adalora", "r": 2, "options": {"init_r": 4, "tinit": 1, "tfinal": 1}},
                        optim={"lr": 2e-2, "warmup_steps": 0}, train={"max_steps": 6, "save_every": 3})
    config = write_config(cfg, tmp_path / "config.yaml")
    trainer = Trainer(load_config(config))
    trainer.fit()
    expected = step_losses(trainer.cfg.output_dir)
    checkpoint = complete_checkpoints(trainer.cfg.checkpoint_dir)[0]
    assert checkpoint.name == "step-00000003" and (checkpoint / "adapter_state.pt").is_file()
    saved = torch.load(checkpoint / "adapter_state.pt", weights_only=True)
    assert saved["exp_avg_ipt"] and all(v.abs().sum() > 0 for v in saved["exp_avg_ipt"].values())

    copy = tmp_path / "resumed"
    shutil.copytree(trainer.cfg.output_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step-00000006")
    resumed = Trainer(load_config(config, [f"run.output_dir={copy}", f"checkpoint.resume={copy / 'checkpoints' / checkpoint.name}"]))
    assert resumed.start_step == 3
    resumed.fit()
    again = step_losses(copy)
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(expected[step], rel=1e-6), step
