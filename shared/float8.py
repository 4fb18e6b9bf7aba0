"""A frozen transformer computing in float8: the trainer's `run.precision fp8` under a LoRA and flux-sample's
`--precision fp8` (torch's float8 GEMMs: H100-class GPUs; a CPU runs them slowly).

Each of the base's token-wise linear layers (`float8_layer`: the blocks' projections and MLPs, the text
embedder; not the first and last layers nor the per-sample modulation layers) becomes a
`Float8FrozenLinear`: its weight cast to float8 e4m3 once, with one scale for the tensor (half the bf16
base's memory), and each matmul a float8 GEMM (torch._scaled_mm through torchao's `addmm_float8_unwrapped`)
whose input is scaled dynamically (torchao's `tensor_to_scale`, the recipe of its Float8LinearConfig:
tensorwise scales, e4m3 forward, e5m2 gradients, fast accumulation in the forward only). The backward
computes the input's gradient alone, also in float8: the frozen weight needs none, where torchao's
Float8Linear always runs the weight-gradient GEMM (a third of its backward's work) and keeps the weight
in bf16, casting it on every call. peft's LoRA layers stay fp32 on top (added before the conversion, so
that their init is the bf16 base's).

The per-sample layers (the norms' modulation, the time and guidance embedding: one row per image, where a
float8 GEMM gains nothing) are stored in float8 too, weight-only (`Float8StoredLinear`: one scale per output
row, the weight dequantized to bf16 for each matmul; plain tensors, which torch.compile takes where it cannot
take torchao's quantized tensor subclasses beside autograd). In FLUX.1 [dev] they are 3.2B of the 11.9B
weights, so stored in bf16 they held 6 GiB of a 17.5 GiB peak; the first and last layers (family.float8_keep)
stay bf16.
"""
from __future__ import annotations

import torch

from .family import Family
from .models import ModelLoadError

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# Switches for bench/memory_speed.py's diagnostic rows (issue 29: where the compiled float8 LoRA step loses time
# to the bf16 one), off in use: fast accumulation in the input-gradient GEMM too (torchao keeps it off there,
# for the gradient's precision), and each weight's transposed copy kept from the start (the float8 weights'
# memory twice) instead of made in every backward.
GRAD_FAST_ACCUM = False
KEEP_TRANSPOSED = False


try:   # imported here, not in the forward, which torch.compile traces
    from torchao.float8.float8_ops import addmm_float8_unwrapped
    from torchao.float8.float8_utils import tensor_to_scale, to_fp8_saturated
except ImportError:
    addmm_float8_unwrapped = tensor_to_scale = to_fp8_saturated = None


def _check_torchao() -> None:
    if addmm_float8_unwrapped is None:
        raise ModelLoadError("float8 compute (run.precision fp8, flux-sample --precision fp8) needs torchao: "
                             "pip install -e '.[fp8]'")


def require_float8(device: torch.device, option: str) -> None:
    """Refuse, naming `option` and the device, where float8 compute cannot run: without torchao, or on a CUDA
    device without float8 GEMMs (compute capability below 8.9: before Ada/Hopper). torch's CPU runs them
    (slowly: the tests use it)."""
    _check_torchao()
    device = torch.device(device)
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ModelLoadError(f"{option} needs float8 GEMMs (CUDA compute capability 8.9+: L4, L40, RTX 40-series, "
                             f"H100); {device} ({torch.cuda.get_device_name(device)}) has {major}.{minor}")


def _to_float8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x in float8 with one dynamic scale (torchao's meaning: float8 = x * scale)."""
    scale = tensor_to_scale(x, dtype)
    return to_fp8_saturated(x.float() * scale, dtype), scale   # scaled in fp32, as torchao does


class _Float8FrozenMatmul(torch.autograd.Function):
    """x @ weight.T in float8; the gradient goes to x only (the weight is frozen)."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, weight_t=None):
        rows = x.reshape(-1, x.shape[-1])
        x8, x_scale = _to_float8(rows, E4M3)
        # weight.t(): (in, out) column-major, the layout _scaled_mm takes for its second operand
        out = addmm_float8_unwrapped(x8, x_scale, weight.t(), weight_scale, x.dtype, bias=bias, use_fast_accum=True)
        ctx.save_for_backward(weight, weight_scale, weight_t)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        weight, weight_scale, weight_t = ctx.saved_tensors
        g8, g_scale = _to_float8(grad.reshape(-1, grad.shape[-1]), E5M2)
        # (out, in) column-major: a float8 transposed copy, half the bytes of a bf16 one, freed after use
        weight_cm = (weight.t().contiguous() if weight_t is None else weight_t).t()
        grad_x = addmm_float8_unwrapped(g8, g_scale, weight_cm, weight_scale, grad.dtype,
                                        use_fast_accum=GRAD_FAST_ACCUM)
        return grad_x.reshape(*grad.shape[:-1], grad_x.shape[-1]), None, None, None, None


class Float8FrozenLinear(torch.nn.Module):
    """A frozen linear layer stored in float8 (`weight`, e4m3, and its tensorwise `weight_scale`) whose
    matmul runs in float8 under autocast's dtype (bf16). The state dict keeps the layer's names."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.register_buffer("weight_t", weight.t().contiguous() if KEEP_TRANSPOSED else None, persistent=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Float8FrozenLinear":
        return cls.from_weight(linear.weight, linear.bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Float8FrozenLinear":
        """From a linear layer's (out, in) weight: for fused weights that no nn.Linear holds (shared/t5_fused.py)."""
        weight8, scale = _to_float8(weight.detach(), E4M3)
        return cls(weight8, scale.float(), None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return _Float8FrozenMatmul.apply(x, self.weight, self.weight_scale, bias, self.weight_t)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, float8"


class _DequantizedMatmul(torch.autograd.Function):
    """x @ (weight * scale).T, the bf16 weight made for the product and again for the input's gradient,
    never kept (autograd would otherwise save it: a dense copy of every such layer of a block)."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        ctx.save_for_backward(weight, scale)
        return torch.nn.functional.linear(x, _dequantize(weight, scale, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        return grad @ _dequantize(weight, scale, grad.dtype), None, None, None


def _dequantize(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (weight.float() * scale).to(dtype)


class Float8StoredLinear(torch.nn.Module):
    """A frozen linear layer stored in float8 e4m3 with one scale per output row, computed in autocast's
    dtype from its dequantized weight (for layers of one row per image, where a float8 GEMM gains nothing)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / torch.finfo(E4M3).max
        self.weight = torch.nn.Parameter((w / scale).to(E4M3), requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _DequantizedMatmul.apply(x, self.weight, self.weight_scale, bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8 weight-only"


def float8_layer(family: Family, name: str, module) -> bool:
    """Whether this linear layer computes in float8: not the first and last layers (family.float8_keep), not
    those that see one row per image (family.per_sample_layer), and of float8-GEMM-aligned sizes."""
    if not isinstance(module, torch.nn.Linear) or name in family.float8_keep or family.per_sample_layer(name):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0   # float8 GEMM alignment


def freeze_to_float8(model: torch.nn.Module, family: Family) -> int:
    """Replace the frozen base's token-wise linear layers (`float8_layer`, applied to the layer's own name, a
    LoRA-wrapped layer's `.base_layer` removed) by Float8FrozenLinear and store its per-sample layers in
    float8, weight-only; return how many token-wise layers became float8. Trainable layers (the adapter's)
    are left as they are."""
    def own_name(name: str) -> str:
        return name.removesuffix(".base_layer")

    def frozen(choose):
        return lambda name, m: not m.weight.requires_grad and choose(own_name(name), m)
    count = to_float8_linears(model, frozen(lambda name, m: float8_layer(family, name, m)))
    if not count:
        raise ModelLoadError("float8 compute: no linear layer of this model has float8-aligned sizes")
    _replace_linears(model, frozen(lambda name, m: family.per_sample_layer(name) and name not in family.float8_keep),
                     Float8StoredLinear)
    return count


def to_float8_linears(module: torch.nn.Module, choose) -> int:
    """Replace each nn.Linear of `module` for which `choose(name, linear)` holds, and whose sizes suit float8
    GEMMs (multiples of 16), by a Float8FrozenLinear, in place (forward only: frozen encoders, no_grad);
    return how many were replaced."""
    _check_torchao()
    aligned = lambda name, m: choose(name, m) and m.in_features % 16 == 0 and m.out_features % 16 == 0  # noqa: E731
    return _replace_linears(module, aligned, Float8FrozenLinear.from_linear)


def _replace_linears(module: torch.nn.Module, choose, make) -> int:
    """Each nn.Linear of `module` that `choose(name, linear)` picks replaced by `make(linear)`; how many."""
    chosen = [name for name, m in module.named_modules() if type(m) is torch.nn.Linear and choose(name, m)]
    for name in chosen:   # by name: each weight is freed as its float8 copy replaces it
        parent, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent)
        setattr(parent, attr, make(getattr(parent, attr)))
    return len(chosen)
