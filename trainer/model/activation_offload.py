"""Activation offloading (`train.activation_offload`): what forward saves for backward waits in
host memory.

A saved-tensors hook packs every tensor autograd saves during a micro-batch's forward into
host memory and unpacks it onto its device when backward needs it. Left where they are:
parameters (the strategy decides where weights live), tensors under MIN_BYTES (not worth a
copy) and meta tensors (`finetrain estimate`).

On CUDA the host buffers are pinned and the copies are asynchronous: out to the host on a
stream of their own, while forward computes on (the device memory is released once its copy
is done, `record_stream`); back to the device ahead of need, since backward unpacks roughly in
the reverse order of packing: unpacking one tensor starts bringing back the ones saved before
it, up to PREFETCH_BYTES in flight, on the same side stream, and the compute stream waits
only for the copy it needs.

It composes with the rest because it only changes where saved tensors wait:
- activation checkpointing (non-reentrant) saves each layer's input through autograd too, so
  what waits for backward is the layers' inputs, in host memory (what DeepSpeed's ALST calls
  checkpoint offloading); the recomputation inside backward keeps its tensors on the device;
- compilation: the compiled layers' saved tensors pass through the same hook at run time;
- sequence parallelism: each rank offloads its own shard.

On a CPU the activations are in host memory already; the copies then only exercise the path
(the tests run it there).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

MIN_BYTES = 1024
PREFETCH_BYTES = 1 << 30  # brought back ahead of backward's need: a few layers' worth at long context


class _Offloaded:
    """A saved tensor in host memory, and its way back to the device."""

    __slots__ = ("index", "device", "host", "copied", "fetched", "used", "nbytes")

    def __init__(self, index: int, device: torch.device, host: torch.Tensor, copied):
        self.index, self.device, self.host, self.copied = index, device, host, copied
        self.fetched: tuple | None = None  # (device tensor, event) of a prefetch
        self.used = False  # unpacked by backward (prefetching it again would be waste)
        self.nbytes = host.numel() * host.element_size()


@functools.cache
def _side_stream(device: torch.device):
    return torch.cuda.Stream(device)


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Within it, forward's saved tensors go to host memory; one per micro-batch's forward."""

    def __init__(self, min_bytes: int = MIN_BYTES, prefetch_bytes: int = PREFETCH_BYTES):
        self.min_bytes, self.prefetch_bytes = min_bytes, prefetch_bytes
        self.saved: list[_Offloaded] = []  # in packing order
        self.in_flight = 0  # bytes prefetched and not yet unpacked
        super().__init__(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor):
        if (isinstance(tensor, nn.Parameter) or tensor.device.type == "meta" or tensor.layout != torch.strided
                or tensor.numel() * tensor.element_size() < self.min_bytes):
            return tensor
        tensor = tensor.detach()
        if tensor.device.type == "cuda":
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            stream = _side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is computed
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
                copied = stream.record_event()
            tensor.record_stream(stream)  # its memory is reused only once the copy is done
        else:
            host, copied = tensor.clone(memory_format=torch.contiguous_format), None
        item = _Offloaded(len(self.saved), tensor.device, host, copied)
        self.saved.append(item)
        return item

    def unpack(self, item):
        if not isinstance(item, _Offloaded):
            return item
        if item.copied is None:  # a host tensor already
            return item.host
        item.used = True
        self._prefetch_before(item.index)
        compute = torch.cuda.current_stream(item.device)
        if item.fetched is not None:
            tensor, ready = item.fetched
            item.fetched = None
            self.in_flight -= item.nbytes
            compute.wait_event(ready)
            tensor.record_stream(compute)  # allocated on the side stream, used and freed on this one
            return tensor
        compute.wait_event(item.copied)
        return item.host.to(item.device, non_blocking=True)

    def _prefetch_before(self, index: int) -> None:
        """Start copying back the tensors saved before `index` (backward's next needs), at least
        one, up to `prefetch_bytes` in flight."""
        stream = None
        for earlier in range(index - 1, -1, -1):
            item = self.saved[earlier]
            if item.fetched is not None or item.used:
                continue
            if self.in_flight and self.in_flight + item.nbytes > self.prefetch_bytes:
                break
            stream = stream or _side_stream(item.device)
            stream.wait_event(item.copied)
            with torch.cuda.stream(stream):
                tensor = item.host.to(item.device, non_blocking=True)
                item.fetched = (tensor, stream.record_event())
            self.in_flight += item.nbytes
            if self.in_flight >= self.prefetch_bytes:
                break


def activation_offload(enabled: bool):
    """The context for one micro-batch's forward: offloading when `enabled`, else nothing."""
    return ActivationOffload() if enabled else contextlib.nullcontext()
