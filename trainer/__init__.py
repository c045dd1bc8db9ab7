"""finetrain's library; `python -m trainer CONFIG [key=value ...]` is what torchrun runs."""

import logging

# bitsandbytes (imported by peft) warns on CPUs with AVX512-BF16 that an optional kernel package
# is missing: its own 4-bit CPU matmul works without it, and most runs never use it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# bitsandbytes asks the `kernels` package for its CPU kernel; with the hub offline (compute nodes,
# tests) `kernels` warns on every run that it cannot check the cached kernel's publisher.
logging.getLogger("kernels._internals.hf_hub").setLevel(logging.ERROR)
