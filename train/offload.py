"""Block swap: the weights of some transformer blocks live in (pinned) host memory; each is copied to
the GPU just ahead of its use and dropped after it, so the GPU holds two of those blocks at a time.

Copies run on a side stream, overlapping the blocks computed meanwhile. A training step uses each
block twice: in the forward, and in the backward, where activation checkpointing recomputes the
block's forward just before its backward (so offloading needs checkpointing: without it, the
forward's saved activations would keep every block's weights alive until the backward). The hooks
therefore see the blocks in order, then in reverse, and prefetch the next offloaded block in the
direction of travel; a hook that runs inside autograd's backward is a recompute.

Frozen weights (LoRA's base) are only read, so dropping them costs nothing. Trainable weights (full
training with optim.in_backward) are stepped inside the backward while they are on the GPU, then
copied back to host memory before they are dropped. On a CPU the "device" copies are host copies:
the same logic with nothing gained, for tests.

diffusers' group offloading drops a block right after its forward, which a backward cannot survive,
and accelerate's offload hooks do the same; hence this module.
"""
from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass

import torch


def spread(count: int, total: int) -> list[int]:
    """`count` block indices spread evenly over `total` blocks: the blocks kept on the GPU between
    two offloaded ones give the side stream time to copy the next."""
    if not 0 <= count <= total:
        raise ValueError(f"run.offload_blocks: {count} is not between 0 and the model's {total} blocks")
    return sorted({(k * total) // count for k in range(count)}) if count else []


@dataclass
class _OnDevice:
    tensors: list            # the device copies, one per moved parameter
    ready: object            # CUDA event: the copy to the device is done (None on a CPU)
    waited: bool = False     # the compute stream has waited for `ready`
    dirty: bool = False      # entered in the backward: its trainable weights are being stepped


class BlockOffloader:
    """Moves the parameters of `blocks[i]` for each i in `offloaded` to host memory and swaps them in
    around each use. `move_trainable`: move trainable parameters too (full training with the step
    inside the backward); otherwise they stay on the device (a LoRA adapter)."""

    def __init__(self, blocks: list[torch.nn.Module], offloaded: list[int], device, move_trainable: bool):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.order = sorted(offloaded)
        self.moved: dict[int, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        for i in self.order:
            self.moved[i] = []
            for p in blocks[i].parameters():
                if p.requires_grad and not move_trainable:
                    p.data = p.data.to(self.device)
                    continue
                host = torch.empty_like(p.data, device="cpu", pin_memory=self.cuda).copy_(p.data)
                p.data = host
                self.moved[i].append((p, host))
        self.on_device: dict[int, _OnDevice] = {}
        self.handles = [block.register_forward_pre_hook(functools.partial(self._enter, i))
                        for i, block in enumerate(blocks)]

    def _enter(self, i: int, module, args) -> None:
        backward = torch._C._current_graph_task_id() != -1   # a checkpoint's recompute, inside backward
        following = self._following(i, backward)
        if i in self.moved:
            self._load(i)
            self._wait(i)
            if backward:
                self.on_device[i].dirty = True
        self._load(following)
        for j in [j for j in self.on_device if j not in (i, following)]:
            self._drop(j)

    def _following(self, i: int, backward: bool) -> int:
        """The offloaded block used next after block i: onward in the forward, back in the backward.
        After the forward's last one comes the backward (with grad), or the next forward (without)."""
        if not backward:
            ahead = [j for j in self.order if j > i]
            return ahead[0] if ahead else (self.order[-1] if torch.is_grad_enabled() else self.order[0])
        behind = [j for j in self.order if j < i]
        return behind[-1] if behind else self.order[0]

    def _side_stream(self):
        return torch.cuda.stream(self.stream) if self.cuda else nullcontext()

    def _load(self, i: int) -> None:
        if i in self.on_device:
            return
        with self._side_stream():
            tensors = [host.to(self.device, non_blocking=True, copy=True) for _, host in self.moved[i]]
            ready = torch.cuda.Event() if self.cuda else None
            if ready is not None:
                ready.record(self.stream)
        for (p, _), t in zip(self.moved[i], tensors):
            p.data = t
        self.on_device[i] = _OnDevice(tensors, ready)

    def _wait(self, i: int) -> None:
        entry = self.on_device[i]
        if entry.waited or not self.cuda:
            entry.waited = True
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(entry.ready)
        for t in entry.tensors:   # allocated on the side stream, used on this one: free after both
            t.record_stream(compute)
        entry.waited = True

    def _drop(self, i: int) -> None:
        entry = self.on_device.pop(i)
        if entry.dirty and any(p.requires_grad for p, _ in self.moved[i]):
            self._copy_back(i, entry)
        for p, host in self.moved[i]:
            p.data = host

    def _copy_back(self, i: int, entry: _OnDevice) -> None:
        pending = [p for p, _ in self.moved[i] if p.requires_grad and p.grad is not None]
        if pending:
            raise RuntimeError(f"block {i} left the GPU before its {len(pending)} gradients were stepped "
                               "(run.offload_blocks with trainable weights needs optim.in_backward)")
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with self._side_stream():
            for (p, host), t in zip(self.moved[i], entry.tensors):
                if p.requires_grad:
                    host.copy_(t, non_blocking=True)

    def synchronize(self) -> None:
        """Wait for every copy in flight: host copies are current after this (checkpoints read them)."""
        if self.cuda:
            self.stream.synchronize()

    def resident(self) -> list[int]:
        """Offloaded blocks whose weights are on the device now (tests check how few)."""
        return sorted(self.on_device)
