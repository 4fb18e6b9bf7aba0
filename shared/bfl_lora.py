"""A FLUX LoRA in peft's diffusers names -> kohya's names for Black Forest Labs' layout, the file that
sd-scripts writes and ComfyUI and Forge load (`lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`,
`.lora_up.weight`, `.alpha`).

Where BFL fuses several diffusers projections into one (`qkv`, the single blocks' `linear1`), the parts'
adapters become one of rank n x r: their A matrices stacked, their B matrices on the block diagonal (the
layout diffusers' kohya reader splits back exactly), a part without an adapter given zeros. kohya scales by
alpha / rank of the fused adapter, so its alpha is n times the adapter's.
"""
from __future__ import annotations

import torch

from .bfl import SWAPPED, _count_blocks, _swap_halves, key_map

KOHYA_PREFIX = "lora_unet_"


def kohya_name(bfl_key: str) -> str:
    """`double_blocks.0.img_attn.qkv.weight` -> `lora_unet_double_blocks_0_img_attn_qkv`."""
    return KOHYA_PREFIX + bfl_key.removesuffix(".weight").replace(".", "_")


def peft_to_kohya(adapter: dict, rank: int, alpha: float) -> dict:
    """kohya's state dict of a peft LoRA (keys `transformer_blocks.0.attn.to_q.lora_A.weight`, no prefix) of
    one rank and alpha. Raises ValueError on a key it cannot place (a LoRA of a bias, DoRA, a layer BFL lacks)."""
    pairs = key_map(_count_blocks(adapter, "transformer_blocks"), _count_blocks(adapter, "single_transformer_blocks"),
                    any(k.startswith("time_text_embed.guidance_embedder.") for k in adapter))
    return kohya_from_pairs(adapter, pairs, rank, alpha)


def kohya_from_pairs(adapter: dict, pairs: list[tuple[str, tuple[str, ...]]], rank: int, alpha: float) -> dict:
    """kohya's state dict of a peft LoRA (no prefix) under a FLUX generation's key map ((BFL key, the diffusers
    keys stacked to make it), shared/bfl.py's or shared/bfl_flux2.py's)."""
    out, used = {}, set()
    for bfl, names in pairs:
        if not bfl.endswith(".weight"):
            continue
        modules = [n.removesuffix(".weight") for n in names]
        present = [m for m in modules if f"{m}.lora_A.weight" in adapter]
        if not present:
            continue
        out.update(_fused(adapter, bfl, modules, rank, alpha))
        used.update(f"{m}.lora_{ab}.weight" for m in present for ab in "AB")
    left = sorted(set(adapter) - used)
    if left:
        raise ValueError(f"a LoRA tensor with no place in Black Forest Labs' layout: {left[0]}")
    return out


def _part_out(module: str, width: int) -> int:
    """Output size of a fused projection's part, from the block's width: q, k and v keep it, the single
    blocks' MLP input is FLUX's 4x (FluxSingleTransformerBlock's mlp_ratio)."""
    return 4 * width if module.endswith("proj_mlp") else width


def _fused(adapter: dict, bfl: str, modules: list[str], rank: int, alpha: float) -> dict:
    like = next(adapter[f"{m}.lora_A.weight"] for m in modules if f"{m}.lora_A.weight" in adapter)
    downs, ups = [], []
    for m in modules:
        a, b = adapter.get(f"{m}.lora_A.weight"), adapter.get(f"{m}.lora_B.weight")
        if a is None:   # a part without an adapter (targets that name q and v, not k): zeros
            a = like.new_zeros(rank, like.shape[1])
            b = like.new_zeros(_part_out(m, like.shape[1]), rank)
        if a.shape[0] != rank:
            raise ValueError(f"{m}: LoRA rank {a.shape[0]}, not the adapter's {rank} (per-layer ranks are not "
                             "exported)")
        downs.append(a)
        ups.append(b)
    n = len(modules)
    up = torch.block_diag(*ups) if n > 1 else ups[0]
    if bfl in SWAPPED:
        up = _swap_halves(up)
    name = kohya_name(bfl)
    return {f"{name}.lora_down.weight": torch.cat(downs, dim=0).contiguous(), f"{name}.lora_up.weight": up.contiguous(),
            f"{name}.alpha": torch.tensor(float(alpha * n))}
