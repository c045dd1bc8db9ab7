"""What the tests share: tiny model configs and a toy corpus, configs built in code, data files
written on the fly, `finetrain train` run in a subprocess and its metrics read back, W&B's offline
run files read without a server, and the fixed runs that every strategy trains in tests/workers/.
Test modules import this; none imports another."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trainer.build import build_model, build_training
from trainer.checkpoint.export import export_checkpoint
from trainer.checkpoint.layout import complete_checkpoints
from trainer.config.schema import Config, DatasetConfig, EvalSetConfig, load_config
from trainer.data.collate import Batch, build_collator
from trainer.data.stream import StreamDataset
from trainer.data.tokenized import TokenizedDataset
from trainer.loop import Trainer, train_step
from trainer.model.loss import IGNORE_INDEX, count_targets
from trainer.model.tokenizer import train_bpe_tokenizer
from trainer.peft.methods import peft_keys
from trainer.preference.objective import PreferenceObjective
from trainer.preference.reference_model import AdapterReference, CopyReference
from trainer.rank import run_rank
from trainer.runtime.distributed import agree

# ---------------------------------------------------------------- Tiny models and a toy corpus


REPO = Path(__file__).resolve().parent.parent


TOY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is two plus three? Two plus three is five.",
    "Packing puts many short documents into one row of tokens.",
    "Each document must only attend to itself, never to its neighbours.",
    "user assistant system hello thanks please answer question",
] * 4


TINY_LLAMA = {
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


# QLoRA's tiny Llama: bitsandbytes quantizes blocks of 64 elements, so its widths are multiples of 64.
NF4_LLAMA = {**TINY_LLAMA, "hidden_size": 64, "intermediate_size": 128}


TINY_BERT = {
    "model_type": "bert",
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 128,
}


PROBE_MODEL = {"model_type": "llama", "vocab_size": 8192, "hidden_size": 256, "intermediate_size": 688,
               "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
               "max_position_embeddings": 1024, "tie_word_embeddings": False}


WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega red green blue cat dog bird fish tree river stone cloud").split()


# ---------------------------------------------------------------- Configs built in code


def planned(cfg, world_size: int = 1):
    """The run plan (trainer/plan.py) of a config built in code for a test that makes its own token
    rows: the data keys only describe them, and the tokenizer is trained in-process."""
    from trainer.config.schema import DatasetConfig
    from trainer.plan import plan_run

    if not cfg.data.datasets:
        cfg.data.datasets = [DatasetConfig(name="rows", path="rows", format="text")]
    if cfg.model.tokenizer is None and cfg.model.path is None:
        cfg.model.tokenizer = "train-bpe"
    if cfg.train.max_steps is None and cfg.train.epochs is None:
        cfg.train.max_steps = 1
    return plan_run(cfg, world_size, "cpu")


def make_cfg(model: dict, **parallel) -> Config:
    cfg = Config()
    cfg.model.config = dict(model)
    cfg.data.seq_len = 64
    cfg.train.micro_batch_size = 2
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def by_strategy(rows: list[dict]) -> dict[str, dict]:
    return {row["strategy"]: row for row in rows}


# ---------------------------------------------------------------- Data files and token rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Chat examples of varied lengths with a learnable answer (the words reversed)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
        rows.append({"messages": [
            {"role": "user", "content": "reverse: " + " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))},
        ]})
    return rows


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    """Preference pairs of varied lengths with a learnable preference: asked to name some words, the
    chosen answer names words of the first half of WORDS (Greek letters), the rejected one words of
    the second half (colours, animals, things)."""
    rng = random.Random(seed)
    liked, disliked = WORDS[:len(WORDS) // 2], WORDS[len(WORDS) // 2:]
    return [{"prompt": "name some words like " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6))),
             "chosen": " ".join(rng.choice(liked) for _ in range(rng.randint(2, 9))),
             "rejected": " ".join(rng.choice(disliked) for _ in range(rng.randint(2, 9)))} for _ in range(n)]


def classification_rows(n: int, seed: int = 0) -> list[dict]:
    """Separable toy task: label 1 when the text speaks of colours, 0 of animals."""
    rng = random.Random(seed)
    colours, animals = ["red", "green", "blue", "yellow", "purple"], ["cat", "dog", "bird", "fish", "horse"]
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        pool = colours if label else animals
        rows.append({"text": " ".join(rng.choice(pool) for _ in range(rng.randint(3, 8))), "label": label})
    return rows


def choice_rows(n: int) -> list[dict]:
    import random

    rng = random.Random(5)
    return [{"question": "reverse: " + " ".join(rng.choice(WORDS) for _ in range(4)),
             "choices": [" ".join(rng.sample(WORDS, 3)) for _ in range(4)], "answer": rng.randrange(4)}
            for _ in range(n)]


def word_tokenizer(folder: Path) -> Path:
    """One token per word of WORDS (ids from 2; 0 pads, 1 ends), so every document has
    exactly the length a test needs."""
    vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>").save_pretrained(folder)
    return folder


PAD = 0  # the pad token id of make_dataset's rows


def make_dataset(docs: list[list[int]], targets: list[list[bool]], name: str = "docs", text: bool = False,
                 seq_len: int = 64) -> StreamDataset:
    """An in-memory tokenized data set of the given documents."""
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    data = TokenizedDataset(source=name, format="text" if text else "chat",
                            tokens=np.concatenate(docs).astype(np.int32), offsets=offsets,
                            targets=np.concatenate(targets).astype(bool),
                            rows=np.arange(1, len(docs) + 1), prompt_keys=np.arange(len(docs), dtype=np.uint64),
                            by_line=True)
    return StreamDataset(name, data, np.arange(len(docs)), seq_len, text)


def make_pair_dataset(pairs: list[tuple[list[int], list[int], list[int]]], name: str = "pairs", seq_len: int = 64,
                      margins: list[float] | None = None) -> StreamDataset:
    """An in-memory preference data set: each (prompt, chosen answer, rejected answer) of token ids
    as one example of two sequences, prompt + answer each, only the answers' tokens targets."""
    tokens, targets, splits = [], [], []
    for prompt, chosen, rejected in pairs:
        splits.append(len(prompt) + len(chosen))
        for answer in (chosen, rejected):
            tokens += prompt + answer
            targets += [False] * len(prompt) + [True] * len(answer)
    lengths = [2 * len(prompt) + len(chosen) + len(rejected) for prompt, chosen, rejected in pairs]
    data = TokenizedDataset(source=name, format="preference", tokens=np.asarray(tokens, dtype=np.int32),
                            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                            targets=np.asarray(targets, dtype=bool), rows=np.arange(1, len(pairs) + 1),
                            prompt_keys=np.arange(len(pairs), dtype=np.uint64), by_line=True,
                            pair_splits=np.asarray(splits, dtype=np.int64),
                            margins=np.asarray(margins or [0.0] * len(pairs), dtype=np.float32))
    return StreamDataset(name, data, np.arange(len(pairs)), seq_len, False)


def random_pairs(count: int, seed: int, vocab: int = 300) -> list[tuple[list[int], list[int], list[int]]]:
    """Pairs of token ids of varied lengths: a prompt of 2..12 tokens, answers of 1..15."""
    rng = np.random.default_rng(seed)
    spans = ((2, 13), (1, 16), (1, 16))  # prompt, chosen, rejected
    return [tuple(rng.integers(1, vocab, int(rng.integers(low, high))).tolist() for low, high in spans)
            for _ in range(count)]


# ---------------------------------------------------------------- Runs of `finetrain train` in a subprocess


def causal_config(tmp_path: Path, rows: int = 64, **sections) -> dict:
    data = write_jsonl(tmp_path / "data" / "sft.jsonl", chat_rows(rows))
    cfg = {
        "run": {"name": "test", "output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"config": dict(TINY_LLAMA), "tokenizer": "train-bpe"},
        "data": {"seq_len": 64, "datasets": [{"name": "sft", "path": str(data), "format": "chat"}],
                 "cache_dir": str(tmp_path / "cache")},
        "parallel": {"mixed_precision": "fp32"},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"micro_batch_size": 2, "global_batch_size": 4, "max_steps": 8, "log_every": 1},
        "logging": {"progress_bar": False},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def preference_config(tmp_path: Path, rows: int = 64, **sections) -> dict:
    """causal_config's run on preference pairs (pair_rows) instead of chat rows."""
    data = write_jsonl(tmp_path / "data" / "pairs.jsonl", pair_rows(rows))
    cfg = causal_config(tmp_path, rows=1)
    cfg["data"]["datasets"] = [{"name": "pairs", "path": str(data), "format": "preference"}]
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def classification_config(tmp_path: Path, rows: int = 256, **sections) -> dict:
    data = write_jsonl(tmp_path / "data" / "cls.jsonl", classification_rows(rows))
    cfg = causal_config(tmp_path, **sections)
    cfg["model"] = {"config": dict(TINY_BERT), "tokenizer": "train-bpe", "task": "sequence_classification", "num_labels": 2}
    cfg["data"].update({"packing": False, "datasets": [{"name": "cls", "path": str(data), "format": "classification"}]})
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def trainer_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                PYTHONPATH=str(REPO))


def run_cli(config: Path, *args: str, timeout: int = 600, check: bool = True,
            env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """`finetrain train CONFIG args...` in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(config), *args],
                          capture_output=True, text=True, cwd=REPO, env={**trainer_env(), **(env_extra or {})},
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"finetrain exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_here(config: Path, *overrides: str) -> None:
    """What `finetrain train CONFIG overrides...` runs on one process (trainer.rank.run_rank), in
    this one: for the uninterrupted reference runs that other runs are compared with, without
    the seconds a fresh process spends importing torch and transformers."""
    torch.set_num_threads(1)  # as the runs in subprocesses (OMP_NUM_THREADS=1): the same arithmetic
    outcome = run_rank(str(config), list(overrides))
    assert outcome.exit_code == 0 and outcome.step == outcome.total_steps, outcome


def start_cli(config: Path, *args: str) -> subprocess.Popen:
    """`finetrain train CONFIG args...` started in a subprocess (to be signalled, or killed)."""
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(config), *args], cwd=REPO,
                            env=trainer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_records(path: Path, count: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until metrics.jsonl at `path` holds `count` training records (the run in `proc` still going)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and sum(1 for line in path.read_text().splitlines() if '"loss"' in line) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {count} records:\n{proc.stderr.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for metrics")


def read_metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(output_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir) if "loss" in r}


# ---------------------------------------------------------------- W&B offline run files, read back without a server


BLOCK = 32 * 1024


HEADER = 7


FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def run_history(run_dir: Path) -> tuple[str, list[dict]]:
    """(run id, history rows) of every offline run file under `run_dir`/wandb."""
    run_ids, rows = set(), []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        for record in read_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_ids.add(record.run.run_id)
            elif kind == "history":
                rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                             for item in record.history.item})
    assert len(run_ids) == 1, f"expected one W&B run id, found {run_ids}"
    return run_ids.pop(), rows


# ---------------------------------------------------------------- Choice eval sets on a saved tiny model


CHOICE_SEQ_LEN = 64


def tokenizer_of(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def run_config(tmp: Path, model_dir: Path, bench: Path, **keys) -> Config:
    cfg = Config()
    cfg.run.output_dir = str(tmp / "run")
    cfg.model.path = str(model_dir)
    cfg.data.seq_len = CHOICE_SEQ_LEN
    cfg.data.cache_dir = str(tmp / "cache")
    cfg.data.eval.sets = [EvalSetConfig(name="bench", path=str(bench), format="choice",
                                        fields={"context": "ctx", "choices": "endings", "answer": "label"})]
    cfg.parallel.strategy, cfg.parallel.mixed_precision = "single", "fp32"
    cfg.train.micro_batch_size = 2
    for dotted, value in keys.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    return cfg


def method_keys(method: str) -> dict:
    """The keys of a run with peft `method`: only the generic keys it has (the plan refuses the others)."""
    takes = peft_keys(method)
    return {"peft__method": method, **({"peft__r": 4} if "r" in takes else {}),
            **({"peft__num_virtual_tokens": 4} if "num_virtual_tokens" in takes else {}),
            "data__packing": "num_virtual_tokens" not in takes}


# ---------------------------------------------------------------- Strategy runs: fixed token rows trained through the loop's own train_step (tests/workers/)


RUN_SEQ_LEN = 32  # the rows of strategy runs (tests/workers/parallel_worker.py)


VOCAB = TINY_LLAMA["vocab_size"]


@dataclasses.dataclass
class Run:
    name: str
    strategy: str
    micro: int = 2
    accum: int = 2
    steps: int = 4
    peft: str = "none"  # a peft.method
    peft_options: dict = dataclasses.field(default_factory=dict)  # peft.options
    quantization: str = "none"  # model.quantization (nf4: QLoRA on model_path)
    model_path: str | None = None  # a saved folder (pretrained-style); None: seeded random init
    tied: bool = False
    activation_checkpointing: bool = False
    offload: str = "none"
    mixed_precision: str = "fp32"
    deepspeed_config: str | None = None
    replicate: int = 1  # fsdp: HSDP replicas
    save_at: int | None = None  # save after this many steps into save_dir
    save_dir: str | None = None
    load_dir: str | None = None  # resume from here (saved after load_step steps)
    load_step: int = 0
    export_check: bool = False
    fused_loss: bool = True  # false: the plain head and full logits
    compile: bool = False
    full_state_path: str | None = None  # write full_state_dict here (rank 0) after the last step
    generate: bool = False  # greedy answers to fixed prompts after the last step
    generate_first: bool = False  # and before the first step (as the loop's step-0 evaluation does)
    packed: bool = False  # the step's documents two to a row of 2 x RUN_SEQ_LEN (the reference's, repacked)
    sequence_parallel: int = 1
    attention: str = "auto"  # model.attention
    activation_offload: bool = False
    check: str = ""  # "isolation": per-document logits under sequence parallelism, no training


WORKER = REPO / "tests" / "workers" / "parallel_worker.py"


def extensions_dir() -> str:
    """DeepSpeed compiles a CPU op on first use (minutes on 2 cores): keep it across sessions."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path(tempfile.gettempdir()) / f"finetrain-torch-extensions-{os.getuid()}")


def launch_worker(tmp: Path, name: str, nproc: int, runs: list[dict], timeout: int = 600) -> dict:
    """Run `runs` (fields of Run) in one torchrun launch of tests/workers/parallel_worker.py on `nproc`
    ranks; return {run name: measurements}."""
    spec = tmp / f"{name}.json"
    results = tmp / f"{name}-results.json"
    spec.write_text(json.dumps({"out": str(tmp / name), "results": str(results), "runs": runs}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=extensions_dir(), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", str(WORKER), str(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{name}: torchrun exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    return json.loads(results.read_text())


def run_model_config(run: Run) -> dict:
    return {**TINY_LLAMA, "tie_word_embeddings": run.tied}


@functools.cache
def toy_tokenizer():
    return train_bpe_tokenizer(TOY_TEXTS, vocab_size=VOCAB)


def make_config(run: Run, out: Path, world_size: int) -> Config:
    cfg = Config()
    cfg.run.output_dir = str(out / run.name)
    cfg.model.path = run.model_path
    cfg.model.config = None if run.model_path else run_model_config(run)
    cfg.model.quantization = run.quantization
    cfg.data.cache_dir = str(out / "cache")
    cfg.data.packing = run.packed  # the rows are made here (step_rows): one document per row, or two packed
    cfg.data.seq_len = 2 * RUN_SEQ_LEN if run.packed else cfg.data.seq_len
    cfg.model.attention = run.attention
    cfg.peft.method = run.peft
    for key, value in {"r": 4, "alpha": 8.0, "num_virtual_tokens": 4}.items():
        if key in peft_keys(run.peft):  # the plan refuses a generic key the method has no field for
            setattr(cfg.peft, key, value)
    cfg.peft.options = dict(run.peft_options)
    cfg.parallel.strategy = run.strategy
    cfg.parallel.mixed_precision = run.mixed_precision
    cfg.parallel.activation_checkpointing = run.activation_checkpointing
    cfg.parallel.offload = run.offload
    cfg.parallel.deepspeed_config = run.deepspeed_config
    cfg.parallel.replicate = run.replicate
    cfg.parallel.sequence_parallel = run.sequence_parallel
    cfg.optim.lr = 1e-2
    cfg.optim.weight_decay = 0.1
    cfg.optim.warmup_steps = 1
    cfg.optim.max_grad_norm = 1.0
    cfg.train.micro_batch_size = run.micro
    cfg.train.global_batch_size = run.micro * run.accum * world_size // run.sequence_parallel
    cfg.train.max_steps = run.steps
    cfg.train.fused_loss = run.fused_loss
    cfg.train.compile = run.compile
    cfg.train.activation_offload = run.activation_offload
    return cfg


def make_model(cfg: Config, attention: str = "sdpa"):
    return build_model(cfg, toy_tokenizer(), attention)


def step_rows(step: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global rows: token sequences, each row a random length, right-padded
    (labels -100 past the end), the same on every rank and world size."""
    gen = torch.Generator().manual_seed(1000 + step)
    # Counting sequences (start, stride random): learnable, so the loss falls quickly.
    starts = torch.randint(1, VOCAB, (rows, 1), generator=gen)
    strides = torch.randint(1, 4, (rows, 1), generator=gen)
    ids = 1 + (starts + strides * torch.arange(RUN_SEQ_LEN)[None, :]) % (VOCAB - 1)
    lengths = torch.randint(4, RUN_SEQ_LEN + 1, (rows,), generator=gen)
    labels = ids.clone()
    labels[torch.arange(RUN_SEQ_LEN)[None, :] >= lengths[:, None]] = IGNORE_INDEX
    ids[labels == IGNORE_INDEX] = 0
    return ids, labels


def rank_micro_batches(step: int, run: Run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = run.micro * run.accum
    ids, labels = step_rows(step, per_rank * world)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    ids, labels = ids[mine], labels[mine]
    return [(ids[i:i + run.micro], labels[i:i + run.micro]) for i in range(0, per_rank, run.micro)]


def as_batches(micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Batch]:
    return [Batch(inputs={"input_ids": ids}, labels=labels, num_targets=count_targets(labels, "causal_lm"),
                  num_tokens=int((labels != IGNORE_INDEX).sum()), num_slots=labels.numel(), examples={}, tokens={})
            for ids, labels in micro_batches]


# ---------------------------------------------------------------- Runs trained in this process, and their export


def train_in_process(cfg_dict: dict, tmp_path: Path) -> tuple[Trainer, dict]:
    trainer = Trainer(load_config(write_config(cfg_dict, tmp_path / "config.yaml")))
    record = trainer.fit()
    trainer.strategy.model.eval()
    return trainer, record


def export(checkpoint: Path, out: Path, merge: bool = False, through_the_command_line: bool = False) -> Path:
    """`finetrain export CHECKPOINT --out OUT [--merge]`: in this process (what the command calls),
    or through the command line in a process of its own."""
    if not through_the_command_line:
        return export_checkpoint(checkpoint, out, merge=merge)
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "export", str(checkpoint), "--out", str(out),
                           *(["--merge"] if merge else [])], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def sample_ids(trainer: Trainer) -> torch.Tensor:
    text = "reverse: alpha beta gamma"
    return torch.tensor([trainer.tokenizer(text)["input_ids"]] * 2)


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def latest_checkpoint(trainer: Trainer) -> Path:
    return complete_checkpoints(trainer.cfg.checkpoint_dir)[-1]


# ---------------------------------------------------------------- A Hugging Face hub cache, laid out as huggingface_hub lays it


def hub_cache_repo(hub_cache: Path, repo_id: str, files: dict[str, bytes | str | Path], repo_type: str = "model",
                   revision: str = "main") -> Path:
    """Put `files` (path in the repo -> content, or a file to copy) into `hub_cache` as
    huggingface_hub's downloads leave them: each content once under `blobs/<its hash>`, the
    snapshot `snapshots/<commit>/` of relative symlinks to them, and `refs/<revision>` naming the
    commit; returns the snapshot folder."""
    import hashlib

    from huggingface_hub.file_download import repo_folder_name

    storage = hub_cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    contents = {name: Path(value).read_bytes() if isinstance(value, Path) else
                value.encode() if isinstance(value, str) else value for name, value in files.items()}
    commit = hashlib.sha1(repr(sorted(contents.items())).encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    for name, content in contents.items():
        blob = storage / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return snapshot


def hub_cache_model(hub_cache: Path, repo_id: str, folder: Path, **kwargs) -> Path:
    """A model folder (config.json, weights, tokenizer) put into `hub_cache` as `repo_id`."""
    files = {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}
    return hub_cache_repo(hub_cache, repo_id, files, **kwargs)


# ---------------------------------------------------------------- Fuzzing (Hypothesis)


# FINETRAIN_FUZZ=long: FUZZ_LONG_FACTOR times the cases, from fresh random seeds (found failures are
# printed with the @reproduce_failure line that replays them); by default the cases are derived from
# the test itself (derandomized), the same on every run.
FUZZ_LONG = os.environ.get("FINETRAIN_FUZZ") == "long"
FUZZ_LONG_FACTOR = 50


def fuzz_settings(cases: int):
    """Hypothesis settings of a fuzz test with `cases` cases in `make test`."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=cases * (FUZZ_LONG_FACTOR if FUZZ_LONG else 1), derandomize=not FUZZ_LONG,
                    deadline=None, database=None, print_blob=FUZZ_LONG,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])


# ---------------------------------------------------------------- Preference runs: fixed pairs through train_step


@dataclasses.dataclass
class PairRun:
    """A few optimizer steps on fixed preference pairs, through the loop's own train_step with a
    preference objective: each step's 8 rows (2 pairs to a packed row, 1 unpacked) dealt to the
    ranks as the loader deals them."""

    name: str
    strategy: str
    micro: int = 2
    accum: int = 2
    steps: int = 3
    peft: str = "none"
    reference: str = "copy"  # copy or adapter (precomputed reads a run's data: tests/preference/test_precompute.py)
    loss: str = "dpo"
    packed: bool = True


PAIR_ROWS = 8  # rows of every step, all ranks


def pair_step_dataset(step: int):
    """The 16 pairs of a step (varied lengths), as a preference data set."""
    return make_pair_dataset(random_pairs(2 * PAIR_ROWS, seed=100 + step, vocab=VOCAB), seq_len=4 * RUN_SEQ_LEN)


def pair_config(run: PairRun, out: Path, world_size: int) -> Config:
    cfg = make_config(Run(name=run.name, strategy=run.strategy, micro=run.micro, accum=run.accum, steps=run.steps,
                          peft=run.peft, packed=True), out, world_size)
    cfg.data.packing, cfg.data.seq_len = run.packed, 4 * RUN_SEQ_LEN
    cfg.data.datasets = [DatasetConfig(name="pairs", path="pairs", format="preference")]  # the rows are made here
    cfg.preference.loss, cfg.preference.reference = run.loss, run.reference
    return cfg


def pair_run(run: PairRun, out: Path, dist_info) -> dict:
    """Train `run` on this rank; per step: loss, grad norm and the rewards (the same on every rank)."""
    cfg = pair_config(run, out, dist_info.world_size)
    plan = agree(lambda: planned(cfg, dist_info.world_size))
    strategy = build_training(cfg, plan, dist_info, toy_tokenizer(), run.steps,
                              lambda: make_model(cfg, plan.attention)).strategy
    reference = AdapterReference(strategy, "causal_lm") if run.reference == "adapter" else \
        CopyReference(strategy, lambda: make_model(cfg, plan.attention), "causal_lm")
    objective = PreferenceObjective(cfg, reference)
    per_rank = run.micro * run.accum
    result = {"losses": [], "grad_norms": [], "accuracies": [], "margins": [], "pairs": []}
    for step in range(run.steps):
        dataset = pair_step_dataset(step)
        pieces = [p for e in dataset.examples for p in dataset.pieces(0, int(e))]
        rows = [pieces[2 * r: 2 * r + 2] for r in range(PAIR_ROWS)] if run.packed else [[p] for p in pieces[:PAIR_ROWS]]
        mine = rows[dist_info.rank * per_rank: (dist_info.rank + 1) * per_rank]
        collate = build_collator(cfg, [dataset], toy_tokenizer(), plan.attention)
        record = train_step(strategy, [collate(mine[i:i + run.micro]) for i in range(0, per_rank, run.micro)],
                            "causal_lm", objective)
        metrics = record["preference"]
        for key, value in (("losses", record["loss"]), ("grad_norms", record["grad_norm"]),
                           ("accuracies", metrics.get("rewards/accuracies")), ("margins", metrics["rewards/margins"]),
                           ("pairs", metrics["pairs"])):
            result[key].append(value)
    return result
