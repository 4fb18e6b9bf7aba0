"""run.precision fp8 under a LoRA: the frozen base computes in float8.

Each of the base's token-wise linear layers (train/model.py's `float8_layer`: the blocks' projections and
MLPs, the text embedder; not the first and last layers nor the per-sample modulation layers) becomes a
`Float8FrozenLinear`: its weight cast to float8 e4m3 once, with one scale for the tensor (half the bf16
base's memory), and each matmul a float8 GEMM (torch._scaled_mm through torchao's `addmm_float8_unwrapped`)
whose input is scaled dynamically (torchao's `tensor_to_scale`, the recipe of its Float8LinearConfig:
tensorwise scales, e4m3 forward, e5m2 gradients, fast accumulation in the forward only). The backward
computes the input's gradient alone, also in float8: the frozen weight needs none, where torchao's
Float8Linear always runs the weight-gradient GEMM (a third of its backward's work) and keeps the weight
in bf16, casting it on every call. peft's LoRA layers stay fp32 on top (added before the conversion, so
that their init is the bf16 base's).
"""
from __future__ import annotations

import torch

from shared.family import Family
from shared.models import ModelLoadError
from shared.params import ConfigError

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


try:   # imported here, not in the forward, which torch.compile traces
    from torchao.float8.float8_ops import addmm_float8_unwrapped
    from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated
except ImportError:
    addmm_float8_unwrapped = tensor_to_scale = to_fp8_saturated = None


def _check_torchao() -> None:
    if addmm_float8_unwrapped is None:
        raise ModelLoadError("run.precision fp8 needs torchao: pip install -e '.[fp8]'")


def _to_float8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x in float8 with one dynamic scale (torchao's meaning: float8 = x * scale)."""
    scale = tensor_to_scale(x, dtype)
    return to_fp8_saturated(x.float() * scale, dtype), scale   # scaled in fp32, as torchao does


class _Float8FrozenMatmul(torch.autograd.Function):
    """x @ weight.T in float8; the gradient goes to x only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias):
        rows = x.reshape(-1, x.shape[-1])
        x8, x_scale = _to_float8(rows, E4M3)
        # weight.t(): (in, out) column-major, the layout _scaled_mm takes for its second operand
        out = addmm_float8_unwrapped(x8, x_scale, weight.t(), weight_scale, x.dtype, bias=bias, use_fast_accum=True)
        ctx.save_for_backward(weight, weight_scale)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        weight, weight_scale = ctx.saved_tensors
        g8, g_scale = _to_float8(grad.reshape(-1, grad.shape[-1]), E5M2)
        # (out, in) column-major: a float8 transposed copy, half the bytes of a bf16 one, freed after use
        weight_cm = weight.t().contiguous().t()
        grad_x = addmm_float8_unwrapped(g8, g_scale, weight_cm, weight_scale, grad.dtype, use_fast_accum=False)
        return grad_x.reshape(*grad.shape[:-1], grad_x.shape[-1]), None, None, None


class Float8FrozenLinear(torch.nn.Module):
    """A frozen linear layer stored in float8 (`weight`, e4m3, and its tensorwise `weight_scale`) whose
    matmul runs in float8 under autocast's dtype (bf16). The state dict keeps the layer's names."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Float8FrozenLinear":
        weight, scale = _to_float8(linear.weight.detach(), E4M3)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight, scale.float(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return _Float8FrozenMatmul.apply(x, self.weight, self.weight_scale, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, float8"


def freeze_to_float8(model: torch.nn.Module, family: Family, keep) -> int:
    """Replace the frozen base's token-wise linear layers (`keep(family, name, module)`: train/model.py's
    float8_layer, applied to the layer's own name, a LoRA-wrapped layer's `.base_layer` removed) by
    Float8FrozenLinear; return how many. Trainable layers (the adapter's) are left as they are."""
    _check_torchao()
    chosen = [name for name, m in model.named_modules()
              if type(m) is torch.nn.Linear and not m.weight.requires_grad
              and keep(family, name.removesuffix(".base_layer"), m)]
    if not chosen:
        raise ModelLoadError("run.precision fp8: no linear layer of this model has float8-aligned sizes")
    for name in chosen:   # by name: each bf16 weight is freed as its float8 copy replaces it
        parent, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent)
        setattr(parent, attr, Float8FrozenLinear.from_linear(getattr(parent, attr)))
    return len(chosen)


def validate_fp8_lora(cfg) -> None:
    """Refuse, before anything is built, what cannot go with a float8 base (config.validate calls this)."""
    if cfg.model.quantize_base != "none":
        raise ConfigError(f"run.precision fp8 with LoRA stores and computes the frozen base in float8; "
                          f"model.quantize_base {cfg.model.quantize_base} quantizes it another way: set "
                          "model.quantize_base none, or run.precision bf16")
    if cfg.lora.dora:
        raise ConfigError("lora.dora normalises W + B A per row from the base weights read dense, which "
                          "run.precision fp8 stores in float8 under one scale: use run.precision bf16 with DoRA")
    if cfg.run.offload_blocks:
        raise ConfigError("run.precision fp8 with LoRA and run.offload_blocks cannot be combined yet (the "
                          "block swap moves bf16 weights): set run.offload_blocks 0, or run.precision bf16")
    if cfg.run.sample_every:
        raise ConfigError("run.sample_every merges the adapter into a copy of the bf16 base, which run.precision "
                          "fp8 with LoRA stores in float8: set run.sample_every 0 (flux-sample --lora renders "
                          "final/), or run.precision bf16")
