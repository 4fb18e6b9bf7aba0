"""Activation offload (run.offload_activations): what the forward saves for the backward waits in host
memory instead of the GPU's.

With activation checkpointing, what a step saves is little more than each block's inputs (the image and
text tokens entering it), kept until the block's backward recomputes it. At 1024px and 512 text
positions that is 4608 tokens per block: 56 MiB a block for FLUX.2 [dev], 3.2 GiB over its 56 blocks,
which is what stands between a quantized [dev] base and a 24 GB card. Each saved tensor of at least
`min_bytes` is copied to pinned host memory as the forward saves it and back as the backward asks
for it; the copies are queued on the compute stream (the stream's order keeps them right: the device
memory is reused only after the copy out has run), so a step pays about 2 x 56 MiB / 25 GB/s per
block. Weights are never moved (the backward reads them where they are), nor tensors on the host.
torch.autograd.graph.save_on_cpu does the same for every saved tensor, weights included.
"""
from __future__ import annotations

import torch

MIN_BYTES = 1 << 20     # smaller saves (modulation vectors, position embeddings) are not worth a copy


class _Offloaded:
    __slots__ = ("host", "device")

    def __init__(self, host: torch.Tensor, device: torch.device):
        self.host, self.device = host, device


class ActivationOffload:
    """The saved-tensor hooks, and how many bytes went to the host (`offloaded`, since the last reset).
    `devices`: the device types whose saves move (a CPU test passes {"cpu"}: the copies are then host
    copies, the same logic with nothing gained)."""

    def __init__(self, min_bytes: int | None = None, devices=("cuda",)):
        self.min_bytes = MIN_BYTES if min_bytes is None else min_bytes
        self.devices = set(devices)
        self.offloaded = 0

    def moves(self, tensor: torch.Tensor) -> bool:
        """Only plain activations: not a weight nor a view of one (a linear's backward saves its weight
        transposed), not a quantized tensor subclass, not a small tensor."""
        base = tensor if tensor._base is None else tensor._base
        return (tensor.device.type in self.devices and type(tensor) is torch.Tensor
                and not isinstance(base, torch.nn.Parameter)
                and tensor.numel() * tensor.element_size() >= self.min_bytes)

    def pack(self, tensor: torch.Tensor):
        if not self.moves(tensor):
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
        host.copy_(tensor, non_blocking=True)
        self.offloaded += host.numel() * host.element_size()
        return _Offloaded(host, tensor.device)

    @staticmethod
    def unpack(packed):
        if isinstance(packed, _Offloaded):
            return packed.host.to(packed.device, non_blocking=True)
        return packed

    def __call__(self):
        """A context for the forward: inside it, saved tensors of `min_bytes` or more wait on the host. The
        backward may run outside it (autograd keeps the hooks each tensor was saved with)."""
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
