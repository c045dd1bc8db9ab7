"""The run's tokenizer: a model's own, or a byte-level BPE trained in-process; and the chat
template it renders conversations with (its own, finetrain's ChatML, or a Jinja file)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

import trainer.model.attention  # noqa: F401  registers the "varlen_reference" attention
from trainer.config.schema import Config, cache_root
from trainer.model.loading import resolve_model_path, write_folder_atomically
from trainer.runtime.errors import ConfigError, first_line

SPECIAL_TOKENS = {"bos_token": "<|begin|>", "eos_token": "<|end|>", "pad_token": "<|pad|>"}



# ChatML, the layout many instruct models use, with what chat data carries in 2026: the tools
# offered (JSON schemas in the system turn, as Hermes and Qwen2.5 render them), assistant tool
# calls as <tool_call> JSON, `tool` turns with the results, and reasoning in <think> before an
# assistant turn's answer. finetrain's default when a tokenizer has no template, and
# `model.chat_template: finetrain`. Every turn renders the same whatever follows it, so turns are
# located by rendering prefixes (trainer/data/formats.py); masking works on any template.
CHATML_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages and messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call one or more functions. Their signatures are within <tools></tools>:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools>\n\nFor each call, return a JSON object with the function name and arguments within "
    "<tool_call></tool_call>:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call><|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' and message['reasoning_content'] %}"
    "{{- '<think>\n' + message['reasoning_content'] | trim + '\n</think>\n\n' }}"
    "{%- endif %}"
    "{%- if message['content'] %}{{- message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set call = call['function'] if call['function'] is defined else call %}"
    "{%- if message['content'] or not loop.first %}{{- '\n' }}{%- endif %}"
    "{{- '<tool_call>\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' + (call['arguments'] | tojson) + '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)



def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in-process (milliseconds on small data): no hub needed.
    Every byte is in the alphabet, so any text encodes without unknown tokens."""
    specials = list(SPECIAL_TOKENS.values()) + ["<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    bpe_trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=bpe_trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer



def load_tokenizer(cfg: Config, training_texts: Callable[[], Iterable[str]]) -> PreTrainedTokenizerBase:
    """The run's tokenizer, saved to `{run.output_dir}/tokenizer`; a resumed run (or a
    later rank) loads that copy, so a trained BPE is never trained twice."""
    saved = cfg.output_dir / "tokenizer"
    if saved.is_dir():
        return AutoTokenizer.from_pretrained(saved)
    tokenizer = build_tokenizer(cfg, training_texts)
    write_folder_atomically(saved, tokenizer.save_pretrained)
    return tokenizer


def build_tokenizer(cfg: Config, training_texts: Callable[[], Iterable[str]]) -> PreTrainedTokenizerBase:
    """The tokenizer `model.tokenizer` (or `model.path`) names, with its pad token and the chat
    template `model.chat_template` asks for, as the run uses it; saved nowhere."""
    source = cfg.model.tokenizer or cfg.model.path
    key = "model.tokenizer" if cfg.model.tokenizer else "model.path"
    if source == "train-bpe":
        tokenizer = train_bpe_tokenizer(training_texts(), cfg.model.config["vocab_size"])
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(source, cache_root(cfg), key=key))
        except (OSError, ValueError) as err:
            raise ConfigError(f"{key}: {source}: transformers cannot load a tokenizer from it: {first_line(err)}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"model.tokenizer: {source} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = chat_template(cfg.model.chat_template, tokenizer.chat_template)
    return tokenizer



def chat_template(setting: str, own: str | None) -> str:
    """The chat template `model.chat_template` asks for: the tokenizer's own (`auto`; finetrain's
    ChatML when it has none), finetrain's ChatML (`finetrain`), or a Jinja file's."""
    if setting == "finetrain" or (setting == "auto" and not own):
        return CHATML_TEMPLATE
    if setting == "auto":
        return own
    try:
        return Path(setting).read_text()
    except OSError as err:
        raise ConfigError(f"model.chat_template: cannot read {setting}: {err.strerror}") from None



def describe_template(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> str:
    """How a message names the run's chat template."""
    if tokenizer.chat_template == CHATML_TEMPLATE:
        return "finetrain's ChatML template"
    if cfg.model.chat_template not in ("auto", "finetrain"):
        return f"the chat template in {cfg.model.chat_template}"
    return f"the chat template of {cfg.model.tokenizer or cfg.model.path}"
