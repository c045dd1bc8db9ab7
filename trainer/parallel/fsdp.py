"""FSDP2: parameters, gradients and optimizer state sharded over ranks as DTensors.

Each decoder layer is its own `fully_shard` unit (gathered just before it runs,
resharded after), and so are the input embedding and the LM head unless they are
tied; the root takes the rest (final norm, tied embeddings, peft prompt encoders).
Gradients are reduce-scattered after every micro-batch: skipping that
(`set_requires_gradient_sync(False)`) would hold an unsharded gradient of the
whole model on every rank until the last micro-batch, which is the memory that
sharding exists to save.

`parallel.offload` (FSDP2 has a single CPU offload policy, `CPUOffloadPolicy`):
the sharded parameters, their gradients and the optimizer state live in host
memory and the optimizer step runs on the CPU; each unit's shard is copied to
the device for its all-gather. FSDP2 cannot keep parameters on the device while
the optimizer state is on the host (the optimizer updates the shards in place),
so `optimizer` and `params` mean the same thing here.
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from trainer.config.capabilities import KEEP_GATHERED, OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS, REPLICATE, WHOLE_GRADIENTS
from trainer.config.schema import Config
from trainer.model.structure import decoder_layers
from trainer.optim import ADAM_MOMENTS
from trainer.parallel.layer_options import apply_layer_options
from trainer.parallel.torch_strategy import TorchStrategy

log = logging.getLogger("finetrain")


class FSDPStrategy(TorchStrategy):
    names = ("fsdp",)
    supports = TorchStrategy.supports - {WHOLE_GRADIENTS} | {OFFLOAD_OPTIMIZER, OFFLOAD_PARAMS, REPLICATE, KEEP_GATHERED}
    why_not = {WHOLE_GRADIENTS: "keeps every gradient sharded"}

    @classmethod
    def config_problems(cls, cfg: Config, world_size: int) -> list[str]:
        replicas = cfg.parallel.replicate
        if world_size % replicas:
            return [f"parallel.replicate: {replicas} replicas do not divide the world of {world_size} ranks "
                    "into equal shard groups"]
        return []

    @classmethod
    def memory(cls, name: str, shape, size, acts: int, cfg: Config, world: int) -> dict:
        """Weights, gradients and moments sharded over the shard group (world/R with HSDP), plus
        the units gathered at a time in the compute dtype: the root and the head from the end of
        forward into backward, decoder layers two at a time (the one running, the one prefetched)
        or all of them when not resharded after forward; gradients unsharded one unit at a time
        (plus the root's, reduced last). `offload` puts the shards in host memory."""
        group = max(1, world // cfg.parallel.replicate)
        shard_params = math.ceil((shape.total - size.quantized) / group) * size.master \
            + math.ceil(size.packed / group) + size.constants
        shard_grads = math.ceil(shape.trainable / group) * size.master
        shard_moments = ADAM_MOMENTS * shard_grads

        def unsharded(unit) -> int:
            return (unit.total - unit.quantized) * size.compute + math.ceil(unit.quantized / 2)

        layers = 2 if cfg.parallel.reshard_after_forward else shape.layers
        gathered = unsharded(shape.root) + unsharded(shape.head) + layers * unsharded(shape.layer)
        largest = max(shape.layer.trainable, shape.head.trainable, shape.embedding.trainable)
        gathered_grads = (shape.root.trainable + largest) * size.compute
        row = {"gathered": gathered, "saved": shard_params + shard_moments}
        if cfg.parallel.offload != "none":
            return {**row, "params": gathered, "grads": gathered_grads, "optimizer": 0,
                    "host": shard_params + shard_grads + shard_moments}
        return {**row, "params": shard_params + gathered, "grads": shard_grads + gathered_grads,
                "optimizer": shard_moments, "host": 0}

    def mixed_precision_policy(self) -> MixedPrecisionPolicy:
        """bf16 compute and all-gathers; gradients reduced in fp32, master weights untouched."""
        if self.compute_dtype() == torch.float32:
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=self.compute_dtype(), reduce_dtype=torch.float32)

    def device_mesh(self):
        """1-D over all ranks; with `parallel.replicate` R > 1 a 2-D (replicate, shard) mesh, on
        which fully_shard shards within each group of world/R ranks and replicates across the
        R groups (HSDP): gradients are reduce-scattered in the group, then all-reduced across."""
        mesh = self.plan.mesh
        if mesh.replicate == 1:
            return init_device_mesh(self.dist.device.type, (mesh.shard,))
        return init_device_mesh(self.dist.device.type, (mesh.replicate, mesh.shard),
                                mesh_dim_names=("replicate", "shard"))

    def offload_policy(self) -> OffloadPolicy:
        if self.cfg.parallel.offload == "none":
            return OffloadPolicy()
        log.info("parallel.offload %s: FSDP2 keeps the sharded parameters, gradients and optimizer "
                 "state in host memory and steps the optimizer on the CPU", self.cfg.parallel.offload)
        return CPUOffloadPolicy(pin_memory=self.dist.device.type == "cuda")

    def setup(self, model: nn.Module, total_steps: int) -> None:
        apply_layer_options(model, self.cfg, self.dist.device)
        tied = _tied_parameter_names(model)
        mesh = self.device_mesh()
        policies = {"mesh": mesh, "mp_policy": self.mixed_precision_policy(), "offload_policy": self.offload_policy()}
        reshard = self.cfg.parallel.reshard_after_forward
        embedding, head = separate_embeddings(model)
        if embedding is not None:
            fully_shard(embedding, reshard_after_forward=reshard, **policies)
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=reshard, **policies)
        # The head (and the root: final norm, tied embeddings) is needed again as soon as
        # backward starts, so resharding it after forward would only add an all-gather.
        if head is not None:
            fully_shard(head, reshard_after_forward=False, **policies)
        fully_shard(model, reshard_after_forward=False, **policies)
        _check_still_tied(model, tied)
        self.model = model
        self.build_optimizer(model, total_steps)

    def frozen_copy(self, make_model) -> nn.Module:
        """Sharded as the trained model is, on the same mesh and mixed precision: its decoder layers
        gathered one at a time in forward (there is no backward to keep them for)."""
        model = make_model()
        model.requires_grad_(False)
        policies = {"mesh": self.device_mesh(), "mp_policy": self.mixed_precision_policy(),
                    "offload_policy": self.offload_policy()}
        for layer in decoder_layers(model):
            fully_shard(layer, reshard_after_forward=True, **policies)
        fully_shard(model, reshard_after_forward=True, **policies)
        return model.eval()

    def autocast(self):
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts parameters itself

    @contextlib.contextmanager
    def generation(self):
        """Each unit keeps its gathered parameters from its first forward to the end of the
        generation rather than gathering them again for every new token (tens of all-gathers
        of the whole model per answer); meanwhile every rank holds the model unsharded, as
        ZeRO-3 generation does."""
        units = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        resharding = [m._get_fsdp_state()._fsdp_param_group is not None
                      and m._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None for m in units]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for unit, reshard in zip(units, resharding):
                unit.set_reshard_after_forward(reshard, recurse=False)
                unit.reshard()


def separate_embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The input embedding and the LM head as units of their own, so that their (large,
    vocabulary-sized) gradients are reduce-scattered as soon as they are computed rather
    than held unsharded until the root finishes. Tied, they stay together in the root."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embedding is None or head is None or head.weight is embedding.weight:
        return None, None
    return embedding, head


def _tied_parameter_names(model: nn.Module) -> list[list[str]]:
    """Groups of names that share one parameter (e.g. input embedding and LM head)."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _check_still_tied(model: nn.Module, groups: list[list[str]]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for names in groups:
        if any(params[name] is not params[names[0]] for name in names[1:]):
            raise RuntimeError(f"fsdp: sharding untied the shared parameters {names}")
