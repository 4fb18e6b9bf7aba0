"""LoRA's frozen base, quantized (model.quantize_base): every linear layer inside the transformer
blocks, the norms' modulation layers included, stored in 8 bits (float8 or int8, weight-only, one
scale per output row) or in 4 (NF4, QLoRA's format), all by torchao. Each matmul dequantizes its
weight to bf16; peft's LoRA layers train in fp32 on top. The embedders, the final norm and the
output layer stay bf16 (they are a few MB)."""
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
    """Quantize the linear layers of one transformer block in place; return how many."""
    tq = _torchao()
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    if kind == "nf4":
        for m in linears:
            m.weight = torch.nn.Parameter(_to_nf4(tq, m.weight.detach()), requires_grad=False)
        return len(linears)
    if kind == "float8":
        config = tq.Float8WeightOnlyConfig(set_inductor_config=False)
    elif kind == "int8":
        config = tq.Int8WeightOnlyConfig(set_inductor_config=False)
    else:
        raise ModelLoadError(f"model.quantize_base: {kind!r} is not one of none, {', '.join(KINDS)}")
    tq.quantize_(block, config)
    for m in linears:
        m.__class__ = FrozenQuantizedLinear
    return len(linears)


class FrozenQuantizedLinear(torch.nn.Linear):
    """A linear layer whose torchao-quantized weight stays quantized for the backward too. torchao's
    weight-only matmul dequantizes the weight to bf16 in Python, above autograd, which then keeps that
    bf16 copy for the input gradient: during a block's backward, a bf16 copy of all its weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenLinear.apply(x, self.weight, self.bias)


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.dequantize().to(grad.dtype), None, None


def _to_nf4(tq, weight: torch.Tensor):
    """NF4 with torchao's block sizes, the second level shrunk where a small layer has fewer blocks."""
    if weight.numel() % NF4_BLOCK:
        raise ModelLoadError(f"model.quantize_base nf4: a {tuple(weight.shape)} weight is not a multiple of "
                             f"{NF4_BLOCK} values")
    blocks = weight.numel() // NF4_BLOCK
    return tq.to_nf4(weight.to(torch.bfloat16), block_size=NF4_BLOCK,
                     scaler_block_size=math.gcd(blocks, NF4_SCALER_BLOCK))
