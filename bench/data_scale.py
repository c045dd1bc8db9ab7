"""Data at scale: tokenization throughput, per-rank memory and start-up time against data size.

Generated chat data of 100k, 1M and 3M conversations (a deterministic generator; the files
are kept under --work between runs). For each size, in order:

- prepare: `finetrain prepare` into an empty cache; the tokenization's own examples/s (from
  its log line, pool start-up included, interpreter start-up not), with each of --workers
  at the first size and the most workers at every size;
- run: `finetrain train --nproc 2` for --steps steps on the prepared (warm) cache; per rank
  the peak resident memory (VmHWM, polled from /proc; it counts mapped data pages the rank
  touched) and the time from launch to the end of the first step;
- checkpoint (at the first size only: the data does not change it): a 7M-parameter Llama
  trained on 2 FSDP ranks saving every --save-every steps, once with blocking saves and once
  with `checkpoint.async=true`. Two measures per save: the stall, the time the training
  loop waited for the save (the trainer's `checkpoint_wait_s` over the steps up to the next
  save: a blocking save's whole write; an async save's copy to host memory, its later seal
  included); and the wall-clock cost, the interval from the end of the step before the save
  to the end of the step after it less the median interval between steps without a save,
  which also counts the background write competing with training for the host's cores.
  Then the checksums of the checkpoint's files (what every save computes in the background and
  every resume verifies), in seconds per GB of checkpoint with its pages in the page cache; and
  with --baseline REF the same two runs from the tree of git commit REF (say, the commit before
  checksums), interleaved with this tree's, to compare the stall.

    python bench/data_scale.py [--sizes 100000 1000000 3000000] [--parts prepare run checkpoint]
                               [--baseline REF]

Writes bench/results/data_scale.json and prints a markdown table. A part is a function
(args, Workload) -> dict registered in PARTS, run per size in the order given: another
measurement (say of checkpointing) adds a function and an entry. Parts not run keep their
results from the file, so one part can be measured again (`--parts run`) without the hour
of tokenization (the caches stay in --work).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = {"model_type": "llama", "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
# What the checkpoint part saves: 7.1M parameters (the tokenizer uses the first 2,048 ids).
CHECKPOINT_MODEL = {**MODEL, "vocab_size": 8192, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                    "num_attention_heads": 8, "num_key_value_heads": 4}
GENERATOR_VERSION = 1


# --------------------------------------------------------------------------- data


def _words(count: int, rng: random.Random) -> list[str]:
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    return sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(count)})


def write_conversations(path: Path, count: int) -> Path:
    """`count` chat conversations of 6 to 60 words a turn pair, one in ten with two pairs."""
    if path.is_file():
        return path
    rng = random.Random(GENERATOR_VERSION)
    words = _words(1000, rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_suffix(".partial")
    with open(aside, "w") as f:
        for i in range(count):
            messages = []
            for _ in range(2 if i % 10 == 9 else 1):
                question = " ".join(rng.choices(words, k=rng.randint(3, 20)))
                answer = " ".join(rng.choices(words, k=rng.randint(3, 40)))
                messages += [{"role": "user", "content": question + "?"}, {"role": "assistant", "content": answer + "."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    os.replace(aside, path)
    return path


def tokenizer_folder(work: Path, data: Path) -> Path:
    """A BPE trained once on the first conversations: the runs then load it, rather than
    train one on millions of conversations at every launch."""
    folder = work / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        from trainer.model.tokenizer import train_bpe_tokenizer

        with open(data) as f:
            texts = [m["content"] for line, _ in zip(f, range(20_000)) for m in json.loads(line)["messages"]]
        train_bpe_tokenizer(texts, MODEL["vocab_size"]).save_pretrained(folder)
    return folder


@dataclasses.dataclass
class Workload:
    """One data size: its data file, and a config that trains on it (cache and run folder its own)."""

    size: int
    data: Path
    folder: Path
    config: Path


def workload(args, size: int) -> Workload:
    data = write_conversations(args.work / "data" / f"chat-{size}-v{GENERATOR_VERSION}.jsonl", size)
    folder = args.work / f"size-{size}"
    import yaml

    cfg = {
        "run": {"name": f"data-scale-{size}", "output_dir": str(folder / "run"), "seed": 0},
        "model": {"config": MODEL, "tokenizer": str(tokenizer_folder(args.work, data))},
        "data": {"seq_len": 512, "datasets": [{"name": "chat", "path": str(data), "format": "chat"}],
                 "cache_dir": str(folder / "cache")},
        "parallel": {"mixed_precision": "fp32"},
        "train": {"micro_batch_size": 4, "global_batch_size": 8, "max_steps": args.steps, "log_every": 1},
        "logging": {"progress_bar": False},
    }
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return Workload(size, data, folder, config)


def environment(source: Path = REPO) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                PYTHONPATH=str(source))


# --------------------------------------------------------------------------- parts

TOKENIZED_LINE = re.compile(r"tokenized \S+: (\d+) examples, (\d+) tokens, ([\d.]+) examples/s with (\d+) worker")
READY_LINE = re.compile(r"training data: .* ready in ([\d.]+) s")


def bench_prepare(args, load: Workload) -> dict:
    """Tokenize into an empty cache with each worker count (all of --workers at the first
    size, the most at the others); the last one leaves the cache warm for the run."""
    counts = sorted(args.workers) if load.size == args.sizes[0] else [max(args.workers)]
    result = {}
    for workers in counts:
        shutil.rmtree(load.folder / "cache", ignore_errors=True)
        shutil.rmtree(load.folder / "run", ignore_errors=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "launch.cli", "prepare", str(load.config), "--workers",
                               str(workers)], capture_output=True, text=True, cwd=REPO, env=environment())
        wall = time.perf_counter() - start
        match = TOKENIZED_LINE.search(proc.stderr)
        if proc.returncode != 0 or not match:
            raise RuntimeError(f"prepare {load.size} with {workers} workers: exit {proc.returncode}\n{proc.stderr[-3000:]}")
        examples, tokens, rate, _ = match.groups()
        result[f"workers_{workers}"] = {"examples_per_s": float(rate), "wall_s": wall}
        result.update(examples=int(examples), tokens=int(tokens))
        print(f"{load.size:>9,}: prepared with {workers} worker(s) at {float(rate):,.0f} examples/s", file=sys.stderr)
    cache = load.folder / "cache" / "tokenized"
    result["cache_bytes"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    result["data_bytes"] = load.data.stat().st_size
    return result


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak resident), RssAnon and RssFile of a process, in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0])
    return values


def bench_run(args, load: Workload) -> dict:
    """`finetrain train --nproc 2` on the warm cache: launch to first step, and per rank
    the peak resident memory and the most anonymous and file-backed memory seen; and the
    part of start-up the data takes (rank 0's own measure, from its log: mapping the cache,
    scanning lengths, building the stream)."""
    shutil.rmtree(load.folder / "run", ignore_errors=True)
    launched = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(load.config), "--nproc", str(args.nproc)],
                            cwd=REPO, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, dict[str, int]] = {}
    while proc.poll() is None:
        for pid in _children(proc.pid):  # `train --nproc` execs torchrun, whose children are the ranks
            try:
                memory = _memory_kib(pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
            seen = peaks.setdefault(pid, memory)
            for key, value in memory.items():
                seen[key] = max(seen[key], value)
        time.sleep(0.05)
    stderr = proc.stderr.read()
    if proc.returncode != 0:
        raise RuntimeError(f"train {load.size}: exit {proc.returncode}\n{stderr[-3000:]}")
    if "tokenized" in stderr:
        raise RuntimeError(f"train {load.size} tokenized again: the cache was not warm")
    records = [json.loads(line) for line in (load.folder / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r.get("step") == 1 and "loss" in r)
    ranks = sorted(peaks.values(), key=lambda m: -m["VmHWM"])[: args.nproc]
    ready = READY_LINE.search(stderr)
    result = {"launch_to_first_step_s": first["time"] - launched,
              "data_ready_s": float(ready.group(1)) if ready else None,
              "peak_rss_mib_per_rank": [m["VmHWM"] / 1024 for m in ranks],
              "max_anon_mib_per_rank": [m["RssAnon"] / 1024 for m in ranks],
              "max_file_mib_per_rank": [m["RssFile"] / 1024 for m in ranks]}
    print(f"{load.size:>9,}: first step {result['launch_to_first_step_s']:.1f} s after launch, peak RSS per rank "
          f"{', '.join(f'{x:.0f}' for x in result['peak_rss_mib_per_rank'])} MiB", file=sys.stderr)
    return result


def _save_stalls(load: Workload, save_every: int, steps: int, asynchronous: bool, source: Path = REPO) -> dict:
    """One 2-rank FSDP run of CHECKPOINT_MODEL saving every `save_every` steps, with the code of
    the tree `source`: per save but the last (which waits for its write by design), the time
    the loop waited and the wall-clock cost (see the module's docstring)."""
    run = load.folder / f"checkpoint-{'async' if asynchronous else 'blocking'}"
    shutil.rmtree(run, ignore_errors=True)
    keys = [f"run.output_dir={run}", "parallel.strategy=fsdp", f"train.max_steps={steps}",
            f"train.save_every={save_every}", f"checkpoint.async={str(asynchronous).lower()}",
            f"model.config={json.dumps(CHECKPOINT_MODEL)}", "data.seq_len=256"]
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", str(load.config), "--nproc", "2", *keys],
                          capture_output=True, text=True, cwd=source, env=environment(source))
    if proc.returncode != 0:
        raise RuntimeError(f"checkpoint run: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    records = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
    intervals = {step: records[step + 1]["time"] - records[step]["time"] for step in records if step + 1 in records}
    saves = [step for step in intervals if step % save_every == 0 and step + save_every in records]
    plain = statistics.median(v for step, v in intervals.items() if step % save_every)
    return {"step_s": plain,
            "stall_s": [sum(records[s]["checkpoint_wait_s"] for s in range(step + 1, step + save_every + 1))
                        for step in saves],
            "wall_s": [intervals[step] - plain for step in saves],
            "checkpoint_bytes": sum(f.stat().st_size for f in (run / "checkpoints").rglob("*") if f.is_file())
            // len(list((run / "checkpoints").iterdir()))}


def bench_checkpoint(args, load: Workload) -> dict | None:
    """Blocking against asynchronous saves, the checksums' cost, and with --baseline the
    stall of another tree's code (see the module's docstring)."""
    if load.size != args.sizes[0]:
        return None
    steps = 10 * args.save_every + 1
    baseline = _baseline_tree(args.baseline, args.work) if args.baseline else None
    result: dict = {}
    for mode in ("blocking", "async"):
        if baseline is not None:  # interleaved, so that the machine's load falls on both alike
            result.setdefault("baseline", {"ref": args.baseline})[mode] = _save_stalls(
                load, args.save_every, steps, mode == "async", baseline)
        result[mode] = _save_stalls(load, args.save_every, steps, mode == "async")
        if mode == "blocking":
            result["checksums"] = _checksum_cost(load.folder / "checkpoint-blocking" / "checkpoints")
    for measure in ("stall_s", "wall_s"):
        blocking, background = (statistics.mean(result[m][measure]) for m in ("blocking", "async"))
        result[f"async_over_blocking_{measure.removesuffix('_s')}"] = background / blocking
        if baseline is not None:
            for mode in ("blocking", "async"):
                result["baseline"][f"{mode}_{measure.removesuffix('_s')}_over_baseline"] = (
                    statistics.mean(result[mode][measure]) / statistics.mean(result["baseline"][mode][measure]))
    print(f"{load.size:>9,}: " + checkpoint_line(result), file=sys.stderr)
    return result


def _baseline_tree(ref: str, work: Path) -> Path:
    """The files of commit `ref` (git archive), to run its code beside this tree's."""
    tree = work / f"baseline-{ref}"
    if not (tree / "trainer").is_dir():
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def _checksum_cost(checkpoints: Path, repeats: int = 5) -> dict:
    """Seconds per GB to sum every file of the newest checkpoint (as its ranks do while it is
    sealed, and as resume does when it verifies), its pages in the page cache: the median of
    `repeats` passes."""
    from trainer.checkpoint.checksums import checkpoint_files, sum_files

    newest = sorted(checkpoints.glob("step-*"))[-1]
    names = [n for n in checkpoint_files(newest) if n != "COMPLETE"]
    size = sum((newest / n).stat().st_size for n in names)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sum_files(newest, names)
        times.append(time.perf_counter() - start)
    return {"bytes": size, "files": len(names), "seconds": statistics.median(times),
            "seconds_per_gb": statistics.median(times) / (size / 1e9)}


def checkpoint_line(result: dict) -> str:
    mean = {(mode, measure): statistics.mean(result[mode][measure])
            for mode in ("blocking", "async") for measure in ("stall_s", "wall_s")}
    line = (f"save of a {result['blocking']['checkpoint_bytes'] / 1e6:.0f} MB checkpoint, 2 ranks, a step "
            f"{result['blocking']['step_s']:.2f} s: training waits {mean['blocking', 'stall_s']:.3f} s blocking, "
            f"{mean['async', 'stall_s']:.3f} s async ({result['async_over_blocking_stall']:.2f}x); wall-clock cost "
            f"{mean['blocking', 'wall_s']:.3f} s blocking, {mean['async', 'wall_s']:.3f} s async "
            f"({result['async_over_blocking_wall']:.2f}x)")
    if "checksums" in result:
        line += f"; checksums {result['checksums']['seconds_per_gb']:.3f} s/GB"
    if "baseline" in result:
        base = result["baseline"]
        line += (f"; against {base['ref']}: stall {base['blocking_stall_over_baseline']:.2f}x blocking, "
                 f"{base['async_stall_over_baseline']:.2f}x async, wall-clock {base['blocking_wall_over_baseline']:.2f}x "
                 f"blocking, {base['async_wall_over_baseline']:.2f}x async")
    return line


PARTS: dict[str, Callable[[argparse.Namespace, Workload], dict | None]] = {
    "prepare": bench_prepare, "run": bench_run, "checkpoint": bench_checkpoint}


# --------------------------------------------------------------------------- report


def table(results: list[dict]) -> str:
    lines = ["| conversations | JSONL (MB) | tokens | prepare, most workers (examples/s) | peak RSS per rank (MiB) | "
             "data ready in (s) | launch to first step (s) |", "|---:|---:|---:|---:|---:|---:|---:|"]
    nan = float("nan")
    for r in results:
        prepare, run = r.get("prepare", {}), r.get("run", {})
        workers = [k for k in prepare if k.startswith("workers_")]
        rate = prepare[max(workers, key=lambda k: int(k.split("_")[1]))]["examples_per_s"] if workers else nan
        ready = run.get("data_ready_s")
        lines.append(f"| {r['size']:,} | {prepare.get('data_bytes', 0) / 1e6:,.0f} | {prepare.get('tokens', 0):,} | "
                     f"{rate:,.0f} | {max(run.get('peak_rss_mib_per_rank', [nan])):,.0f} | "
                     f"{nan if ready is None else ready:.1f} | {run.get('launch_to_first_step_s', nan):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 3_000_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--save-every", type=int, default=4, help="checkpoint part: steps between saves")
    parser.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS))
    parser.add_argument("--baseline", help="checkpoint part: also run the commit REF's code, to compare the stall")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "finetrain-data-scale",
                        help="generated data, caches and runs (kept between runs)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "data_scale.json")
    args = parser.parse_args()

    by_size = {r["size"]: r for r in json.loads(args.out.read_text())["results"]} if args.out.is_file() else {}
    for size in args.sizes:
        load = workload(args, size)
        measured = {part: PARTS[part](args, load) for part in args.parts}
        by_size[size] = {**by_size.get(size, {}), "size": size, **{k: v for k, v in measured.items() if v is not None}}
    results = [by_size[size] for size in sorted(by_size)]
    import torch

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "parts"}
    report = {"model": MODEL, "settings": settings, "torch": torch.__version__, "machine": platform.machine(),
              "cpus": os.cpu_count(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(results))
    for r in results:
        if "wall_s" in r.get("checkpoint", {}).get("async", {}):
            print("\n" + checkpoint_line(r["checkpoint"]))
    runs = [r for r in results if "run" in r]
    if len(runs) > 1:
        growth = max(runs[-1]["run"]["peak_rss_mib_per_rank"]) - max(runs[0]["run"]["peak_rss_mib_per_rank"])
        print(f"\npeak RSS per rank grows by {growth:.0f} MiB from {runs[0]['size']:,} to {runs[-1]['size']:,} conversations")


if __name__ == "__main__":
    main()
