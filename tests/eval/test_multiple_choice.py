"""Multiple-choice eval sets: accuracy equal to lm-evaluation-harness's on the same file, the
shared-context layout scoring each choice as if alone on every attention backend, and the same
scores on 2 ranks as on 1 under every strategy and peft method."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import (CHOICE_SEQ_LEN, REPO, TINY_LLAMA, TOY_TEXTS, extensions_dir, method_keys, planned, run_config,
                     tokenizer_of, write_jsonl)
from trainer.build import build_model, build_training
from trainer.config.schema import Config
from trainer.eval.multiple_choice import (accuracy, build_choice_sets, choice_log_likelihoods, encode_pair, lay_out,
                                          tokenize_question)
from trainer.runtime.distributed import init_distributed

WORKER = REPO / "tests" / "workers" / "choice_worker.py"
WORDS = " ".join(TOY_TEXTS[:5]).replace(".", "").replace("?", "").replace(",", "").split()


def hellaswag_rows(n: int, seed: int = 0) -> list[dict]:
    """HellaSwag-shaped questions (ctx, endings, label as a string) of varied lengths: contexts
    that end in a space, an empty context, and a few too long for one row of CHOICE_SEQ_LEN tokens
    with all their choices (or even with one: the context is then cut from the left)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        length = 40 if i % 9 == 4 else rng.randint(2, 12)
        ctx = " ".join(rng.choice(WORDS) for _ in range(length)) + (" " if i % 5 == 0 else "")
        endings = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 7))) for _ in range(rng.choice((2, 4)))]
        rows.append({"ctx": "" if i == 7 else ctx, "endings": endings, "label": str(rng.randrange(len(endings)))})
    return rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama and a byte-level BPE that, like Llama's, starts every encoding with BOS."""
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.model.tokenizer import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("choice-model")
    tokenizer = train_bpe_tokenizer(TOY_TEXTS, vocab_size=TINY_LLAMA["vocab_size"])
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, bos)])
    assert tokenizer("red")["input_ids"][0] == bos
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("bench") / "bench.jsonl", hellaswag_rows(45))


def finetrain_scores(cfg: Config, attention: str) -> tuple[list[list[float]], dict]:
    """What a run's evaluation computes for the set, on one rank."""
    tokenizer = tokenizer_of(Path(cfg.model.path))
    strategy = build_training(cfg, planned(cfg), init_distributed(), tokenizer, 1,
                              lambda: build_model(cfg, tokenizer, attention)).strategy
    choice_set = build_choice_sets(cfg, tokenizer, attention)["bench"]
    lls = choice_log_likelihoods(strategy, choice_set)
    return lls, accuracy(choice_set.questions, lls)


@pytest.fixture(scope="module")
def harness(model_dir, bench, tmp_path_factory):
    """lm-evaluation-harness's own scores of the file: its HF model on the same weights and
    tokenizer, a task YAML reading the raw HellaSwag fields, max length data.seq_len."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    tasks = tmp_path_factory.mktemp("tasks")
    (tasks / "bench.yaml").write_text(
        f"task: bench_harness\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {bench}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: ctx\ndoc_to_choice: endings\n"
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer_of(model_dir), batch_size=8, max_length=CHOICE_SEQ_LEN)
    out = simple_evaluate(model=lm, tasks=["bench_harness"], log_samples=True,
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    samples = sorted(out["samples"]["bench_harness"], key=lambda s: s["doc_id"])
    return {"acc": out["results"]["bench_harness"]["acc,none"],
            "acc_norm": out["results"]["bench_harness"]["acc_norm,none"],
            "lls": [[resp[0][0] for resp in s["resps"]] for s in samples]}


@pytest.mark.parametrize("attention", ["sdpa", "eager", "varlen_reference"])
def test_acc_and_acc_norm_equal_lm_evaluation_harness(tmp_path, model_dir, bench, harness, attention):
    """finetrain's choice eval set (choices sharing their context on sdpa and eager, one document
    per choice on the varlen path; the fused head) scores the file as the harness does: the
    same accuracies exactly, each choice's log-likelihood to float32 rounding."""
    lls, scores = finetrain_scores(run_config(tmp_path, model_dir, bench), attention)
    assert 0 < scores["acc"] < 1 and scores["acc"] != scores["acc_norm"]  # the check has teeth
    assert scores == {"acc": harness["acc"], "acc_norm": harness["acc_norm"]}
    assert len(lls) == len(harness["lls"]) == 45
    for question, (mine, theirs) in enumerate(zip(lls, harness["lls"])):
        assert mine == pytest.approx(theirs, abs=2e-4), question


def test_acc_norm_divides_by_the_characters_of_the_choice_and_ties_go_to_the_first(model_dir):
    """The harness's acc_norm: log-likelihood per character of the choice (not per token,
    byte, or character of the continuation with its delimiter); numpy's argmax on ties."""
    tokenizer = tokenizer_of(model_dir)
    # -8/2 < -9.5/3 per character, but -8/3 > -9.5/3 per byte of "né"; -6/3 < -11/6, but -6/4 > -11/7
    questions = [tokenize_question(tokenizer, "q", ["né", "abc"], 1), tokenize_question(tokenizer, "q", ["abc", "abcdef"], 1),
                 tokenize_question(tokenizer, "q", ["red", "blue", "green"], 0)]
    lls = [[-8.0, -9.5], [-6.0, -11.0], [-2.0, -2.0, -5.0]]
    assert accuracy(questions[:2], lls[:2]) == {"acc": 0.0, "acc_norm": 1.0}
    assert accuracy(questions[2:], lls[2:]) == {"acc": 1.0, "acc_norm": 0.0}  # acc: a tie, the first; norm: "blue"


def test_encoding_is_the_harness_encoding(model_dir):
    """Trailing whitespace of the context moves to the continuation; an empty context is BOS."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_of(model_dir)
    lm = HFLM(pretrained=AutoModelForCausalLM.from_pretrained(model_dir), tokenizer=tokenizer)
    for context, continuation in [("The quick brown", " fox"), ("The quick brown ", " fox"), ("two plus\n", " five"),
                                  ("Packing puts", " many short documents")]:
        assert encode_pair(tokenizer, context, continuation) == lm._encode_pair(context, continuation)
    assert encode_pair(tokenizer, "", " fox") == ([tokenizer.bos_token_id], tokenizer.encode(" fox", add_special_tokens=False))


def alone(model, questions) -> list[list[float]]:
    """Each choice scored the plain way: context + choice as one sequence of its own."""
    out = []
    with torch.no_grad():
        for q in questions:
            scores = []
            for continuation in q.continuations:
                ids = (q.context + continuation)[-(CHOICE_SEQ_LEN + 1):]
                logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0].float().log_softmax(-1)
                positions = range(len(ids) - 1 - len(continuation), len(ids) - 1)
                scores.append(sum(float(logits[p, t]) for p, t in zip(positions, continuation)))
            out.append(scores)
    return out


@pytest.mark.parametrize("attention,layout,fused", [("sdpa", "shared", True), ("eager", "shared", False),
                                                    ("varlen_reference", "varlen", True), ("sdpa", "padded", True)])
def test_every_layout_scores_each_choice_as_if_alone(model_dir, bench, attention, layout, fused):
    """Questions packed into rows (several per row, the choices of one after its context, each
    seeing the context and itself only; the long ones split into a document per choice), with
    the target-only head or the full logits: each choice's log-likelihood is its log-likelihood
    scored alone."""
    cfg = Config()
    cfg.model.path, cfg.train.fused_loss = str(model_dir), fused
    tokenizer = tokenizer_of(model_dir)
    model = build_model(cfg, tokenizer, attention).eval()
    rows = [json.loads(line) for line in bench.read_text().splitlines()]
    questions = [tokenize_question(tokenizer, r["ctx"], r["endings"], int(r["label"])) for r in rows]
    batches = lay_out(questions, CHOICE_SEQ_LEN, 3, attention, layout, tokenizer.pad_token_id)
    if layout == "shared":  # each context computed once, not once per choice
        assert sum(b.inputs["input_ids"].numel() for b in batches) < 0.8 * sum(
            len(q.context) * len(q.continuations) + sum(map(len, q.continuations)) for q in questions)
    totals = torch.zeros(sum(len(q.continuations) for q in questions), dtype=torch.float64)
    from trainer.model.loss import target_log_probs

    with torch.no_grad():
        for batch in batches:
            totals.index_add_(0, batch.choice_ids, target_log_probs(model, batch.inputs, batch.rows, batch.cols,
                                                                    batch.targets).double())
    reference = alone(build_model(Config(model=cfg.model), tokenizer, "eager").eval(), questions)
    expected = torch.tensor([s for scores in reference for s in scores], dtype=torch.float64)
    torch.testing.assert_close(totals, expected, rtol=0, atol=1e-4)


def test_prompt_and_prefix_tuning_pad_one_choice_per_row(tmp_path, model_dir, bench):
    """Prompt and prefix tuning cannot isolate packed documents: each choice is a padded row."""
    from trainer.eval.multiple_choice import choice_layout

    assert choice_layout("sdpa", "prefix_tuning") == choice_layout("sdpa", "prompt_tuning") == "padded"
    assert choice_layout("sdpa", "lora") == "shared" and choice_layout("flash_attention_2", "none") == "varlen"


PEFT = ("none", "lora", "dora", "ia3", "prompt_tuning", "prefix_tuning")


TWO_RANK_RUNS = [("ddp", "none"), ("fsdp", "none"), ("zero1", "none"), ("zero2", "none"), ("zero3", "none"),
                 ("fsdp", "lora"), ("zero3", "lora"), ("ddp", "dora"), ("fsdp", "ia3"), ("fsdp", "prompt_tuning"),
                 ("zero3", "prefix_tuning")]


@pytest.mark.slow
def test_two_ranks_score_as_one_under_every_strategy_and_peft_method(tmp_path, model_dir, bench):
    """The set's micro-batches dealt over 2 ranks (an odd number: one rank recomputes one in the
    last round) give every choice the log-likelihood one rank gives it, and so the same
    accuracies, on every strategy, with and without an adapter."""
    reference = {}
    for method in PEFT:
        cfg = run_config(tmp_path / method, model_dir, bench, **method_keys(method))
        reference[method] = finetrain_scores(cfg, "sdpa")
    spec = tmp_path / "spec.json"
    results = tmp_path / "results.json"
    spec.write_text(json.dumps({"model": str(model_dir), "bench": str(bench), "out": str(tmp_path / "ranks"),
                                "results": str(results), "runs": TWO_RANK_RUNS}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=extensions_dir(), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend",
                           "c10d", "--rdzv-endpoint", "localhost:0", str(WORKER), str(spec)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-8000:]
    got = json.loads(results.read_text())
    assert len({round(ll, 3) for lls, _ in reference.values() for q in lls for ll in q}) > 100  # methods differ
    for strategy, method in TWO_RANK_RUNS:
        name = f"{strategy}-{method}"
        assert got[name]["batches"] % 2 == 1
        lls, scores = reference[method]
        assert got[name]["scores"] == scores, name
        for question, (mine, theirs) in enumerate(zip(got[name]["lls"], lls)):
            assert mine == pytest.approx(theirs, abs=1e-4), (name, question)
