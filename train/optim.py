"""The optimizer: AdamW (torch), 8-bit AdamW (torchao) or Adafactor (transformers; its step compiled with
optim.fused, train/adafactor.py), stepped after the backward as usual, or inside it a group at a time
(optim.in_backward)."""
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
        # A fixed lr (the trainer's schedule sets it), no parameter-scale factor: Adafactor as an
        # AdamW-like optimizer with factored second moments and no first moment.
        if cfg.fused:
            from .adafactor import CompiledAdafactor
            return CompiledAdafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        from transformers.optimization import Adafactor
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


# The largest step group, in elements (64 MiB of bf16 gradients): a group's gradients wait for its
# last one, so the cap bounds what grouping adds to the peak; fewer, larger steps cost less host time.
GROUP_ELEMENTS = 1 << 25


def step_groups(named: list[tuple[str, torch.nn.Parameter]], max_elements: int | None = None) -> list[list]:
    """The parameters in groups to step together: consecutive ones of one block (their name up to its
    first number, `transformer_blocks.3`; else its first part, `x_embedder`), at most `max_elements`
    each unless one parameter alone is larger. A group never spans two blocks, so each block's
    weights are stepped within its own backward (the block offloader drops a block after that)."""
    max_elements = GROUP_ELEMENTS if max_elements is None else max_elements
    groups: list[list] = []
    last_owner, size = None, 0
    for name, p in named:
        owner = _owner(name)
        if owner != last_owner or not groups or size + p.numel() > max_elements:
            groups.append([])
            last_owner, size = owner, 0
        groups[-1].append(p)
        size += p.numel()
    return groups


def _owner(name: str) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return parts[0]


class InBackwardOptimizer(torch.optim.Optimizer):
    """Parameters stepped inside the backward, a group at a time (`groups`, default one parameter
    each): when the last gradient of a group is accumulated, its parameters' hook steps the group's
    own optimizer and frees those gradients, so the gradients of the whole model never exist at once.

    To the LR scheduler it is one optimizer (its param_groups are the groups' own group dicts, so
    setting an lr there sets it for the step); to checkpoints too (state_dict holds one state per
    parameter, in parameter order, whatever the grouping). `step()` steps only a group whose gradients
    did not all arrive (a parameter unused this step). Gradient clipping and accumulation cannot work
    this way (the config refuses them)."""

    def __init__(self, params: list, make, groups: list[list] | None = None):
        params = list(params)
        super().__init__(params, {})
        self.params = params
        self.groups = groups if groups is not None else [[p] for p in params]
        if [p for g in self.groups for p in g] != params:
            raise ValueError("the step groups must hold each parameter once, in order")
        self.inner = [make(group) for group in self.groups]
        self.param_groups = [group for opt in self.inner for group in opt.param_groups]
        self.arrived = [0] * len(self.groups)
        self.handles = [p.register_post_accumulate_grad_hook(self._stepper(g))
                        for g, group in enumerate(self.groups) for p in group]

    def _stepper(self, g: int):
        size = len(self.groups[g])

        def step_when_complete(param: torch.Tensor) -> None:
            self.arrived[g] += 1
            if self.arrived[g] == size:
                self._step_group(g)
        return step_when_complete

    def _step_group(self, g: int) -> None:
        self.inner[g].step()
        for p in self.groups[g]:
            p.grad = None
        self.arrived[g] = 0

    @torch.no_grad()
    def step(self, closure=None):
        for g, count in enumerate(self.arrived):
            if count:
                self._step_group(g)
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        # The hooks freed every gradient already; this clears any the backward left (an unused
        # parameter's) without a thousand optimizers' zero_grad calls per step.
        for p in self.params:
            if p.grad is not None:
                p.grad = None if set_to_none else p.grad.zero_()

    def state_dict(self) -> dict:
        """One single-parameter optimizer state dict per parameter, as if each had its own optimizer."""
        out = []
        for opt in self.inner:
            sd = opt.state_dict()
            group = sd["param_groups"][0]
            for index in group["params"]:
                state = {0: sd["state"][index]} if index in sd["state"] else {}
                out.append({"state": state, "param_groups": [{**group, "params": [0]}]})
        return {"inner": out}

    def load_state_dict(self, state: dict) -> None:
        per_param = state["inner"]
        if len(per_param) != len(self.params):
            raise ValueError(f"the checkpoint's optimizer has {len(per_param)} parameters, "
                             f"this model {len(self.params)}")
        start = 0
        for opt, group in zip(self.inner, self.groups):
            chunk = per_param[start:start + len(group)]
            start += len(group)
            opt.load_state_dict({"state": {i: sd["state"][0] for i, sd in enumerate(chunk) if 0 in sd["state"]},
                                 "param_groups": [{**chunk[0]["param_groups"][0], "params": list(range(len(chunk)))}]})
        # load_state_dict replaces each optimizer's group dicts: share the new ones again.
        self.param_groups[:] = [group for opt in self.inner for group in opt.param_groups]

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
