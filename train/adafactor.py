"""Adafactor as the trainer runs it (transformers' Adafactor: no first moment, factored second moments, a fixed
lr from the trainer's schedule, no parameter scale, update clipping at RMS 1), with each parameter's step one
compiled function (`optim.fused: true`).

transformers' step is about 22 eager kernels a parameter, most of them full passes over fp32 copies of the
weight and its gradient; in full-weight training of the 12B those are 1,160 Python steps inside each backward,
and the GPU waits on the host (docs/BENCHMARKS.md, 2026-12-03). `adafactor_update` is the same arithmetic
written once as a function of tensors, so that torch.compile makes it a few fused kernels per weight shape
(static shapes: one compile per shape, about 15 for FLUX.1). The step's scalars (beta2t, lr) are passed as
0-d tensors on the weights' device, refilled for each step (`fill_`: a kernel, no host sync): as Python
floats each new value would compile again. The state keeps transformers' names and
layout, so a checkpoint of either resumes in the other; transformers' per-step RMS of the weights, unused
without `scale_parameter`, is not computed."""
from __future__ import annotations

import math

import torch
from transformers.optimization import Adafactor


def adafactor_update(p: torch.Tensor, grad: torch.Tensor, row: torch.Tensor | None, col: torch.Tensor | None,
                     sq: torch.Tensor | None, beta2t: torch.Tensor, lr: torch.Tensor, eps: float,
                     clip_threshold: float, weight_decay: float) -> None:
    """One Adafactor step of `p` in place: transformers' formulas in its order, in fp32, `row`/`col` the
    factored second moments of a matrix (else `sq` the full one)."""
    grad = grad.float()
    update = grad * grad + eps
    if row is not None:
        row.mul_(beta2t).add_((1.0 - beta2t) * update.mean(dim=-1))
        col.mul_(beta2t).add_((1.0 - beta2t) * update.mean(dim=-2))
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt().unsqueeze(-1)
        update = r_factor * col.unsqueeze(-2).rsqrt() * grad
    else:
        sq.mul_(beta2t).add_((1.0 - beta2t) * update)
        update = sq.rsqrt() * grad
    rms = update.norm(2) / (update.numel() ** 0.5)
    update = update / (rms / clip_threshold).clamp(min=1.0) * lr
    weights = p.float()
    if weight_decay != 0:
        weights = weights - weights * (weight_decay * lr)
    p.copy_(weights - update)


_compiled = torch.compile(adafactor_update, dynamic=False)


class CompiledAdafactor(Adafactor):
    """transformers' Adafactor (the trainer's settings: `beta1` None, no relative step, no parameter scale)
    whose per-parameter step is `adafactor_update`, compiled (`compiled=False`: the same function eagerly)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, compiled: bool = True):
        super().__init__(params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
        self.update = _compiled if compiled else adafactor_update
        self.scalars: dict = {}   # (name, device) -> (the 0-d tensor the step's value is filled into, that value)
        if compiled:   # one compiled graph per weight shape (and moment layout): room for all of a model's
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_one(p, group, self._scalar("lr", group["lr"], p.device))
        return loss

    def _scalar(self, name: str, value: float, device: torch.device) -> torch.Tensor:
        """`value` in a 0-d fp32 tensor on `device`, one per name and device, refilled (in stream order) only
        when the value changes: the weights of a step share their lr and beta2t."""
        key = (name, device)
        tensor, held = self.scalars.get(key, (None, None))
        if tensor is None:
            tensor = torch.zeros((), dtype=torch.float32, device=device)
        if held != value:
            tensor.fill_(value)
            self.scalars[key] = (tensor, value)
        return tensor

    def _step_one(self, p: torch.Tensor, group: dict, lr: torch.Tensor) -> None:
        state, shape = self.state[p], p.grad.shape
        factored = len(shape) >= 2
        if not state:
            state["step"] = 0
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(shape[:-1], device=p.device)
                state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], device=p.device)
            else:
                state["exp_avg_sq"] = torch.zeros(shape, device=p.device)
            state["RMS"] = 0
        state["step"] += 1
        beta2t = self._scalar("beta2t", 1.0 - math.pow(state["step"], group["decay_rate"]), p.device)
        self.update(p, p.grad, state.get("exp_avg_sq_row"), state.get("exp_avg_sq_col"), state.get("exp_avg_sq"),
                    beta2t, lr, group["eps"][0], group["clip_threshold"], group["weight_decay"])
