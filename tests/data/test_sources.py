"""Sources (jsonl, json, parquet, csv, save_to_disk), the tokenization cache, builtin
data sets, and the evaluation sets."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import TINY_BERT, TINY_LLAMA, write_jsonl
from trainer.config.schema import load_config
from trainer.data import prepare as prepare_module
from trainer.data.builtin import BUILTINS, materialize
from trainer.data.eval_batches import build_eval_sets, held_out_conversations
from trainer.data.loader import build_train_loader
from trainer.data.prepare import EncodingSpec, cache_folder, load_tokenized, tokenize_source
from trainer.data.records import field_names
from trainer.data.tokenized import open_tokenized
from trainer.runtime.errors import DataError

ROWS = [{"text": f"sample number {i} " + "word " * (i % 7), "label": i % 2} for i in range(12)]


def write_source(kind: str, folder: Path) -> Path:
    import datasets

    table = datasets.Dataset.from_list(ROWS)
    if kind == "jsonl":
        return write_jsonl(folder / "rows.jsonl", ROWS)
    if kind == "json":
        path = folder / "rows.json"
        path.write_text(json.dumps(ROWS, indent=1))
        return path
    if kind == "parquet":
        table.to_parquet(str(folder / "rows.parquet"))
        return folder / "rows.parquet"
    if kind == "csv":
        table.to_csv(str(folder / "rows.csv"), index=False)
        return folder / "rows.csv"
    table.save_to_disk(str(folder / "saved"))
    return folder / "saved"


def tokenize(path: Path, fmt: str, tokenizer, cache: Path, source: str | None = None, train_on_prompt: bool = False):
    spec = EncodingSpec(fmt, field_names(fmt, {}, "fields"), train_on_prompt, tokenizer)
    return load_tokenized(path, source or str(path), spec, "error", cache)


def cache_entries(cache: Path) -> list[Path]:
    """Complete tokenized data sets in a cache (not its lock files)."""
    return [p for p in (cache / "tokenized").iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize("kind", ["json", "parquet", "csv", "save_to_disk"])
def test_every_source_kind_reads_like_jsonl(tmp_path, tiny_tokenizer, kind):
    reference = tokenize(write_source("jsonl", tmp_path), "classification", tiny_tokenizer, tmp_path / "cache", "ref")
    path = write_source(kind, tmp_path)
    data = tokenize(path, "classification", tiny_tokenizer, tmp_path / "cache")
    assert np.array_equal(data.tokens, reference.tokens) and np.array_equal(data.offsets, reference.offsets)
    labels = [data.label(i) for i in range(len(data))]
    assert labels == [reference.label(i) for i in range(len(reference))] == [r["label"] for r in ROWS]
    assert data.where(3) == f"{path}: row 4"


def test_json_lines_named_json(tmp_path, tiny_tokenizer):
    path = tmp_path / "rows.json"
    write_jsonl(path, ROWS)
    data = tokenize(path, "text", tiny_tokenizer, tmp_path / "cache")
    assert len(data) == len(ROWS) and data.where(0) == f"{path}:1"


def test_tokenization_is_cached_by_content_and_tokenizer(tmp_path, tiny_tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    cache = tmp_path / "cache"
    first = tokenize(path, "text", tiny_tokenizer, cache)
    assert len(cache_entries(cache)) == 1

    def fail(*_, **__):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(prepare_module, "tokenize_source", fail)
    second = tokenize(path, "text", tiny_tokenizer, cache)
    assert np.array_equal(second.tokens, first.tokens) and second.rows.tolist() == first.rows.tolist()

    monkeypatch.undo()
    write_jsonl(path, ROWS[:5])  # new content: a new entry
    assert len(tokenize(path, "text", tiny_tokenizer, cache)) == 5
    tokenize(path, "text", tiny_tokenizer, cache, train_on_prompt=True)  # a setting that changes targets
    assert len(cache_entries(cache)) == 3


BUILTIN_SIZES = {"toy-chat": (2000, 2000), "chatterbot": (500, 5000), "chatterbot-pairs": (700, 800),
                 "gensim-lee": (250, 400), "gensim-wiki": (50, 200), "polarity": (200, 200), "newsgroups": (150, 200),
                 "lee-cloze": (90, 110)}


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtin_data_sets_build_and_tokenize(tmp_path, tmp_path_factory, tiny_tokenizer, name):
    cache = tmp_path_factory.getbasetemp() / "builtin-cache"
    fmt = BUILTINS[name][0]
    path = materialize(f"builtin:{name}", cache)
    assert materialize(f"builtin:{name}", cache) == path  # built once
    if fmt == "choice":  # an eval set: read as questions, not tokenized into the training cache
        from trainer.data.formats import choice_question
        from trainer.data.records import field_names

        questions = [choice_question(json.loads(line), field_names("choice", {}, "k"))
                     for line in path.read_text().splitlines()]
        assert BUILTIN_SIZES[name][0] <= len(questions) <= BUILTIN_SIZES[name][1]
        assert all(len(q.choices) == 4 and len(set(q.choices)) == 4 for q in questions)
        assert path.read_bytes() == materialize(f"builtin:{name}", tmp_path / "again").read_bytes()  # deterministic
        return
    data = tokenize(path, fmt, tiny_tokenizer, tmp_path / "cache", f"builtin:{name}")
    low, high = BUILTIN_SIZES[name]
    assert low <= len(data) <= high and data.skipped == 0
    if fmt == "classification":
        assert len(data.label_values) == 2
    if name == "newsgroups":  # headers (which name the group) are stripped
        assert not any(json.loads(line)["text"].startswith("From:") for line in path.read_text().splitlines())
    if name == "toy-chat":  # deterministic
        assert path.read_bytes() == materialize("builtin:toy-chat", tmp_path / "again").read_bytes()


def test_builtin_format_mismatch_is_refused(tmp_path, tiny_tokenizer):
    cfg = loader_config(tmp_path, [{"name": "lee", "path": "builtin:gensim-lee", "format": "chat"}])
    with pytest.raises(ValueError, match="data.datasets.0.format: builtin:gensim-lee is text data; set format: text"):
        build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)


# ----------------------------------------------------------------------------- evaluation sets


def loader_config(tmp_path: Path, datasets: list[dict], model: dict | None = None, **data):
    cfg = {"run": {"output_dir": str(tmp_path / "run")},
           "model": model or {"config": dict(TINY_LLAMA), "tokenizer": "train-bpe"},
           "data": {"seq_len": 128, "datasets": datasets, "cache_dir": str(tmp_path / "cache"), **data},
           "train": {"micro_batch_size": 2, "global_batch_size": 4, "max_steps": 1}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return load_config(tmp_path / "config.yaml")


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def text_datasets(tmp_path: Path) -> list[dict]:
    sft = write_jsonl(tmp_path / "sft.jsonl", [chat(i) for i in range(60)])
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": f"document {i} " + "text " * (i % 50)} for i in range(40)])
    return [{"name": "sft", "path": str(sft), "format": "chat", "weight": 0.8},
            {"name": "general", "path": str(general), "format": "text", "weight": 0.2}]


@pytest.mark.parametrize("packing", [True, False])
def test_held_out_fraction_per_data_set_split_over_ranks(tmp_path, tiny_tokenizer, packing):
    cfg = loader_config(tmp_path, text_datasets(tmp_path), eval={"fraction": 0.25}, packing=packing)
    loader = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    held = [build_eval_sets(cfg, tiny_tokenizer, "sdpa", rank, 2) for rank in range(2)]
    assert set(held[0]) == set(held[1]) == {"sft", "general"}
    for name, expected in (("sft", 15), ("general", 10)):
        counts = [sum(b.examples[name] for b in h[name]) for h in held]
        assert sum(counts) == expected and min(counts) > 0
        ids = [{tuple(r) for b in h[name] for r in b.inputs["input_ids"].tolist()} for h in held]
        assert not ids[0] & ids[1]
        for batch in held[0][name]:  # one data set per eval batch
            assert all(v == 0 for k, v in batch.examples.items() if k != name)
            assert batch.inputs["input_ids"].shape[0] <= 2
    train_examples = {(d.name, int(e)) for d in loader.stream.datasets for e in d.examples}
    assert len(train_examples) == 45 + 30


def test_examples_sharing_a_held_out_prompt_never_train(tmp_path, tiny_tokenizer):
    """A question asked in several rows (duplicates, or the same question answered in other
    words) is held out everywhere or nowhere: no training example starts with the prompt
    of a held-out one, and the held-out questions still evaluate."""
    rows = [{"messages": [{"role": "user", "content": f"question {i % 12}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(60)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    cfg = loader_config(tmp_path, [{"name": "sft", "path": str(path), "format": "chat"}], eval={"fraction": 0.1})
    loader = build_train_loader(cfg, tiny_tokenizer, "sdpa", 0, 1)
    [ds] = loader.stream.datasets
    held = [c[0]["content"] for c in held_out_conversations(cfg, tiny_tokenizer, 60)["sft"]]
    trained = {rows[int(ds.data.rows[e]) - 1]["messages"][0]["content"] for e in ds.examples}
    assert len(set(held)) == len(held) and not set(held) & trained  # each held-out question asked once
    # each held-out question had 5 rows: the other rows of those questions are left out
    held_out_rows = 6  # a tenth of 60
    twins = 5 * len(held) - held_out_rows
    assert loader.stats["sft/held_out_prompt_twins"] == twins
    assert len(ds.examples) == 60 - held_out_rows - twins


def test_eval_file_is_one_data_set(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "eval.jsonl", [chat(100 + i) for i in range(5)])
    cfg = loader_config(tmp_path, text_datasets(tmp_path), eval={"path": str(path)})
    sets = build_eval_sets(cfg, tiny_tokenizer, "varlen_reference", 0, 1)
    assert list(sets) == ["eval"]
    assert sum(b.examples["eval"] for b in sets["eval"]) == 5
    assert "cu_seq_lens_q" in sets["eval"][0].inputs


def test_eval_with_fewer_examples_than_ranks_is_refused(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "eval.jsonl", [chat(0)])
    cfg = loader_config(tmp_path, text_datasets(tmp_path), eval={"path": str(path)})
    with pytest.raises(ValueError, match="data.eval: data set 'eval' has 1 held-out examples, fewer than the 2 ranks"):
        build_eval_sets(cfg, tiny_tokenizer, "sdpa", 0, 2)


def test_held_out_conversations_are_read_back_from_the_source(tmp_path, tiny_tokenizer):
    """Generation prompts: the first held-out conversations that fit data.seq_len whole, as in
    the file; instruction records become a user and an assistant turn; text data has none."""
    rows = [chat(i) for i in range(60)]
    for row in rows[::3]:  # longer than seq_len: truncated for the loss, never a prompt
        row["messages"][1]["content"] = "long " * 200
    sft = write_jsonl(tmp_path / "sft.jsonl", rows)
    instructions = write_jsonl(tmp_path / "inst.jsonl", [{"prompt": f"say {i}", "response": f"{i}"} for i in range(20)])
    general = write_jsonl(tmp_path / "general.jsonl", [{"text": f"document {i}"} for i in range(20)])
    datasets = [{"name": "sft", "path": str(sft), "format": "chat"},
                {"name": "inst", "path": str(instructions), "format": "instruction"},
                {"name": "general", "path": str(general), "format": "text"}]
    cfg = loader_config(tmp_path, datasets, eval={"fraction": 0.5, "generate": 4})
    found = held_out_conversations(cfg, tiny_tokenizer, 30)
    assert set(found) == {"sft", "inst"}
    assert 0 < len(found["sft"]) < 30  # 30 held out, the long ones left out
    assert all({"messages": c} in rows[1::3] + rows[2::3] for c in found["sft"])
    assert len(found["inst"]) == 10
    for conversation in found["inst"]:
        n = conversation[0]["content"].removeprefix("say ")
        assert conversation == [{"role": "user", "content": f"say {n}"}, {"role": "assistant", "content": n}]
    assert held_out_conversations(cfg, tiny_tokenizer, 3)["inst"] == found["inst"][:3]


def test_classification_eval_uses_the_training_label_ids(tmp_path, tiny_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": ["neg", "pos"][i % 2]} for i in range(8)])
    held = write_jsonl(tmp_path / "eval.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}])
    cfg = loader_config(tmp_path, [{"name": "cls", "path": str(train), "format": "classification"}],
                        eval={"path": str(held), "format": "classification"}, packing=False,
                        model={"config": dict(TINY_BERT), "tokenizer": "train-bpe", "task": "sequence_classification"})
    sets = build_eval_sets(cfg, tiny_tokenizer, "sdpa", 0, 1)
    assert sets["eval"][0].labels.tolist() == [1, 0]


# ----------------------------------------------------------------------------- preparing the cache


def chat_file(path: Path, count: int, bad_lines: tuple[int, ...] = ()) -> Path:
    """`count` conversations, with an empty conversation (a bad row) at each of `bad_lines`."""
    rows = [{"messages": []} if i + 1 in bad_lines else chat(i) for i in range(count)]
    return write_jsonl(path, rows)


@pytest.mark.slow
def test_worker_processes_write_what_one_process_writes(tmp_path, tiny_tokenizer):
    """Chunks encoded by two worker processes come back in file order: the same arrays,
    the same skipped rows, and with `error` the first bad row in the file is the one named."""
    path = chat_file(tmp_path / "chat.jsonl", 150, bad_lines=(40, 101))
    spec = EncodingSpec("chat", field_names("chat", {}, "fields"), False, tiny_tokenizer)
    written = {}
    for workers in (1, 2):
        folder = tmp_path / f"workers-{workers}"
        tokenize_source(path, "chat.jsonl", spec, "skip", folder, workers=workers, chunk_rows=16)
        written[workers] = open_tokenized(folder)
    one, two = written[1], written[2]
    assert len(one) == 148 and one.skipped == two.skipped == 2 and one.skipped_where == two.skipped_where
    for name in ("tokens", "targets", "offsets", "rows"):
        assert np.array_equal(getattr(one, name), getattr(two, name)), name
    with pytest.raises(DataError, match=r"^chat.jsonl:40: empty conversation"):
        tokenize_source(path, "chat.jsonl", spec, "error", tmp_path / "error", workers=2, chunk_rows=16)


def _prepare_once(path: str, cache: str, tokenizer_dir: str, marker: str, start) -> None:
    """One of two processes that want the same entry at once; counts its tokenizations."""
    from transformers import AutoTokenizer

    original = prepare_module.tokenize_source

    def counted(*args, **kwargs):
        with open(marker, "a") as f:
            f.write("tokenized\n")
        time.sleep(1.0)  # hold the lock while the other process arrives
        return original(*args, **kwargs)

    prepare_module.tokenize_source = counted
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start.wait()
    data = tokenize(Path(path), "chat", tokenizer, Path(cache))
    assert len(data) == 30


@pytest.mark.slow
def test_processes_wanting_one_entry_tokenize_it_once(tmp_path, tiny_tokenizer):
    path = chat_file(tmp_path / "chat.jsonl", 30)
    tiny_tokenizer.save_pretrained(tmp_path / "tokenizer")
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    processes = [context.Process(target=_prepare_once, args=(str(path), str(tmp_path / "cache"),
                                                            str(tmp_path / "tokenizer"), str(tmp_path / "marker"), start))
                 for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    assert [p.exitcode for p in processes] == [0, 0]
    assert (tmp_path / "marker").read_text() == "tokenized\n"
    assert len(cache_entries(tmp_path / "cache")) == 1


def test_a_half_written_entry_is_never_used_and_is_cleared(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    spec = EncodingSpec("text", field_names("text", {}, "fields"), False, tiny_tokenizer)
    folder = cache_folder(path, str(path), spec, "error", tmp_path / "cache")
    left_by_a_killed_process = folder.with_name(f".{folder.name}.partial-otherhost-999")
    left_by_a_killed_process.mkdir(parents=True)
    (left_by_a_killed_process / "tokens.uint16").write_bytes(b"\x00" * 10)
    data = load_tokenized(path, str(path), spec, "error", tmp_path / "cache")
    assert len(data) == len(ROWS) and not left_by_a_killed_process.exists()
    assert cache_entries(tmp_path / "cache") == [folder]
