"""A FLUX.2 LoRA in peft's diffusers names -> kohya's names for Black Forest Labs' FLUX.2 layout
(`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, `.lora_up.weight`, `.alpha`): what musubi-tuner
writes for FLUX.2, what ComfyUI loads (its LoRA key map gives every model weight `diffusion_model.X` the name
`lora_unet_` + X with dots as underscores) and what diffusers' Flux2LoraLoaderMixin reads
(`_convert_kohya_flux2_lora_to_diffusers`).

As for FLUX.1 (shared/bfl_lora.py, whose fusion this reuses): the double blocks' q, k, v adapters become one
`qkv` adapter of rank 3r (A stacked, B block-diagonal, alpha 3x, so that alpha / rank stays the adapter's),
which diffusers' kohya reader splits back exactly. The single blocks' `to_qkv_mlp_proj` and `to_out` are
fused in diffusers too, so they map one to one (`linear1`, `linear2`).
"""
from __future__ import annotations

from .bfl import _count_blocks
from .bfl_flux2 import key_map
from .bfl_lora import kohya_from_pairs, kohya_name

PEFT_PREFIX = "transformer."   # diffusers' save_lora_weights layout (the trainer's final/)

__all__ = ["kohya_name", "peft_to_kohya"]


def peft_to_kohya(adapter: dict, rank: int, alpha: float) -> dict:
    """kohya's state dict of a FLUX.2 peft LoRA (keys `transformer_blocks.0.attn.to_q.lora_A.weight`, with or
    without the "transformer." prefix) of one rank and alpha. Raises ValueError on a key it cannot place (a
    LoRA of a bias, DoRA's magnitudes, per-layer ranks)."""
    adapter = {k.removeprefix(PEFT_PREFIX): v for k, v in adapter.items()}
    pairs = key_map(_count_blocks(adapter, "transformer_blocks"), _count_blocks(adapter, "single_transformer_blocks"),
                    any(k.startswith("time_guidance_embed.guidance_embedder.") for k in adapter))
    return kohya_from_pairs(adapter, pairs, rank, alpha)
