"""QLoRA: the frozen base in 4-bit NormalFloat (bitsandbytes), the adapter on top.

Quantization happens as the pretrained weights load (transformers' bitsandbytes
integration): every linear layer but the LM head (and a classification head) becomes
a `bnb.nn.Linear4bit` whose weight is a packed 4-bit tensor plus per-block scales (its
`quant_state`). Embeddings, norms and the adapter stay in `model.dtype`.

The 4-bit weights never change and are a deterministic function of the base model, so
checkpoints leave them out (`without_quantized_weights`): resume and export re-quantize
`model.path` and get the same bits back.
"""

from __future__ import annotations

import ctypes
import gc
import math
import sys

import torch
from torch import nn

from trainer.config.schema import Config
from trainer.runtime.precision import compute_dtype as precision_dtype

BLOCK_SIZE = 64  # elements per absmax scale (transformers' default for bitsandbytes 4-bit)
NESTED_BLOCK_SIZE = 256  # scales per second-level scale (double quantization)


def compute_dtype(cfg: Config) -> torch.dtype:
    """The dtype the 4-bit weights are dequantized to for each matmul: the compute dtype of
    every strategy (`Strategy.compute_dtype`), known here before a strategy exists."""
    return precision_dtype(cfg.parallel.mixed_precision, cfg.model.dtype)


def bnb_config(cfg: Config):
    """transformers' BitsAndBytesConfig for `model.quantization: nf4`.

    The packed 4-bit data is stored in tensors of the compute dtype (two 4-bit values per
    byte, reinterpreted): FSDP2's MixedPrecisionPolicy casts floating parameters to the
    compute dtype before its all-gather, which converts values and would destroy packed
    bits stored in any other floating dtype; in the compute dtype the cast is a no-op.
    Double quantization (the scales themselves quantized to 8 bits) saves another
    0.37 bits per parameter."""
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype(cfg)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.model.quantization,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
        bnb_4bit_use_double_quant=True,
    )


def _bitsandbytes_nn():
    """bitsandbytes' layer classes, or None where no 4-bit layer can exist: bitsandbytes is not
    installed, or nothing in this process imported it (quantizing a model imports it). Importing
    it costs seconds (it loads torch's compiler), which an unquantized run never pays."""
    if "bitsandbytes" not in sys.modules:
        return None
    try:
        import bitsandbytes.nn
    except ImportError:
        return None
    return bitsandbytes.nn


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The 4-bit linear layers of `model` by module name (empty for an unquantized model)."""
    bnb = _bitsandbytes_nn()
    if bnb is None:
        return {}
    return {name: module for name, module in model.named_modules() if isinstance(module, bnb.Linear4bit)}


def is_quantized_weight(param: torch.Tensor) -> bool:
    """A 4-bit weight (before sharding: FSDP2 turns it into a DTensor)."""
    bnb = _bitsandbytes_nn()
    return bnb is not None and isinstance(param, bnb.Params4bit)


def prepare_quantized(model: nn.Module) -> None:
    """Right after a quantized load: keep one weight layout, and give back the memory that
    quantizing on load leaves behind."""
    keep_training_layout(model)
    release_loading_memory(model)


def keep_training_layout(model: nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place into another
    layout (with bf16 scales) the first time it runs in eval mode without gradients. That
    changes the numbers of every later forward, training ones included, and under FSDP2
    it rewrites the gathered copy of a sharded parameter, which corrupts the shard."""
    for module in quantized_linears(model).values():
        module.support_avx512bf16_for_cpu = False


def release_loading_memory(model: nn.Module) -> None:
    """Loaded on the CPU, the unquantized weights (embeddings, norms, head) are views into the
    memory-mapped safetensors file, which keeps resident every page that was read to
    quantize the rest; and glibc keeps the freed full-precision temporaries of quantization
    in its arenas. Copy those weights out of the mapping, so it closes, and hand the free
    memory back to the system: SmolLM2-135M holds 460 MiB less after loading."""
    _trim_malloc()  # first, so that the copies reuse freed memory
    with torch.no_grad():
        for param in model.parameters():
            if param.device.type == "cpu" and not is_quantized_weight(param):
                param.data = param.data.clone()
    gc.collect()
    _trim_malloc()


def _trim_malloc() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        pass


def logical_numel(param: torch.Tensor) -> int:
    """Elements of the weight a parameter stands for: a packed 4-bit weight holds several."""
    quant_state = getattr(param, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else param.numel()


def without_quantized_weights(model: nn.Module, state: dict) -> dict:
    """`state` (a model state dict) without the frozen 4-bit weights: `<linear>.weight` and its
    quant-state entries `<linear>.weight.absmax`, ... (the same names sharded or not)."""
    weights = {f"{name}.weight" for name in quantized_linears(model)}
    if not weights:
        return state
    return {key: value for key, value in state.items()
            if key not in weights and not key.startswith(tuple(w + "." for w in weights))}


@torch.no_grad()
def dequantized_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict of an unquantized twin of `model` (same names): each 4-bit weight
    dequantized to `dtype`, the matrix every training forward dequantizes and multiplies with."""
    from bitsandbytes.functional import dequantize_4bit

    linears = quantized_linears(model)
    state = without_quantized_weights(model, model.state_dict())
    for name, module in linears.items():
        state[f"{name}.weight"] = dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
    return state


def nf4_bytes(numel: int) -> int:
    """Bytes bitsandbytes holds for one weight of `numel` elements in NF4 with double
    quantization: the packed data (half a byte each), one 8-bit scale per block of 64,
    one fp32 scale (and offset) per 256 scales, and the two lookup tables (16 and 256
    fp32 values). About 0.52 bytes per parameter."""
    blocks = math.ceil(numel / BLOCK_SIZE)
    nested_blocks = math.ceil(blocks / NESTED_BLOCK_SIZE)
    packed = math.ceil(numel / 2)
    return packed + blocks + 4 * nested_blocks + 4 + 4 * 16 + 4 * 256


def quant_state_bytes(model: nn.Module) -> int:
    """Bytes of the quantization constants (scales, lookup tables) of every 4-bit weight:
    not parameters, so sharding leaves them whole on every rank."""
    seen: set = set()
    total = 0
    for module in quantized_linears(model).values():
        state = module.quant_state
        tensors = [state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        for tensor in tensors:
            if tensor.untyped_storage().data_ptr() not in seen:
                seen.add(tensor.untyped_storage().data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def quantize_skeleton(model: nn.Module, cfg: Config) -> None:
    """Swap in the 4-bit linear layers exactly as `from_pretrained` does before it loads any
    weight (same quantizer, same layers left unquantized). On a meta-device model this says,
    without loading anything, which weights a run would hold in 4-bit."""
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(bnb_config(cfg), pre_quantized=False)
    quantizer.preprocess_model(model, dtype=getattr(torch, cfg.model.dtype), device_map=None)
