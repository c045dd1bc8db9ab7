"""The end-of-turn check: a template whose assistant turns end with their end-of-turn token
outside the targets (the model would never learn to stop) stops the run at start-up with one
line naming the template; --debug prints what was checked; a key overrides it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers import TINY_LLAMA, causal_config, run_cli, write_config, write_jsonl
from trainer.config.schema import Config, DatasetConfig, ModelConfig
from trainer.data.chat import ChatEncoder
from trainer.data.end_of_turn import check_end_of_turn, end_of_turn_token
from trainer.data.records import field_names
from trainer.runtime.errors import ConfigError

CHAT = {"messages": [{"role": "user", "content": "What is two plus three?"}, {"role": "assistant", "content": "Five."},
                     {"role": "user", "content": "And times?"}, {"role": "assistant", "content": "Six."}]}

# Each turn's end-of-turn token is written at the start of the next turn: the assistant's span
# (up to where the conversation that ends with it ends) never includes its <|im_end|>.
EOT_IN_NEXT_HEADER = (
    "{% for message in messages %}{% if not loop.first %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# No special token at all between turns.
PLAIN = ("{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")


def run_config(tmp_path: Path, rows: list, fmt: str = "chat", **data) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(config=dict(TINY_LLAMA), tokenizer="train-bpe")
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg.data.datasets = [DatasetConfig(name="sft", path=str(path), format=fmt)]
    cfg.data.cache_dir = str(tmp_path / "cache")
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


@pytest.fixture
def template(tiny_tokenizer):
    """Set the tokenizer's chat template for one test."""
    original = tiny_tokenizer.chat_template

    def use(text: str):
        tiny_tokenizer.chat_template = text
        return tiny_tokenizer

    yield use
    tiny_tokenizer.chat_template = original


def test_chatml_passes_and_says_what_it_checked(tmp_path, tiny_tokenizer):
    encoder = ChatEncoder(tiny_tokenizer, field_names("chat", {}, "fields"), train_on_prompt=False)
    eot, _ = end_of_turn_token(encoder)
    assert tiny_tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"
    cfg = run_config(tmp_path, [CHAT] * 3)
    assert check_end_of_turn(cfg, tiny_tokenizer, "finetrain's ChatML template") == [
        "end-of-turn check (finetrain's ChatML template): '<|im_end|>' is a target at the end of all 6 assistant "
        "turns of the first 3 rows of sft"]


def test_an_end_of_turn_token_outside_the_assistant_span_is_caught(tmp_path, template):
    tokenizer = template(EOT_IN_NEXT_HEADER)
    cfg = run_config(tmp_path, [CHAT] * 2)
    with pytest.raises(ConfigError) as err:
        check_end_of_turn(cfg, tokenizer, "the chat template in eot.jinja")
    message = str(err.value)
    assert "\n" not in message
    assert message == (f"data.check_end_of_turn: the chat template in eot.jinja ends assistant turns with '<|im_end|>', "
                       f"but in {tmp_path / 'sft.jsonl'}:1 (turn 1) the end-of-turn token falls outside the assistant's "
                       f"span and is no target, so the model would never learn to stop; fix the template so that an "
                       f"assistant turn ends with '<|im_end|>' or set data.check_end_of_turn=false")
    # the last turn of a conversation gets no end-of-turn token at all from this template
    last_only = {"messages": CHAT["messages"][:2]}
    with pytest.raises(ConfigError, match=r"sft.jsonl:1 \(turn 1\) the template renders no end-of-turn token"):
        check_end_of_turn(run_config(tmp_path / "b", [last_only]), tokenizer, "eot.jinja")
    # overridable
    assert check_end_of_turn(run_config(tmp_path / "c", [CHAT], check_end_of_turn=False), tokenizer, "x") == []


def test_a_template_without_an_end_of_turn_token_is_caught(tmp_path, template):
    tokenizer = template(PLAIN)
    with pytest.raises(ConfigError, match=r"^data.check_end_of_turn: plain ends an assistant turn with no special "
                                          r"token \(it renders '\\nuser: ' after the answer\)"):
        check_end_of_turn(run_config(tmp_path, [CHAT]), tokenizer, "plain")


def test_instruction_data_and_untrained_turns(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "Add 2 and 3.", "response": "5"}]
    assert "all 1 assistant turns of the first 1 rows" in check_end_of_turn(
        run_config(tmp_path, rows, fmt="instruction"), tiny_tokenizer, "t")[0]


@pytest.mark.slow
def test_a_run_with_such_a_template_stops_at_start_up_in_one_line(tmp_path):
    (tmp_path / "eot.jinja").write_text(EOT_IN_NEXT_HEADER)
    cfg = causal_config(tmp_path, model={"chat_template": str(tmp_path / "eot.jinja")})
    proc = run_cli(write_config(cfg, tmp_path / "config.yaml"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("finetrain:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(rf"data\.check_end_of_turn: the chat template in {re.escape(str(tmp_path / 'eot.jinja'))} ends "
                     r"assistant turns with '<\|im_end\|>', but in .*sft\.jsonl:1 \(turn 1\)", lines[0]), lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()
