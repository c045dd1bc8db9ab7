"""What a config may ask of a parallel strategy beyond plain data-parallel training. Each
strategy declares which of these it supports (trainer/parallel/strategy.py); the registry
turns the rest into the plan's refusals."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:

    pass


# What a config may ask of a strategy, beyond plain data-parallel training.
MULTI_PROCESS = "more than one rank"



OFFLOAD_OPTIMIZER = "parallel.offload optimizer"



OFFLOAD_PARAMS = "parallel.offload params"



REPLICATE = "parallel.replicate"  # HSDP



KEEP_GATHERED = "parallel.reshard_after_forward false"



ASYNC_SAVE = "checkpoint.async"



QUANTIZATION = "model.quantization"



COMPILE = "train.compile"



DEEPSPEED_CONFIG = "parallel.deepspeed_config"



# What some peft methods need of the strategy (trainer/peft/methods.py says which, and why).
WHOLE_GRADIENTS = "each adapter weight's whole gradient after the optimizer step"



WHOLE_BASE_WEIGHTS = "the base weights whole when the adapter is built"



SEQUENCE_PARALLEL = "parallel.sequence_parallel"  # Ulysses: rows sharded by tokens over sequence groups
