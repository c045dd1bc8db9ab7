"""The end-of-turn check: a trained assistant turn must end with a target end-of-turn token.

A model learns to stop from the token that ends its turns (`<|im_end|>`, `<|eot_id|>`,
`<end_of_turn>`, `</s>`). A chat template that renders that token outside what finetrain
locates as the assistant's turn (in the header of the next turn, say), or only when another turn
follows, leaves it out of the targets: the model then never learns to stop, and nothing else
shows it. At start-up (and in `--debug`, which prints the result) the first rows of every chat
and instruction data set are encoded again and each trained assistant turn is checked; the run
stops with one line naming the template when one fails (`data.check_end_of_turn: false`
overrides).

The end-of-turn token is the template's own: the first special token it renders after an
assistant answer that another user turn follows.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from trainer.config.schema import Config, cache_root, dataset_name
from trainer.data.chat import ChatEncoder, Conversation
from trainer.data.formats import build_encoder
from trainer.data.records import RowError, field_names
from trainer.data.run_data import resolve_source
from trainer.data.sources import location, read_rows
from trainer.runtime.errors import ConfigError, DataError

log = logging.getLogger("finetrain")

ROWS = 16  # rows checked per data set
_PROBE = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi, how can I help?"},
          {"role": "user", "content": "Thanks."}]


@dataclass
class TurnCheck:
    """The outcome on one data set."""

    dataset: str
    rows: int = 0
    turns: int = 0


def end_of_turn_token(encoder: ChatEncoder) -> tuple[int | None, str]:
    """The template's end-of-turn token id (None if it renders none) and what follows an
    assistant answer in the template, for messages."""
    tokenizer = encoder.tokenizer
    text = encoder._render(Conversation(_PROBE), generation_prompt=False)
    answer = _PROBE[1]["content"]
    after = text.index(answer, text.index(_PROBE[0]["content"]) + len(_PROBE[0]["content"])) + len(answer)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    following = text[after:text.index(_PROBE[2]["content"], after)]
    for token, (begin, end) in zip(encoding["input_ids"], encoding["offset_mapping"]):
        if begin < after or not text[begin:end].strip():
            continue
        return (token if token in special else None), following
    return None, following


def check_end_of_turn(cfg: Config, tokenizer, template: str, rows: int = ROWS) -> list[str]:
    """Check the first `rows` rows of each chat/instruction data set; returns one summary
    line per data set; raises ConfigError (one line naming the template) on a failure."""

    cache_dir = cache_root(cfg)
    entries = [(dataset_name(ds), f"data.datasets.{i}", ds) for i, ds in enumerate(cfg.data.datasets)
               if ds.format in ("chat", "instruction")]
    if not entries:
        return []
    if not cfg.data.check_end_of_turn:
        log.warning("data.check_end_of_turn is false: assistant turns are not checked for a trained end-of-turn token")
        return []
    override = "or set data.check_end_of_turn=false"
    summaries = []
    for name, key, ds in entries:
        encoder = build_encoder(ds.format, tokenizer, field_names(ds.format, ds.fields, f"{key}.fields"),
                                cfg.data.train_on_prompt, tuple(ds.train_on))
        chat = encoder.chat if hasattr(encoder, "chat") else encoder
        eot, following = end_of_turn_token(chat)
        if eot is None:
            raise ConfigError(f"data.check_end_of_turn: {template} ends an assistant turn with no special token "
                              f"(it renders {following!r} after the answer), so the model cannot learn to stop; "
                              f"use a template with an end-of-turn token (model.chat_template) {override}")
        shown = tokenizer.convert_ids_to_tokens(eot)
        outcome = TurnCheck(name)
        path = resolve_source(ds.path, ds.format, key, cache_dir)
        try:
            for row in itertools.islice(read_rows(path, cache_dir / "hf"), rows):
                if row.record is None:
                    continue  # a bad row is reported where the data is tokenized
                try:
                    messages = encoder.messages(row.record)
                    conversation = chat.conversation(row.record) if encoder is chat else Conversation(messages)
                    problem = _turn_problem(chat, conversation, eot)
                except RowError:
                    continue
                outcome.rows += 1
                if problem is not None:
                    turn, why = problem
                    raise ConfigError(
                        f"data.check_end_of_turn: {template} ends assistant turns with {shown!r}, but in "
                        f"{location(ds.path, row.number, row.by_line)} (turn {turn}) {why}, so the model would never "
                        f"learn to stop; fix the template so that an assistant turn ends with {shown!r} {override}")
                outcome.turns += len(ChatEncoder.assistant_turns(conversation.messages))
        except DataError:
            continue  # an unreadable source is reported where the data is tokenized
        summaries.append(f"end-of-turn check ({template}): {shown!r} is a target at the end of all {outcome.turns} "
                         f"assistant turns of the first {outcome.rows} rows of {name}")
    for line in summaries:
        log.info("%s", line)
    return summaries


def _turn_problem(chat: ChatEncoder, conversation: Conversation, eot: int) -> tuple[int, str] | None:
    """(turn, what is wrong) for the first trained assistant turn of `conversation` whose end
    of turn is not a target, or None."""
    encoded = chat.encode_messages(conversation)
    text = chat._render(conversation, generation_prompt=False)
    offsets = chat.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    turns = ChatEncoder.assistant_turns(conversation.messages)
    spans = chat.turn_spans(conversation, text)
    for index, (turn, (start, _)) in enumerate(zip(turns, spans)):
        stop = spans[index + 1][0] if index + 1 < len(spans) else len(text)
        inside = [i for i, (begin, _) in enumerate(offsets) if start <= begin < stop]
        if not any(encoded.targets[i] for i in inside):
            continue  # nothing of this turn trains
        ends = [i for i in inside if encoded.tokens[i] == eot]
        if not ends:
            return turn, "the template renders no end-of-turn token after the turn"
        if not encoded.targets[ends[0]]:
            return turn, "the end-of-turn token falls outside the assistant's span and is no target"
    return None
