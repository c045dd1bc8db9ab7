"""Chaos soak: a 2-rank run of `finetrain train --max-restarts` with faults injected at seeded random
steps, against the same run without them.

The faults, each after a step drawn from the seed:
- kill: SIGKILL to one rank (as the kernel's OOM killer sends);
- stop: SIGSTOP to one rank during a step: the launcher's watch finds it after
  parallel.step_timeout_s, names it, and ends the attempt;
- term: SIGTERM to the whole job (as Slurm, Kubernetes or a terminal send): every rank saves and the
  launcher exits 0; the job is then started again with the same command, as a scheduler's requeue;
- fill: the checkpoint folder's file system fills up before the next save, which fails (no space
  left); the space comes back once the restart is under way;
- flip: bytes flipped in a shard of the newest checkpoint, then SIGKILL to both ranks (a node
  that fails): the restart finds the checkpoint failing its checksums and resumes from the one
  before.

The checkpoint folder is a tmpfs in a mount namespace of this script's own (`unshare -rm`: no root
outside it needed, nothing mounted where others see it). At the end the script compares the faulty
run with the uninterrupted one: every step once in metrics.jsonl with the same loss (bit for bit), the
final checkpoint's weights and optimizer state equal bit for bit (fp32, CPU), and prints faults
injected, restarts, steps recomputed and steps lost (which must be 0). Exit code 0 when nothing was
lost and everything is equal.

    python bench/chaos_soak.py [--steps 160] [--faults kill stop term fill flip] [--count 20] [--seed 0]
                               [--out DIR] [--json bench/results/chaos_soak.json]

tests/launch/test_elastic_chaos.py runs it with a few dozen steps and one fault of each kind.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the repository (launch/rank_watch.py starts without torch)

from launch.rank_watch import agent_ranks  # noqa: E402
from trainer.runtime.faults import WATCH_DIR_ENV  # noqa: E402
FAULTS = ("kill", "stop", "term", "fill", "flip")
RESTARTING = ("kill", "stop", "fill", "flip")  # faults the launcher heals by itself (term: the job is started again)
STEP_TIMEOUT_S = 10  # parallel.step_timeout_s: how long a stopped rank goes unnoticed
TMPFS_BYTES = 64 << 20


def run_config(out: Path, data: Path, steps: int) -> dict:
    """The run: a tiny Llama on 2 ranks (ddp, fp32), chat data, a checkpoint every 4 steps."""
    return {
        "run": {"name": "chaos", "output_dir": str(out), "seed": 0},
        "model": {"config": {"model_type": "llama", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "max_position_embeddings": 256, "tie_word_embeddings": False},
                  "tokenizer": "train-bpe"},
        "data": {"seq_len": 64, "datasets": [{"name": "sft", "path": str(data), "format": "chat"}],
                 "cache_dir": str(out.parent / "cache")},
        "parallel": {"strategy": "ddp", "mixed_precision": "fp32", "step_timeout_s": STEP_TIMEOUT_S},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": steps, "log_every": 1,
                  "save_every": 4},
        # every checkpoint kept: retention freeing space would undo a full disk
        "checkpoint": {"keep_last": steps // 4 + 1},
        "logging": {"progress_bar": False},
    }


def chat_data(path: Path, rows: int = 160) -> Path:
    rng = random.Random(0)
    words = "alpha beta gamma delta red green blue cat dog bird fish tree river stone cloud".split()
    with open(path, "w") as f:
        for _ in range(rows):
            chosen = [rng.choice(words) for _ in range(rng.randint(2, 9))]
            f.write(json.dumps({"messages": [{"role": "user", "content": "reverse: " + " ".join(chosen)},
                                             {"role": "assistant", "content": " ".join(reversed(chosen))}]}) + "\n")
    return path


def schedule(seed: int, steps: int, faults: list[str], count: int) -> list[tuple[int, str, int]]:
    """(after step, fault, rank) in the order they are injected: one of each kind in turn, shuffled,
    each after a distinct step drawn from the seed."""
    rng = random.Random(seed)
    kinds = [faults[i % len(faults)] for i in range(count)]
    rng.shuffle(kinds)
    at = sorted(rng.sample(range(2, steps - 1), count))
    return [(step, kind, rng.randrange(2)) for step, kind in zip(at, kinds)]


def environment() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                PYTHONPATH=str(REPO))


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    found = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:  # a line being written
                continue
    return found


def last_step(out: Path) -> int:
    steps = [r["step"] for r in records(out) if "loss" in r]
    return steps[-1] if steps else 0


def stop_during_a_step(pid: int) -> bool:
    """SIGSTOP rank `pid` while its heartbeat says it is in a step (a checkpoint or an evaluation runs
    under the longer parallel.init_timeout_s); False when it ended first."""
    try:
        environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                       if b"=" in item)
    except OSError:
        return False
    beat = Path(environ[WATCH_DIR_ENV.encode()].decode()) / f"rank-{int(environ[b'RANK'])}.json"
    for _ in range(600):
        try:
            os.kill(pid, signal.SIGSTOP)
            phase = json.loads(beat.read_text())["phase"]
        except (OSError, ValueError, KeyError):
            return False
        if phase in ("data", "compute", "end of step"):
            return True
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)
    return False


def newest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").is_file())
    return done[-1] if done else None


class Launch:
    """One `finetrain train --nproc 2 --max-restarts N` of the run, its stderr read line by line."""

    def __init__(self, config: Path, max_restarts: int, log):
        self.proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(config), "--nproc", "2",
                                      "--max-restarts", str(max_restarts)], cwd=REPO, env=environment(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.log = log
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self.log.write(line)
            self.log.flush()

    def restarts_said(self) -> int:
        return sum(line.startswith("finetrain: restart ") for line in self.lines)


def frozen(pids: dict[int, int]):
    """The ranks stopped while a fault is set up (a full disk, flipped bytes), so that it is in place
    before the run takes its next step, however fast the steps go."""
    import contextlib

    @contextlib.contextmanager
    def freeze():
        for pid in pids.values():
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in pids.values():
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass

    return freeze()


def folder_bytes(folder: Path) -> int:
    """What a folder takes on a tmpfs (whole pages per file)."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in folder.rglob("*") if f.is_file())


def inject(kind: str, rank: int, launch: Launch, out: Path) -> str:
    """Inject one fault; returns what was done."""
    pids = agent_ranks(launch.proc.pid)
    if kind == "term":
        os.killpg(launch.proc.pid, signal.SIGTERM)
        return "SIGTERM to the job"
    if kind == "stop":
        return f"SIGSTOP to rank {rank}" if stop_during_a_step(pids[rank]) else "(rank ended first)"
    if kind == "kill":
        os.kill(pids[rank], signal.SIGKILL)
        return f"SIGKILL to rank {rank}"
    with frozen(pids):
        newest = newest_checkpoint(out)
        if kind == "fill":  # room for half a checkpoint: the next save fails
            filler = max(0, shutil.disk_usage(out / "checkpoints").free - folder_bytes(newest) // 2)
            with open(out / "checkpoints" / "filler.bin", "wb") as f:
                f.write(bytes(filler))  # tmpfs counts the pages written
            return f"checkpoint disk filled ({filler:,} bytes written, {folder_bytes(newest) // 2:,} left)"
        shard = newest / "dcp" / f"__{rank}_0.distcp"
        data = bytearray(shard.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
        shard.write_bytes(bytes(data))
        # Both ranks, while still stopped (as a node that fails): a rank left running could seal a
        # newer checkpoint in the background, and the restart would never look at the flipped one.
        for pid in pids.values():
            os.kill(pid, signal.SIGKILL)
        return f"flipped 64 bytes of {shard.relative_to(out)}, then SIGKILL to both ranks"


def attempt_step(out: Path, restarts: int) -> int:
    """The last step the current attempt logged, once the run has reported `restarts` restarts (0
    while the attempt after the last fault is not yet under way: its records come after its restart
    record, the failed attempt's before)."""
    found = records(out)
    marks = [i for i, r in enumerate(found) if "restart" in r]
    if len(marks) < restarts:
        return 0
    steps = [r["step"] for r in found[marks[-1] + 1 if marks else 0:] if "loss" in r]
    return steps[-1] if steps else 0


def faulty_run(config: Path, out: Path, plan: list[tuple[int, str, int]], log) -> dict:
    """Run to the last step with the faults of `plan` injected; the job started again after a SIGTERM."""
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(out / "checkpoints")],
                   check=True)
    filler = out / "checkpoints" / "filler.bin"
    pending = list(plan)
    injected, launches, restarts_said, restarts_caused = [], 0, 0, 0
    launch = None
    try:
        while True:
            launch = Launch(config, len(plan), log)
            launches += 1
            while launch.proc.poll() is None:
                if pending and attempt_step(out, restarts_caused) >= pending[0][0] and \
                        len(agent_ranks(launch.proc.pid)) == 2:
                    step, kind, rank = pending.pop(0)
                    said = launch.restarts_said()
                    injected.append({"after_step": step, "fault": kind, "what": inject(kind, rank, launch, out)})
                    restarts_caused += kind in RESTARTING
                    if kind == "fill":  # the space comes back once the failed save has restarted the run
                        while launch.proc.poll() is None and launch.restarts_said() == said:
                            time.sleep(0.05)
                        filler.unlink(missing_ok=True)
                time.sleep(0.05)
            time.sleep(0.2)  # the reader has the last lines
            restarts_said += launch.restarts_said()
            filler.unlink(missing_ok=True)
            code = launch.proc.returncode
            summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
            if code != 0 or summary.get("status") == "finished":
                final = newest_checkpoint(out)  # out of the tmpfs, which goes with this namespace
                if final is not None:
                    shutil.copytree(final, out / "final-checkpoint")
                return {"exit_code": code, "launches": launches, "injected": injected, "restarts_said": restarts_said,
                        "summary": summary, "lines": launch.lines[-20:]}
    finally:
        if launch is not None and launch.proc.poll() is None:
            for pid in agent_ranks(launch.proc.pid).values():
                os.kill(pid, signal.SIGKILL)
            os.killpg(launch.proc.pid, signal.SIGKILL)


def checkpoint_state(checkpoint: Path) -> dict:
    """Every tensor and value of a DCP checkpoint (model and optimizer), read in this process."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(checkpoint / "dcp"), f"{tmp}/state.pt")
        return torch.load(f"{tmp}/state.pt", weights_only=False)  # written just now by this process


def flatten(state, prefix: str = "") -> dict:
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, value in enumerate(state) for k, v in flatten(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): state}


def compare(faulty: Path, reference: Path, steps: int) -> dict:
    """Steps lost, steps logged twice, steps whose loss differs, and state entries that differ."""
    import torch

    logged = [r for r in records(faulty) if "loss" in r]
    counts = {}
    for r in logged:
        counts[r["step"]] = counts.get(r["step"], 0) + 1
    expected = {r["step"]: r["loss"] for r in records(reference) if "loss" in r}
    got = {r["step"]: r["loss"] for r in logged}
    lost = [s for s in range(1, steps + 1) if s not in got]
    final = f"step-{steps:08d}"
    a = flatten(checkpoint_state(faulty / "checkpoints" / final))
    b = flatten(checkpoint_state(reference / "checkpoints" / final))
    differ = sorted(k for k in set(a) | set(b) if k not in a or k not in b or
                    (torch.is_tensor(a[k]) and not (torch.is_tensor(b[k]) and a[k].dtype == b[k].dtype
                                                   and torch.equal(a[k], b[k])))
                    or (not torch.is_tensor(a[k]) and a[k] != b[k]))
    return {"steps_lost": len(lost), "steps_logged_twice": sum(1 for c in counts.values() if c > 1),
            "losses_differing": sum(1 for s, v in got.items() if expected.get(s) != v),
            "state_entries": len(a), "state_entries_differing": differ,
            "restart_records": [r for r in records(faulty) if "restart" in r]}


def in_namespace(args) -> int:
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    data = chat_data(work / "sft.jsonl")
    reference_out, faulty_out = work / "reference", work / "faulty"
    configs = {}
    for name, out in (("reference", reference_out), ("faulty", faulty_out)):
        configs[name] = work / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(run_config(out, data, args.steps)))
    started = time.time()
    subprocess.run([sys.executable, "-m", "launch.cli", "train", str(configs["reference"]), "--nproc", "2"],
                   cwd=REPO, env=environment(), check=True, capture_output=True)
    reference_s = time.time() - started
    plan = schedule(args.seed, args.steps, args.faults, args.count)
    started = time.time()
    with open(work / "faulty-launcher.log", "w") as log:
        run = faulty_run(configs["faulty"], faulty_out, plan, log)
    faulty_s = time.time() - started
    result = {"steps": args.steps, "seed": args.seed, "schedule": plan, "reference_s": round(reference_s, 1),
              "faulty_s": round(faulty_s, 1), **run}
    if run["exit_code"] == 0:
        result.update(compare(faulty_out, reference_out, args.steps))
    summary = run["summary"]
    result["restarts"] = summary.get("restarts")
    result["steps_recomputed"] = summary.get("steps_recomputed")
    ok = run["exit_code"] == 0 and len(run["injected"]) == len(plan) and result.get("steps_lost") == 0 and not result.get("state_entries_differing") \
        and result.get("losses_differing") == 0 and result.get("steps_logged_twice") == 0
    result["ok"] = ok
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print("| faults injected | launches | restarts | steps recomputed | steps lost | weights and optimizer state |")
    print("|---:|---:|---:|---:|---:|---|")
    print(f"| {len(run['injected'])} | {run['launches']} | {result['restarts']} | {result['steps_recomputed']} | "
          f"{result.get('steps_lost')} | {'equal bit for bit' if not result.get('state_entries_differing') else 'DIFFER'} |")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    parser.add_argument("--count", type=int, default=20, help="faults injected, the kinds in turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "chaos_soak.json"))
    parser.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.count > args.steps - 3:
        parser.error("--count: at most one fault per step, between step 2 and the last but one")
    if args.in_namespace:
        return in_namespace(args)
    out = args.out or tempfile.mkdtemp(prefix="chaos-soak-")
    command = [sys.executable, __file__, "--in-namespace", "--steps", str(args.steps), "--faults", *args.faults,
               "--count", str(args.count), "--seed", str(args.seed), "--out", out, "--json", args.json]
    return subprocess.run(["unshare", "-rm", *command]).returncode


if __name__ == "__main__":
    sys.exit(main())
