"""Regional compilation (`train.compile`): `torch.compile` on each decoder layer's forward.

The layers share their code, so dynamo compiles the forward once and every layer reuses
the graph (compiling the whole model would take far longer and break at the embedding,
the head and the loss). Only `forward` is compiled, not the module call: the hooks that
FSDP2 puts on each layer (gather before, reshard after) and activation checkpointing's
wrapper stay outside the graph, and the module keeps its class and state-dict keys.
ZeRO-3 is refused (config validation): DeepSpeed hooks every submodule inside the layer.

Where the backend cannot compile on this machine (inductor needs a C++ compiler for CPU
code) a tiny probe fails at set-up: one warning, and the run stays eager.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from trainer.model.structure import decoder_layers

log = logging.getLogger("finetrain")

BACKEND = "inductor"


def compile_decoder_layers(model: nn.Module, device: torch.device) -> bool:
    """Compile each decoder layer's forward in place; False (after one warning) when the
    backend cannot compile here. Call after activation checkpointing, before sharding."""
    problem = backend_problem(BACKEND, device.type)
    if problem:
        _on_main_rank(log.warning, "train.compile: the %s backend cannot compile on this machine (%s); "
                      "running eager", BACKEND, problem)
        return False
    layers = decoder_layers(model)
    for layer in layers:
        # dynamic: pad-free packed micro-batches change their length from step to step; compiled
        # for symbolic sizes at once, the layers never recompile for a new length (compiled for
        # the first length, they would recompile for the second and for each int specialised).
        layer.forward = torch.compile(layer.forward, backend=BACKEND, dynamic=True)
    report = CompileReport(len(layers))

    logged = False

    def log_once(optimizer, args, kwargs):
        # The hook stays registered: removing it here would change the hooks torch is iterating.
        nonlocal logged
        if not logged:
            logged = True
            _on_main_rank(log.info, "train.compile: %s", report)

    # After the first optimizer step, forward and backward have both been compiled.
    register_optimizer_step_post_hook(log_once)
    return True


@functools.cache
def backend_problem(backend: str, device_type: str) -> str | None:
    """Why `backend` fails to compile a small function here, or None."""
    def probe(x):
        return torch.nn.functional.silu(x) * x.sum()

    try:
        torch.compile(probe, backend=backend, fullgraph=True)(torch.randn(8, device=device_type))
    except Exception as err:  # whatever the compiler stack raises, the answer is: stay eager
        cause = getattr(err, "inner_exception", None) or err  # dynamo wraps what the backend raised
        while cause.__cause__ is not None:
            cause = cause.__cause__
        first_line = (str(cause).strip().splitlines() or [""])[0]
        return f"{type(cause).__name__}: {first_line}"
    return None


class CompileReport:
    """Graphs, graph breaks and recompiles since the layers were compiled (dynamo's
    process-wide counters, taken relative to their values at that moment)."""

    def __init__(self, layers: int):
        self.layers = layers
        self.start = self._counts()

    @staticmethod
    def _counts() -> dict:
        from torch._dynamo.utils import counters

        return {"frames": counters["frames"]["total"], "graphs": counters["stats"]["unique_graphs"],
                "resumes": sum(counters["resumes"].values()), "breaks": dict(counters["graph_break"])}

    def counts(self) -> dict:
        now = self._counts()
        breaks = {reason: n - self.start["breaks"].get(reason, 0) for reason, n in now["breaks"].items()}
        breaks = {reason: n for reason, n in breaks.items() if n}
        frames = now["frames"] - self.start["frames"]
        # The layers' forward is one frame; frames resumed after a graph break are others.
        recompiles = max(frames - 1 - (now["resumes"] - self.start["resumes"]), 0)
        return {"graphs": now["graphs"] - self.start["graphs"], "graph_breaks": breaks, "recompiles": recompiles}

    def __str__(self) -> str:
        c = self.counts()
        text = (f"{self.layers} decoder layers compiled with {BACKEND}: {c['graphs']} graph(s), "
                f"{sum(c['graph_breaks'].values())} graph break(s), {c['recompiles']} recompile(s)")
        if c["graph_breaks"]:
            text += "; breaks: " + "; ".join(f"{reason} (x{n})" for reason, n in c["graph_breaks"].items())
        return text


def _on_main_rank(emit, *args) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        emit(*args)
