"""The main job's pieces (configs/smollm2-demo.yaml, `make demo`) on slices: the converted
SmolLM2 is a language model, held-out questions never train, nor does any example of the
general benchmark, a short LoRA run on two FSDP ranks lowers the chat eval loss, and the
closing summary shows the answers side by side, the benchmark's accuracy before and after,
and ends with the report's path."""

from __future__ import annotations

import json
import re

import pytest
import torch

from helpers import REPO, read_metrics, run_cli
from trainer.build import build_model
from trainer.config.schema import cache_root, load_config
from trainer.data.builtin import _gensim_lee
from trainer.data.eval_batches import held_out_conversations
from trainer.data.loader import build_train_loader
from trainer.model.tokenizer import load_tokenizer

DEMO = REPO / "configs" / "smollm2-demo.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's config (its data cache in a temporary folder) and its tokenizer."""
    tmp = tmp_path_factory.mktemp("demo")
    cfg = load_config(DEMO, [f"run.output_dir={tmp / 'run'}", f"data.cache_dir={tmp / 'cache'}"])
    return cfg, load_tokenizer(cfg, lambda: [])


@pytest.mark.slow
def test_the_converted_model_reads_english(demo):
    """Perplexity of SmolLM2 after conversion on news text is a small fraction of its
    perplexity on the same tokens shuffled: the weights are those of a trained model, in the
    right places."""
    cfg, tokenizer = demo
    model = build_model(cfg, tokenizer, "sdpa").eval()
    text = " ".join(doc["text"] for _, doc in zip(range(3), _gensim_lee()))
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        english, noise = (torch.exp(model(input_ids=x, labels=x).loss).item() for x in (ids, shuffled))
    assert english < 40 and noise > 20 * english, (english, noise)


@pytest.mark.slow
def test_held_out_questions_never_appear_in_training_rows(demo):
    """The chat corpus repeats questions (2,026 conversations, 749 distinct first questions):
    no training conversation asks a held-out question, and the answers are read back for
    distinct questions."""
    from trainer.data.builtin import _chatterbot

    cfg, tokenizer = demo
    loader = build_train_loader(cfg, tokenizer, "sdpa", 0, 1)
    chat = next(ds for ds in loader.stream.datasets if ds.name == "chat")
    rows = list(_chatterbot())
    trained = {rows[int(chat.data.rows[e]) - 1]["messages"][0]["content"] for e in chat.examples}
    held = [c[0]["content"] for c in held_out_conversations(cfg, tokenizer, 48)["chat"]]
    assert len(held) == len(set(held)) >= 5
    assert not set(held) & trained
    assert loader.stats["chat/held_out_prompt_twins"] > 0  # the corpus's repeats of held-out questions


@pytest.mark.slow
def test_the_general_benchmark_shares_no_example_with_training_data(demo):
    """news_cloze (builtin:lee-cloze) is built from lee.cor's stories: none of its contexts or
    choices is in any document of the demo's training sources (gensim-lee, chatterbot), of
    which the run trains on a part; it is a forgetting check scored by accuracy."""
    from trainer.data.builtin import materialize
    from trainer.data.eval_sets import declared_sets, forgetting_checks

    cfg, _ = demo
    (bench,) = [s for s in declared_sets(cfg) if s.format == "choice"]
    assert (bench.name, bench.path, bench.forgetting) == ("news_cloze", "builtin:lee-cloze", True)
    assert forgetting_checks(cfg)["news_cloze"] == cfg.logging.forgetting_warn
    cache = cache_root(cfg)
    questions = [json.loads(line) for line in materialize(bench.path, cache).read_text().splitlines()]
    assert len(questions) >= bench.max_examples
    training = []
    for ds in cfg.data.datasets:
        for line in materialize(ds.path, cache).read_text().splitlines():
            row = json.loads(line)
            training += [row["text"]] if "text" in row else [m["content"] for m in row["messages"]]
    corpus = "\n".join(training)
    pieces = {p for q in questions for p in [q["context"], *q["choices"]]}
    assert len(pieces) > 150  # every sentence of lee.cor's stories, and the contexts they form
    shared = [p for p in pieces if p in corpus]
    assert not shared, shared[:3]
    # the check has teeth: the same test on the training stories finds them
    lee = [row for ds in cfg.data.datasets if ds.path == "builtin:gensim-lee"
           for row in materialize(ds.path, cache).read_text().splitlines()]
    assert json.loads(lee[0])["text"][:200] in corpus


@pytest.mark.slow
def test_a_short_lora_run_lowers_the_chat_loss_and_prints_the_answers(tmp_path, demo):
    """The demo recipe cut to 4 steps of 4 rows on its 2 FSDP ranks: the chat eval loss falls,
    the general one is measured for forgetting, and the summary prints each held-out question
    with the base model's and the tuned model's answers. (The model converted and the data
    tokenized for the other tests of this module are the run's cache, as a user's second run finds it.)"""
    cache = demo[0].data.cache_dir
    proc = run_cli(DEMO, "--nproc", "2", f"run.output_dir={tmp_path / 'run'}", f"data.cache_dir={cache}",
                   "train.max_steps=4", "train.global_batch_size=4", "data.seq_len=128",
                   "data.eval.max_examples=16", "data.eval.generate=2", "data.eval.max_new_tokens=12",
                   "data.eval.sets.0.max_examples=8", "logging.progress_bar=false", timeout=900)
    evals = [r for r in read_metrics(tmp_path / "run") if "eval/chat/loss" in r]
    assert [r["step"] for r in evals] == [0, 4]
    assert evals[-1]["eval/chat/loss"] < evals[0]["eval/chat/loss"] - 0.05, evals
    assert "eval/general/loss_change" in evals[-1]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["answers"]) == 2
    for answer in summary["answers"]:
        assert f"[chat] {answer['question']}" in proc.stdout
        for label, key in (("base (step 0):", "first"), ("tuned (step 4):", "last")):
            assert re.search(re.escape(label) + r" +" + re.escape(" ".join(answer[key]["answer"].split())[:40]),
                             proc.stdout), (label, proc.stdout)
    assert "forgetting general: loss change" in proc.stdout
    bench = [r for r in read_metrics(tmp_path / "run") if "eval/news_cloze/acc" in r]
    assert [r["step"] for r in bench] == [0, 4]
    before, after = (r["eval/news_cloze/acc"] for r in bench)
    assert f"forgetting news_cloze: accuracy {before:.4f} -> {after:.4f}" in proc.stdout
    assert re.search(r"eval news_cloze +acc [\d.]+ -> [\d.]+, acc_norm [\d.]+ -> [\d.]+ \(step 0 -> 4\)", proc.stdout)
    assert proc.stdout.rstrip().endswith(f"report:     {tmp_path / 'run' / 'report.html'}")
