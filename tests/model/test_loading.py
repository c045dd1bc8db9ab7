"""Model and tokenizer loading: seeded init, task heads, attention choice, tokenizer persistence, builtins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import trainer.model.loading as models
from helpers import TOY_TEXTS
from trainer.build import build_model
from trainer.config.schema import Config, ModelConfig, PeftConfig
from trainer.model.loading import resolve_model_path
from trainer.model.structure import decoder_layers, parameter_counts
from trainer.model.tokenizer import CHATML_TEMPLATE, load_tokenizer, train_bpe_tokenizer
from trainer.plan import plan_run


def make_config(tmp_path: Path, model_config: dict | None = None, seed: int = 0, **model_keys) -> Config:
    cfg = Config()
    cfg.run.output_dir = str(tmp_path / "run")
    cfg.run.seed = seed
    cfg.model = ModelConfig(config=model_config, **model_keys)
    cfg.data.cache_dir = str(tmp_path / "cache")
    return cfg


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ model


def test_random_init_is_deterministic_for_a_seed(tmp_path, tiny_llama_config, tiny_tokenizer):
    first = state(build_model(make_config(tmp_path, tiny_llama_config, seed=3), tiny_tokenizer, "sdpa"))
    torch.manual_seed(12345)  # another process would arrive with another global RNG state
    torch.rand(100)
    second = state(build_model(make_config(tmp_path, tiny_llama_config, seed=3), tiny_tokenizer, "sdpa"))
    other = state(build_model(make_config(tmp_path, tiny_llama_config, seed=4), tiny_tokenizer, "sdpa"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if "norm" not in k)


def test_build_model_settings(tmp_path, tiny_llama_config, tiny_tokenizer):
    cfg = make_config(tmp_path, tiny_llama_config, dtype="bfloat16")
    model = build_model(cfg, tiny_tokenizer, "varlen_reference")
    assert model.config.use_cache is False
    assert model.config._attn_implementation == "varlen_reference"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_vocab_smaller_than_tokenizer_is_refused(tmp_path, tiny_llama_config, tiny_tokenizer):
    cfg = make_config(tmp_path, dict(tiny_llama_config, vocab_size=100))
    with pytest.raises(ValueError, match="model.config.vocab_size: vocab size 100 is smaller than the tokenizer's 320"):
        build_model(cfg, tiny_tokenizer, "sdpa")


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_classification_model_has_a_head_and_ignores_padding(arch, tmp_path, tiny_llama_config,
                                                               tiny_bert_config, tiny_tokenizer):
    model_config = tiny_llama_config if arch == "llama" else tiny_bert_config
    cfg = make_config(tmp_path, model_config, task="sequence_classification", num_labels=3)
    model = build_model(cfg, tiny_tokenizer, "sdpa").eval()
    assert model.config.num_labels == 3
    assert model.config.pad_token_id == tiny_tokenizer.pad_token_id
    ids = torch.tensor([tiny_tokenizer("two plus three is five").input_ids])
    padded = torch.cat([ids, torch.full((1, 4), tiny_tokenizer.pad_token_id)], dim=1)
    mask = (padded != tiny_tokenizer.pad_token_id).long()
    alone = model(ids).logits
    assert alone.shape == (1, 3)
    # A decoder must classify from its last real token, not from a pad.
    assert torch.allclose(model(padded, attention_mask=mask).logits, alone, atol=1e-5, rtol=0)


def test_decoder_layers_and_parameter_counts(tmp_path, tiny_llama_config, tiny_bert_config, tiny_tokenizer):
    llama = build_model(make_config(tmp_path, tiny_llama_config), tiny_tokenizer, "sdpa")
    assert decoder_layers(llama) == list(llama.model.layers)
    assert parameter_counts(llama) == (sum(p.numel() for p in llama.parameters()),) * 2

    bert_cfg = make_config(tmp_path, tiny_bert_config, task="sequence_classification")
    bert = build_model(bert_cfg, tiny_tokenizer, "sdpa")
    assert decoder_layers(bert) == list(bert.bert.encoder.layer)

    lora_cfg = make_config(tmp_path, tiny_llama_config)
    lora_cfg.peft = PeftConfig(method="lora", r=4)
    lora = build_model(lora_cfg, tiny_tokenizer, "sdpa")
    assert decoder_layers(lora) == list(lora.get_base_model().model.layers)
    trainable, total = parameter_counts(lora)
    adapter = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert trainable == adapter and total == adapter + parameter_counts(llama)[1]


# ------------------------------------------------------------------------------ tokenizer


def test_train_bpe_tokenizer_is_saved_and_reloaded(tmp_path, tiny_llama_config):
    cfg = make_config(tmp_path, tiny_llama_config, tokenizer="train-bpe")
    tokenizer = load_tokenizer(cfg, lambda: TOY_TEXTS)
    saved = tmp_path / "run" / "tokenizer"
    assert (saved / "tokenizer.json").is_file()
    assert len(tokenizer) <= tiny_llama_config["vocab_size"]

    def must_not_train():
        raise AssertionError("a saved tokenizer must be reused, not trained again")

    reloaded = load_tokenizer(cfg, must_not_train)
    text = "Two plus three is five, said the quick brown fox."
    assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert reloaded.pad_token == tokenizer.pad_token == "<|pad|>"
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "thanks"}]
    assert reloaded.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert not list(saved.parent.glob(".tokenizer.*"))  # no temporary folder left behind


def test_tokenizer_folder_gets_pad_token_and_chat_template(tmp_path, tiny_llama_config):
    plain = train_bpe_tokenizer(TOY_TEXTS, 300)
    plain.pad_token = None
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "tok")
    cfg = make_config(tmp_path, tiny_llama_config, tokenizer=str(tmp_path / "tok"))
    tokenizer = load_tokenizer(cfg, lambda: TOY_TEXTS)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|end|>"
    assert tokenizer.chat_template == CHATML_TEMPLATE
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    assert saved.pad_token == "<|end|>" and saved.chat_template == CHATML_TEMPLATE


# ------------------------------------------------------------------------------ builtin models


def test_unknown_builtin_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown builtin model 'builtin:gpt5'; known: builtin:smollm2-135m-instruct, "
                                         "builtin:all-minilm-l6-v2"):
        resolve_model_path("builtin:gpt5")
    assert resolve_model_path("/some/folder") == "/some/folder"


@pytest.mark.slow
def test_builtin_smollm2_converts_once_to_a_plain_folder(tmp_path):
    folder = Path(resolve_model_path("builtin:smollm2-135m-instruct", tmp_path / "cache"))
    assert folder.parent == tmp_path / "cache" / "models"  # data.cache_dir: where the run's cache is
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.gguf"))
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert resolve_model_path("builtin:smollm2-135m-instruct", tmp_path / "cache") == str(folder)
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # converted once

    cfg = make_config(tmp_path, None, path="builtin:smollm2-135m-instruct")
    tokenizer = load_tokenizer(cfg, lambda: [])
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False)
    model = build_model(cfg, tokenizer, "sdpa").eval()
    assert not hasattr(model.config, "quantization_config")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    # The pretrained weights survived the conversion: the model knows the answer.
    assert "Paris" in tokenizer.decode(answer[0, prompt["input_ids"].shape[1]:])


@pytest.mark.slow
def test_builtin_minilm_resolves_to_a_bert_folder(tmp_path):
    folder = Path(resolve_model_path("builtin:all-minilm-l6-v2"))
    assert json.loads((folder / "config.json").read_text())["model_type"] == "bert"
    cfg = make_config(tmp_path, None, path="builtin:all-minilm-l6-v2", task="sequence_classification", num_labels=2)
    tokenizer = load_tokenizer(cfg, lambda: [])
    model = build_model(cfg, tokenizer, "sdpa")
    assert model(**tokenizer(["a sentence"], return_tensors="pt")).logits.shape == (1, 2)


# ----------------------------------------------------------------------------- model.dropout


def test_model_dropout_sets_the_architectures_own_dropouts(tmp_path, tiny_llama_config, tiny_bert_config,
                                                          tiny_tokenizer):
    """Llama has attention dropout only; BERT hidden and attention dropout (its classifier's
    is left as it is): each set, and active in training mode only."""
    llama = build_model(make_config(tmp_path, tiny_llama_config, dropout=0.3), tiny_tokenizer, "sdpa")
    assert llama.config.attention_dropout == 0.3
    bert_cfg = make_config(tmp_path, tiny_bert_config, dropout=0.25, task="sequence_classification")
    bert = build_model(bert_cfg, tiny_tokenizer, "sdpa")
    assert (bert.config.hidden_dropout_prob, bert.config.attention_probs_dropout_prob) == (0.25, 0.25)
    assert bert.config.classifier_dropout is None
    assert bert.bert.encoder.layer[0].output.dropout.p == 0.25
    ids = tiny_tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")["input_ids"]
    for model in (llama, bert):
        model.train()
        with torch.no_grad():
            assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
            model.eval()
            assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)
    # unset keeps the model's own; 0 switches BERT's default 0.1 off
    assert build_model(make_config(tmp_path, tiny_bert_config), tiny_tokenizer, "sdpa").config.hidden_dropout_prob == 0.1
    quiet = build_model(make_config(tmp_path, tiny_bert_config, dropout=0.0), tiny_tokenizer, "sdpa").train()
    with torch.no_grad():
        assert torch.equal(quiet(input_ids=ids).logits, quiet(input_ids=ids).logits)


def test_model_dropout_is_refused_by_name_where_the_model_has_none(tmp_path):
    import yaml

    from trainer.config.schema import load_config
    from trainer.runtime.errors import ConfigError

    mamba = {"model_type": "mamba", "vocab_size": 320, "hidden_size": 32, "num_hidden_layers": 2}
    config = {"model": {"config": mamba, "tokenizer": "train-bpe", "dropout": 0.1},
              "data": {"datasets": [{"path": "x.jsonl"}]}, "train": {"max_steps": 1}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as err:
        plan_run(load_config(tmp_path / "config.yaml", check_files=False), 1, "cpu")
    assert str(err.value) == ("model.dropout: MambaConfig (mamba) has no attention or hidden dropout to set; "
                              "leave model.dropout unset (null)")
    with pytest.raises(ConfigError, match=r"^model.dropout: a probability in \[0, 1\), got 1.5$"):
        load_config(tmp_path / "config.yaml", ["model.config.model_type=llama", "model.dropout=1.5"], check_files=False)
    with pytest.raises(ConfigError, match="model.dropout: MambaConfig"):  # and where the model is built
        models.set_dropout(models.AutoConfig.for_model(**mamba), 0.1)
