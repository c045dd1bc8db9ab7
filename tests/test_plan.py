"""The run plan: what a run decides once (strategy, mesh, accumulation, dtypes, attention, the
task and rehearsal data sets, checkpoint format), every rule that relates several keys, the
same refusals from the command as from a rank, and which keys may change on resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO, TINY_LLAMA, write_jsonl
from trainer.config.capabilities import MULTI_PROCESS
from trainer.config.schema import Config, DatasetConfig, load_config
from trainer.parallel.registry import REGISTRY, strategy_names
from trainer.plan import plan_run, resume_changes
from trainer.runtime.errors import ConfigError


def config(tmp_path: Path, **sections) -> Config:
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "hello"}]}])
    raw = {
        "run": {"output_dir": str(tmp_path / "run")},
        "model": {"config": dict(TINY_LLAMA), "tokenizer": "train-bpe"},
        "data": {"seq_len": 64, "datasets": [{"name": "sft", "path": str(data), "format": "chat"}]},
        "train": {"max_steps": 2},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def with_keys(cfg: Config, **keys) -> Config:
    for dotted, value in keys.items():
        *sections, name = dotted.split("__")
        node = cfg
        for section in sections:
            node = getattr(node, section)
        setattr(node, name, value)
    return cfg


def test_auto_is_single_on_one_rank_and_fsdp_on_more(tmp_path):
    cfg = config(tmp_path)
    assert plan_run(cfg, 1, "cpu").strategy == "single"
    assert plan_run(cfg, 8, "cpu").strategy == "fsdp"
    assert plan_run(with_keys(cfg, parallel__strategy="zero2"), 8, "cpu").strategy == "zero2"


def test_the_plan_resolves_what_the_run_decides_once(tmp_path):
    cfg = config(tmp_path, train={"micro_batch_size": 2, "global_batch_size": 16},
                 parallel={"strategy": "fsdp", "replicate": 2, "mixed_precision": "bf16"})
    cfg.data.datasets = [DatasetConfig(name="task", path=cfg.data.datasets[0].path, weight=0.9),
                         DatasetConfig(name="general", path=cfg.data.datasets[0].path, weight=0.1, format="text")]
    plan = plan_run(cfg, 4, "cpu")
    assert (plan.mesh.replicate, plan.mesh.shard, plan.mesh.data_parallel) == (2, 2, 4)
    assert plan.accumulation == 2  # 16 rows = micro 2 x 4 ranks x 2
    assert (plan.master_dtype, plan.compute_dtype) == (torch.float32, torch.bfloat16)
    assert plan.attention == "sdpa_varlen"  # auto on a CPU: packed rows through sdpa one document at a time
    assert plan.primary_dataset == "task"
    assert plan.checkpoint_format == "dcp"
    assert plan_run(with_keys(cfg, parallel__strategy="zero3", parallel__replicate=1), 4, "cpu").checkpoint_format \
        == "deepspeed"


@pytest.mark.parametrize("keys, world_size, expected", [
    ({"train__global_batch_size": 6, "train__micro_batch_size": 4}, 1,
     "train.global_batch_size: 6 is not a multiple of train.micro_batch_size 4"),
    ({"train__global_batch_size": 6, "train__micro_batch_size": 2}, 2,
     "train.global_batch_size: 6 rows per step do not split into micro-batches of 2 on 2 ranks; use a multiple of 4"),
    ({"train__epochs": 1.0}, 1, "train: set exactly one of train.max_steps and train.epochs"),
    ({"peft__method": "prefix_tuning"}, 1, "data.packing: peft.method prefix_tuning feeds its prefix as a KV cache"),
    ({"peft__method": "prompt_tuning"}, 1,
     "data.packing: peft.method prompt_tuning prepends its virtual tokens once per row"),
    ({"parallel__strategy": "fsdp", "peft__method": "adalora"}, 2,
     "peft.method adalora: after every optimizer step AdaLoRA re-allocates its rank budget from each adapter "
     "weight's whole gradient, but parallel.strategy fsdp keeps every gradient sharded; use single or ddp"),
    ({"data__eval__generate": 4}, 1, "data.eval.generate: there is no held-out data to prompt; set data.eval.fraction"),
    ({"model__task": "sequence_classification", "data__packing": False}, 1,
     "data.datasets.0.format: model.task sequence_classification needs format classification, got chat"),
    ({"model__dtype": "bfloat16", "parallel__mixed_precision": "fp32"}, 1,
     "model.dtype: bfloat16 master weights cannot compute in parallel.mixed_precision fp32"),
    ({"model__attention": "flash_attention_2"}, 1, "model.attention: flash_attention_2 needs a CUDA device"),
    ({"parallel__strategy": "single"}, 2,
     "parallel.strategy: single runs on one process, but the world has 2 ranks; use ddp, fsdp, zero1, zero2 or zero3"),
    ({"parallel__offload": "optimizer"}, 1,
     "parallel.offload optimizer: parallel.strategy single (picked by auto) keeps the whole optimizer on the device; "
     "use fsdp, zero1, zero2 or zero3"),
    ({"parallel__strategy": "ddp", "parallel__offload": "params"}, 2,
     "parallel.offload params: parallel.strategy ddp does not shard parameters; use fsdp or zero3"),
    ({"parallel__strategy": "zero2", "parallel__offload": "params"}, 2,
     "parallel.offload params: parallel.strategy zero2 does not partition parameters; use fsdp or zero3"),
    ({"parallel__strategy": "zero3", "parallel__reshard_after_forward": False}, 2,
     "parallel.reshard_after_forward false: parallel.strategy zero3 always re-partitions parameters after forward"),
    ({"parallel__strategy": "zero3", "train__compile": True}, 2,
     "train.compile: parallel.strategy zero3 gathers parameters in hooks"),
    ({"parallel__strategy": "zero2", "checkpoint__async_": True}, 2,
     "checkpoint.async: parallel.strategy zero2 writes DeepSpeed's own checkpoint files"),
    ({"parallel__strategy": "fsdp", "parallel__deepspeed_config": "ds.json"}, 2,
     "parallel.deepspeed_config: parallel.strategy fsdp cannot honour it; use zero1, zero2 or zero3"),
    ({"parallel__strategy": "ddp", "parallel__replicate": 2}, 4, "parallel.replicate: parallel.strategy ddp"),
    ({"parallel__strategy": "fsdp", "parallel__replicate": 3}, 4,
     "parallel.replicate: 3 replicas do not divide the world of 4 ranks into equal shard groups"),
    ({"parallel__strategy": "zero4"}, 2, "parallel.strategy: 'zero4' is not one of auto, single, ddp"),
])
def test_keys_that_cannot_work_together_are_refused_by_name(tmp_path, keys, world_size, expected):
    with pytest.raises(ConfigError) as err:
        plan_run(with_keys(config(tmp_path), **keys), world_size, "cpu")
    assert expected in str(err.value)


def test_every_problem_is_reported_at_once(tmp_path):
    cfg = with_keys(config(tmp_path), parallel__strategy="ddp", parallel__offload="params", train__epochs=1.0,
                    peft__method="prompt_tuning")
    with pytest.raises(ConfigError) as err:
        plan_run(cfg, 2, "cpu")
    keys = [line.split(":")[0] for line in str(err.value).splitlines()]
    assert keys == ["data.packing", "parallel.offload params", "train"], keys


def test_missing_model_and_data():
    with pytest.raises(ConfigError) as err:
        plan_run(Config(), 1, "cpu")
    assert "model: set model.path" in str(err.value)
    assert "data.datasets: at least one dataset is required" in str(err.value)


@pytest.mark.parametrize("name", strategy_names())
def test_each_strategy_honours_or_refuses_what_it_declares(tmp_path, name):
    """A strategy's declaration is the whole truth: every capability it lists passes the plan,
    every other one is refused with a line that starts with the key it concerns."""
    from trainer.parallel.registry import requested

    cls = REGISTRY[name]
    base = config(tmp_path)
    cases = {
        "parallel.offload optimizer": {"parallel__offload": "optimizer"},
        "parallel.offload params": {"parallel__offload": "params"},
        "parallel.reshard_after_forward false": {"parallel__reshard_after_forward": False},
        "checkpoint.async": {"checkpoint__async_": True},
        "train.compile": {"train__compile": True},
        "parallel.sequence_parallel": {"parallel__sequence_parallel": 2},
    }
    for capability, keys in cases.items():
        cfg = with_keys(config(tmp_path), parallel__strategy=name, **keys)
        assert [request.capability for request in requested(cfg, 1)] == [capability]
        world = 1 if MULTI_PROCESS not in cls.supports else 2
        if capability in cls.supports:
            plan_run(cfg, world, "cpu")
        else:
            with pytest.raises(ConfigError) as err:
                plan_run(cfg, world, "cpu")
            assert str(err.value).startswith(f"{capability}: parallel.strategy {name} "), str(err.value)
    assert plan_run(with_keys(base, parallel__strategy=name), 1, "cpu").strategy == name


# ------------------------------------------------------------------------ sequence parallelism


def test_sequence_parallelism_is_a_mesh_dimension(tmp_path):
    """Sequence groups of N ranks read the same rows: the data-parallel ranks, which the batch
    splits over, are the world over N; the model is sharded over every rank (HSDP: the shard group)."""
    cfg = config(tmp_path, train={"micro_batch_size": 1, "global_batch_size": 4},
                 parallel={"strategy": "fsdp", "sequence_parallel": 2})
    plan = plan_run(cfg, 4, "cpu")
    assert (plan.mesh.shard, plan.mesh.sequence, plan.mesh.data_parallel, plan.accumulation) == (4, 2, 2, 2)
    hsdp = plan_run(with_keys(cfg, parallel__replicate=2), 4, "cpu")
    assert (hsdp.mesh.replicate, hsdp.mesh.shard, hsdp.mesh.data_parallel) == (2, 2, 2)
    with pytest.raises(ConfigError, match="do not split into micro-batches of 1 on 2 data-parallel ranks"):
        plan_run(with_keys(cfg, train__global_batch_size=3), 4, "cpu")


WIDE_HEADS = {**TINY_LLAMA, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3}


@pytest.mark.parametrize("keys, world_size, expected", [
    ({"parallel__sequence_parallel": 4}, 4,
     "parallel.sequence_parallel: the model's 2 key-value heads do not split over 4 ranks (each rank attends with 1/4 "
     "of them); use a divisor of 2"),
    ({"parallel__sequence_parallel": 4, "model__config": WIDE_HEADS}, 4,
     "parallel.sequence_parallel: the model's 6 attention heads and 3 key-value heads do not split over 4 ranks"),
    ({"parallel__sequence_parallel": 2, "model__config": WIDE_HEADS}, 2,
     "parallel.sequence_parallel: the model's 3 key-value heads do not split over 2 ranks"),
    ({"parallel__sequence_parallel": 2, "data__seq_len": 63}, 2,
     "data.seq_len: 63 tokens per row do not split over parallel.sequence_parallel 2 ranks; use a multiple of 2"),
    ({"parallel__sequence_parallel": 2}, 3,
     "parallel.sequence_parallel: 2 ranks per sequence group do not divide the world of 3 ranks"),
    ({"parallel__sequence_parallel": 2, "parallel__replicate": 4}, 4,
     "parallel.sequence_parallel: 2 ranks per sequence group do not divide the shard groups of 1 ranks"),
    ({"parallel__sequence_parallel": 2, "model__attention": "eager"}, 2,
     "parallel.sequence_parallel: attention 'eager' needs a seq_len^2 mask on every rank"),
    ({"parallel__sequence_parallel": 2, "peft__method": "prompt_tuning", "data__packing": False}, 2,
     "parallel.sequence_parallel: peft.method prompt_tuning feeds virtual tokens to every row"),
    ({"parallel__sequence_parallel": 2, "peft__method": "prefix_tuning", "data__packing": False}, 2,
     "parallel.sequence_parallel: peft.method prefix_tuning feeds virtual tokens to every row"),
])
def test_what_sequence_parallelism_cannot_shard_is_refused_in_one_line(tmp_path, keys, world_size, expected):
    with pytest.raises(ConfigError) as err:
        plan_run(with_keys(config(tmp_path, train={"global_batch_size": 8}), **keys), world_size, "cpu")
    assert str(err.value).splitlines() == [str(err.value)] and str(err.value).startswith(expected), str(err.value)


def test_sequence_parallelism_refuses_a_classification_encoder_in_one_line(tmp_path):
    from helpers import TINY_BERT

    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": "a red cat", "label": 1}])
    cfg = config(tmp_path, model={"config": dict(TINY_BERT), "task": "sequence_classification"},
                 data={"packing": False, "datasets": [{"name": "cls", "path": str(data), "format": "classification"}]},
                 parallel={"sequence_parallel": 2})
    with pytest.raises(ConfigError) as err:
        plan_run(cfg, 2, "cpu")
    assert str(err.value).startswith("parallel.sequence_parallel: model.task sequence_classification needs each row "
                                     "whole on one rank"), str(err.value)
    assert len(str(err.value).splitlines()) == 1


def test_attention_auto_takes_flash_attention_where_it_runs(tmp_path, monkeypatch):
    """auto: on CUDA with 16-bit compute flash_attn's kernels when installed, else torch's own
    (torch_varlen); elsewhere (fp32 compute, a CPU, a torch without the varlen API) packed rows
    through sdpa one document at a time, unpacked ones through sdpa with a padding mask."""
    import importlib.util

    from transformers import AttentionInterface

    from trainer.plan import resolve_attention

    cfg = config(tmp_path)
    assert resolve_attention(cfg, "cpu") == "sdpa_varlen"
    assert resolve_attention(with_keys(cfg, data__packing=False), "cpu") == "sdpa"
    for name in ("sdpa", "eager", "varlen_reference", "sdpa_varlen"):
        assert resolve_attention(with_keys(cfg, model__attention=name), "cpu") == name
    assert {"varlen_reference", "torch_varlen", "sdpa_varlen"} <= set(AttentionInterface._global_mapping)
    flash = with_keys(config(tmp_path), model__attention="flash_attention_2")
    with pytest.raises(ConfigError, match="model.attention: flash_attention_2 needs a CUDA device"):
        resolve_attention(flash, "cpu")
    with pytest.raises(ConfigError, match="model.attention: torch_varlen cannot run here: torch's FlashAttention "
                                          "kernels run on a CUDA GPU, and this process runs on cpu"):
        resolve_attention(with_keys(config(tmp_path), model__attention="torch_varlen"), "cpu")
    real_find_spec = importlib.util.find_spec
    installed = {"flash_attn": importlib.util.find_spec("flash_attn") is not None, "torch.nn.attention.varlen": True}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed[name] else None) if name in installed
                        else real_find_spec(name, *a))
    auto = with_keys(config(tmp_path), model__attention="auto")
    fp32 = with_keys(config(tmp_path), model__attention="auto", parallel__mixed_precision="fp32")
    installed["flash_attn"] = False
    with pytest.raises(ConfigError, match="model.attention: flash_attention_2 needs the flash_attn package"):
        resolve_attention(flash, "cuda")
    assert resolve_attention(auto, "cuda") == "torch_varlen"
    assert resolve_attention(fp32, "cuda") == "sdpa_varlen"  # FlashAttention kernels have no fp32
    assert resolve_attention(with_keys(config(tmp_path), model__attention="torch_varlen"), "cuda") == "torch_varlen"
    installed["flash_attn"] = True
    assert resolve_attention(auto, "cuda") == "flash_attention_2"
    assert resolve_attention(flash, "cuda") == "flash_attention_2"
    assert resolve_attention(auto, "cpu") == "sdpa_varlen"
    installed.update({"flash_attn": False, "torch.nn.attention.varlen": False})  # torch older than 2.10
    assert resolve_attention(auto, "cuda") == "sdpa_varlen"
    with pytest.raises(ConfigError, match="torch_varlen cannot run here: torch .* has no torch.nn.attention.varlen"):
        resolve_attention(with_keys(config(tmp_path), model__attention="torch_varlen"), "cuda")


# ----------------------------------------------------------------------------- resume


def test_schedule_and_cadence_change_on_resume_the_data_and_model_cannot(tmp_path):
    saved = config(tmp_path)
    resumed = with_keys(config(tmp_path), optim__lr=1e-4, train__max_steps=30, train__eval_every=5,
                        parallel__strategy="fsdp")
    assert resume_changes(saved, resumed) == [
        "optim.lr: 2e-05 -> 0.0001", "parallel.strategy: 'auto' -> 'fsdp'", "train.eval_every: 0 -> 5",
        "train.max_steps: 2 -> 30"]
    moved = with_keys(config(tmp_path), data__cache_dir="/elsewhere")
    moved.data.datasets[0].path = "/cluster/sft.jsonl"  # the same data, elsewhere
    assert len(resume_changes(saved, moved)) == 2
    for keys, key in (({"data__seq_len": 128}, "data.seq_len"), ({"run__seed": 1}, "run.seed"),
                      ({"peft__method": "lora"}, "peft.method")):
        with pytest.raises(ConfigError, match=rf"^{key}: .* differs from the checkpoint's config"):
            resume_changes(saved, with_keys(config(tmp_path), **keys))
    weights = config(tmp_path)
    weights.data.datasets[0].weight = 0.5
    with pytest.raises(ConfigError, match="data.datasets.0.weight"):
        resume_changes(saved, weights)


# ----------------------------------------------------------------------- the command and a rank


@pytest.mark.slow
def test_the_command_refuses_what_a_rank_would_before_starting_any(tmp_path):
    """`finetrain train --nproc 2` plans for 2 ranks before launching: a strategy that cannot run
    on 2 ranks stops there with the line a rank would print under torchrun, and nothing is written."""
    cfg = config(tmp_path)
    path = tmp_path / "config.yaml"
    out = Path(cfg.run.output_dir)
    expected = "parallel.strategy: single runs on one process, but the world has 2 ranks"
    command = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(path), "--nproc", "2",
                              "parallel.strategy=single"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert command.returncode == 2 and expected in command.stderr, command.stderr[-2000:]
    assert len(command.stderr.strip().splitlines()) == 1 and not out.exists()
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend",
                            "c10d", "--rdzv-endpoint", "localhost:0", "-m", "trainer", str(path),
                            "parallel.strategy=single"], capture_output=True, text=True, cwd=REPO, timeout=300,
                           env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert ranks.returncode != 0
    assert [line for line in ranks.stderr.splitlines() if line.startswith("finetrain:")] == \
        [line for line in command.stderr.splitlines() if line.startswith("finetrain:")]
