"""LoRA's frozen base, quantized (model.quantize_base): every linear layer inside the transformer
blocks, the norms' modulation layers included, stored in 8 bits (float8 or int8, weight-only, one
scale per output row) or in 4 (NF4, QLoRA's format), all by torchao. Each matmul dequantizes its
weight to bf16; peft's LoRA layers train in fp32 on top. Outside the blocks, the layers a family names
(Family.quantize_outside: FLUX.2's shared modulation layers and text embedder, up to 1.4 GiB in bf16) are
quantized too; the rest (FLUX.1's embedders and final norm, a few MB; every first and last layer) stays bf16."""
from __future__ import annotations

import math

import torch

from shared.models import ModelLoadError

KINDS = ("float8", "int8", "nf4")
NF4_BLOCK = 64            # values per NF4 scale (torchao's and QLoRA's default)
NF4_SCALER_BLOCK = 256    # NF4 scales per second-level scale


def _torchao():
    try:
        import torchao.quantization as tq
    except ImportError as e:
        raise ModelLoadError("model.quantize_base needs torchao: pip install -e '.[fp8]'") from e
    return tq


def quantize_block(block: torch.nn.Module, kind: str) -> int:
    """Quantize the linear layers of one transformer block (or other module) in place; return how many."""
    tq = _torchao()
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    if kind == "nf4":
        for m in linears:
            m.weight = torch.nn.Parameter(_to_nf4(tq, m.weight.detach()), requires_grad=False)
    elif kind == "float8":
        tq.quantize_(block, tq.Float8WeightOnlyConfig(set_inductor_config=False))
    elif kind == "int8":
        tq.quantize_(block, tq.Int8WeightOnlyConfig(set_inductor_config=False))
    else:
        raise ModelLoadError(f"model.quantize_base: {kind!r} is not one of none, {', '.join(KINDS)}")
    for m in linears:
        m.__class__ = FrozenQuantizedLinear
    return len(linears)


class FrozenQuantizedLinear(torch.nn.Linear):
    """A linear layer whose torchao-quantized weight stays quantized for the backward too, and whose
    matmul runs in autocast's dtype. torchao's weight-only matmuls dequantize the weight in Python,
    above autograd (which would then keep that dense copy for the input gradient: during a block's
    backward, a copy of all its weights) and above autocast (so that an fp32 input, as a LayerNorm's
    output is under autocast, made int8's matmul run and return fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return _FrozenLinear.apply(x, self.weight, self.bias)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ _dense(weight, grad.dtype), None, None


def _dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The quantized weight dequantized (NF4Tensor's `dequantize` is another function: its `to` is this)."""
    if type(weight).__name__ == "NF4Tensor":
        return weight.to(dtype)
    return weight.dequantize().to(dtype)


def _to_nf4(tq, weight: torch.Tensor):
    """NF4 with torchao's block sizes, the second level shrunk where a small layer has fewer blocks."""
    if weight.numel() % NF4_BLOCK:
        raise ModelLoadError(f"model.quantize_base nf4: a {tuple(weight.shape)} weight is not a multiple of "
                             f"{NF4_BLOCK} values")
    blocks = weight.numel() // NF4_BLOCK
    return tq.to_nf4(weight.to(torch.bfloat16), block_size=NF4_BLOCK,
                     scaler_block_size=math.gcd(blocks, NF4_SCALER_BLOCK))
