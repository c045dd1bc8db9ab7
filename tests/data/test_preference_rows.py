"""Preference data (trainer/data/preference_rows.py): pairs and judged answers as strings or message
lists, through the chat template; a pair as one example of two sequences whose targets are the
answers only; the cut of an over-long pair; and every bad row named by file and line, or skipped
and counted."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import write_jsonl
from trainer.data.preference_rows import PreferenceEncoder, UnpairedPreferenceEncoder, pair_lengths
from trainer.data.prepare import EncodingSpec, load_tokenized
from trainer.data.records import RowError, field_names
from trainer.runtime.errors import DataError

PROMPT, CHOSEN, REJECTED = "What is two plus three?", "Two plus three is five.", "It is six."


def encoder(tokenizer, fields: dict | None = None) -> PreferenceEncoder:
    return PreferenceEncoder(tokenizer, field_names("preference", fields or {}, "fields"), train_on_prompt=False)


def sequences(encoded) -> list[tuple[np.ndarray, np.ndarray]]:
    tokens, targets = np.asarray(encoded.tokens), np.asarray(encoded.targets)
    split = encoded.sequences[0]
    assert encoded.sequences == [split, len(tokens) - split]
    return [(tokens[:split], targets[:split]), (tokens[split:], targets[split:])]


def test_a_string_pair_is_two_sequences_whose_answers_alone_train(tiny_tokenizer):
    encoded = encoder(tiny_tokenizer).encode({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED})
    (chosen, chosen_targets), (rejected, rejected_targets) = sequences(encoded)
    decode = tiny_tokenizer.decode
    assert CHOSEN in decode(chosen[chosen_targets].tolist()) and PROMPT not in decode(chosen[chosen_targets].tolist())
    assert REJECTED in decode(rejected[rejected_targets].tolist())
    first = int(np.argmax(chosen_targets))  # both sequences render the same prompt before their answers
    assert first == int(np.argmax(rejected_targets)) and (chosen[:first] == rejected[:first]).all()
    assert PROMPT in decode(chosen[:first].tolist())


def test_message_lists_shared_turns_and_renamed_fields_encode_as_the_string_pair(tiny_tokenizer):
    want = encoder(tiny_tokenizer).encode({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED})
    user = [{"role": "user", "content": PROMPT}]
    as_lists = {"prompt": user, "chosen": [{"role": "assistant", "content": CHOSEN}],
                "rejected": [{"role": "assistant", "content": REJECTED}]}
    shared = {"chosen": user + [{"role": "assistant", "content": CHOSEN}],  # Anthropic HH: no prompt field
              "rejected": user + [{"role": "assistant", "content": REJECTED}]}
    repeated = {"prompt": PROMPT, **shared}  # UltraFeedback: the answers repeat the prompt's turn
    renamed = {"question": [{"from": "human", "value": PROMPT}], "good": CHOSEN, "bad": REJECTED}
    fields = {"prompt": "question", "chosen": "good", "rejected": "bad", "role": "from", "content": "value"}
    for row, names in ((as_lists, None), (shared, None), (repeated, None), (renamed, fields)):
        got = encoder(tiny_tokenizer, names).encode(row)
        assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.targets, want.targets), row
        assert got.sequences == want.sequences


def test_an_unpaired_row_is_one_sequence_and_its_judgement(tiny_tokenizer):
    names = field_names("unpaired_preference", {}, "fields")
    encode = UnpairedPreferenceEncoder(tiny_tokenizer, names, train_on_prompt=False).encode
    good = encode({"prompt": PROMPT, "completion": CHOSEN, "label": True})
    bad = encode({"prompt": PROMPT, "completion": REJECTED, "label": False})
    assert good.label is True and bad.label is False and good.sequences == [len(good.tokens)]
    assert CHOSEN in tiny_tokenizer.decode(np.asarray(good.tokens)[np.asarray(good.targets)].tolist())
    with pytest.raises(RowError, match='"label" must be true'):
        encode({"prompt": PROMPT, "completion": CHOSEN, "label": 1})


@pytest.mark.parametrize("row,message", [
    ({"prompt": PROMPT, "chosen": CHOSEN}, 'missing field "rejected"'),
    ({"prompt": PROMPT, "chosen": "  ", "rejected": REJECTED}, 'empty field "chosen"'),
    ({"prompt": PROMPT, "chosen": [{"role": "user", "content": "hm"}], "rejected": REJECTED}, "empty completion"),
    ({"prompt": PROMPT, "chosen": CHOSEN, "rejected": CHOSEN}, "the same answer"),
    ({"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED, "margin": "big"}, '"margin" must be int or float'),
])
def test_bad_pairs_say_what_is_wrong(tiny_tokenizer, row, message):
    with pytest.raises(RowError, match=message):
        encoder(tiny_tokenizer).encode(row)


def test_bad_rows_name_the_file_and_line_or_are_skipped_and_counted(tiny_tokenizer, tmp_path):
    good = {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED}
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, {"prompt": PROMPT, "chosen": CHOSEN}, good,
                                                  {**good, "rejected": CHOSEN}])
    spec = EncodingSpec("preference", field_names("preference", {}, "fields"), False, tiny_tokenizer)
    with pytest.raises(DataError, match=rf'^{path}:2: missing field "rejected" \(set data.on_bad_row=skip'):
        load_tokenized(path, str(path), spec, "error", tmp_path / "cache")
    data = load_tokenized(path, str(path), spec, "skip", tmp_path / "cache")
    assert len(data) == 2 and data.skipped == 2 and data.skipped_where[1].startswith(f"{path}:4: ")
    assert list(data.pair_splits) == [sequences(encoder(tiny_tokenizer).encode(good))[0][0].size] * 2


@pytest.mark.parametrize("first,second,seq_len,want", [(20, 30, 64, (20, 30)), (100, 30, 64, (34, 30)),
                                                       (30, 100, 64, (30, 34)), (100, 100, 64, (32, 32)),
                                                       (50, 20, 64, (44, 20))])
def test_an_over_long_pair_leaves_the_short_sequence_whole(first, second, seq_len, want):
    assert pair_lengths(first, second, seq_len) == want
