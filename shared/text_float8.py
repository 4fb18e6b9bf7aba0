"""The text encoders' matmuls in float8 (`flux-prep encode --text-precision fp8`): T5's attention and gated FF
inputs, Qwen3's / Mistral's attention projections and MLPs, each a `Float8FrozenLinear` (shared/float8.py: the
weight in e4m3 once, one scale for the tensor; each call's input scaled as it comes; torch._scaled_mm).

What stays in the compute dtype, and why:
- T5's FF output layer `wo`: its input (the gated GELU's product) carries T5 v1.1's large activation outliers,
  the reason transformers once kept `wo` in fp32 against fp16 overflow (--t5-fp32-wo). One tensorwise scale
  for a whole batch set by a few channels' outliers leaves the other channels' values few of e4m3's bits (a
  per-row scale, one per token, would not help: the outliers are channels, present in every token). `wo` is
  22% of T5-XXL's matmul work; bench/encode_fp8.py measures T5 with and without it (`T5_WO_FLOAT8`).
- CLIP (FLUX.1's pooled vector): under 1% of the text matmul work at padded-256, cut after the pooled token.
- the embeddings, norms, attention itself, and any layer whose sizes are not multiples of 16 (float8 GEMMs'
  alignment; only in toy models).
"""
from __future__ import annotations

import torch

TEXT_PRECISIONS = ("bf16", "fp8")
OPTION = "--text-precision"
# The encode settings' and the manifest's key, written only for fp8: a bf16 cache's files stay as they were.
TEXT_PRECISION_KEY = "text_precision"
# T5's FF output layers in float8 too (off: see above). bench/encode_fp8.py sets it to measure both.
T5_WO_FLOAT8 = False
T5_LINEARS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1")          # transformers' T5 layer names
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")   # Qwen3, Mistral


def check_text_precision(precision: str, device) -> None:
    """Refuse an unknown precision, and fp8 on a CUDA device without float8 GEMMs (compute capability
    below 8.9: before Ada / Hopper) or without torchao; a CPU runs float8 slowly (tests)."""
    if precision not in TEXT_PRECISIONS:
        raise ValueError(f"{OPTION} {precision!r}: choose one of {', '.join(TEXT_PRECISIONS)}")
    if precision == "bf16":
        return
    from .float8 import require_float8
    from .models import ModelLoadError
    try:
        require_float8(device, f"{OPTION} fp8")
    except ModelLoadError as e:
        raise ValueError(f"{e}: use {OPTION} bf16") from None


def recorded_precision(settings: dict) -> str:
    """The text precision an encode's settings or a cache's manifest record (none recorded: bf16)."""
    return settings.get(TEXT_PRECISION_KEY) or "bf16"


def _name_in(names: tuple[str, ...]):
    return lambda name, linear: name.rpartition(".")[2] in names


def t5_choose(name: str, linear: torch.nn.Linear) -> bool:
    """transformers' T5: which linear layers compute in float8."""
    leaf = name.rpartition(".")[2]
    return leaf in T5_LINEARS or (T5_WO_FLOAT8 and leaf == "wo")


def t5_to_float8(t5) -> int:
    """T5 (transformers' T5EncoderModel or the project's FusedT5Encoder) with its matmuls in float8, in place;
    returns how many layers became float8."""
    from .float8 import to_float8_linears
    from .t5_fused import FusedT5Encoder
    if isinstance(t5, FusedT5Encoder):
        return t5.to_float8(wo=T5_WO_FLOAT8)
    return to_float8_linears(t5, t5_choose)


def decoder_to_float8(decoder) -> int:
    """Qwen3's / Mistral's decoder stack with its attention projections and MLPs in float8, in place."""
    from .float8 import to_float8_linears
    return to_float8_linears(decoder, _name_in(DECODER_LINEARS))


def refuse_none(count: int, what: str) -> None:
    if count == 0:
        raise ValueError(f"{OPTION} fp8: none of {what}'s linear layers has float8-aligned sizes (multiples of 16)")
