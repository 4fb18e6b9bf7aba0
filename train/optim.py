"""The optimizer: AdamW (torch), 8-bit AdamW (torchao) or Adafactor (transformers), stepped after the
backward as usual, or inside it one parameter at a time (optim.in_backward)."""
from __future__ import annotations

import types

import torch

from .config import ConfigError, OptimConfig


def make_optimizer(cfg: OptimConfig, params: list, device) -> torch.optim.Optimizer:
    """The optimizer `optim.name` names over `params`, its state on `device`. bf16 weights get
    stochastic rounding where the optimizer offers it (torchao's AdamW8bit)."""
    device = torch.device(device)
    return restore_state_on_load(_new_optimizer(cfg, params, device), device)


def _new_optimizer(cfg: OptimConfig, params: list, device: torch.device) -> torch.optim.Optimizer:
    if cfg.name == "adamw":
        fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                                 eps=cfg.eps, fused=fused)
    if cfg.name == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as e:
            raise ConfigError("optim.name adamw8bit needs torchao: pip install -e '.[fp8]'") from e
        return eager_on_cpu(AdamW8bit(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                    weight_decay=cfg.weight_decay, bf16_stochastic_round=True), device)
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor
        # A fixed lr (the trainer's schedule sets it), no parameter-scale factor: Adafactor as an
        # AdamW-like optimizer with factored second moments and no first moment.
        return Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    raise ConfigError(f"optim.name: unknown optimizer {cfg.name!r}")


def eager_on_cpu(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.optim.Optimizer:
    """torchao compiles its step once per parameter shape; on a CPU each compile costs seconds
    (inductor's C++ build), so there the same step runs eagerly (torch.compiler's force_eager).
    A bound method, as the LR scheduler's step tracking expects of `optimizer.step`."""
    if device.type != "cpu":
        return optimizer

    def eager_step(self, *args, **kwargs):
        with torch.compiler.set_stance("force_eager"):
            return type(self).step(self, *args, **kwargs)
    optimizer.step = types.MethodType(eager_step, optimizer)
    return optimizer


def restore_state_on_load(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.optim.Optimizer:
    """Make load_state_dict give back the state exactly as it was saved. torch casts every floating
    state to its parameter's dtype (Adafactor's fp32 moments of bf16 weights would come back rounded
    to bf16, and a resumed run would differ) and moves it to the parameter's device (host memory, for
    a block the offloader keeps there). Put the saved tensors back as they were, on `device`, where the
    steps run; like torch, keep a non-fused AdamW's step count on the host."""
    saved: dict = {}

    def remember(opt, state_dict):
        saved.clear()
        saved.update(state_dict["state"])

    def restore(opt):
        index = 0   # state_dict numbers the parameters across the groups, in order
        for group in opt.param_groups:
            step_on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                for k, v in saved.get(index, {}).items():
                    if torch.is_tensor(v):
                        opt.state[p][k] = v.to(device) if (k != "step" or step_on_device) else v
                index += 1
        saved.clear()
    optimizer.register_load_state_dict_pre_hook(remember)
    optimizer.register_load_state_dict_post_hook(restore)
    return optimizer


class InBackwardOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter, stepped by that parameter's post-accumulate-grad hook, which
    then frees the gradient: the gradients of the whole model never exist at once.

    To the LR scheduler it is one optimizer (its param_groups are the per-parameter optimizers' own
    group dicts, so setting an lr there sets it for the step); to checkpoints too (state_dict holds
    every per-parameter state, in parameter order). `step()` does nothing: the steps happened in the
    backward. Gradient clipping and accumulation cannot work this way (the config refuses them)."""

    def __init__(self, params: list, make):
        params = list(params)
        super().__init__(params, {})
        self.params = params
        self.inner = [make([p]) for p in params]
        self.param_groups = [group for opt in self.inner for group in opt.param_groups]
        self.handles = [p.register_post_accumulate_grad_hook(self._stepper(opt))
                        for p, opt in zip(params, self.inner)]

    @staticmethod
    def _stepper(opt: torch.optim.Optimizer):
        def step_and_free(param: torch.Tensor) -> None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step_and_free

    @torch.no_grad()
    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The hooks freed every gradient already; this clears any the backward left (an unused
        # parameter's) without a thousand optimizers' zero_grad calls per step.
        for p in self.params:
            if p.grad is not None:
                p.grad = None if set_to_none else p.grad.zero_()

    def state_dict(self) -> dict:
        return {"inner": [opt.state_dict() for opt in self.inner]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["inner"]) != len(self.inner):
            raise ValueError(f"the checkpoint's optimizer has {len(state['inner'])} parameters, "
                             f"this model {len(self.inner)}")
        for opt, sd in zip(self.inner, state["inner"]):
            opt.load_state_dict(sd)
        # load_state_dict replaces each optimizer's group dicts: share the new ones again.
        self.param_groups[:] = [group for opt in self.inner for group in opt.param_groups]

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
