"""A peft LoKr or LoHa adapter in LyCORIS's file layout, the one ComfyUI loads: per adapted module
`lycoris_<diffusers module path, dots as underscores>` with `.lokr_w1`, `.lokr_w2` (or `.lokr_w2_a` and
`.lokr_w2_b` where w2 is of rank r), `.hada_w1_a` .. `.hada_w2_b`, and `.alpha`.

The module names are diffusers' (SimpleTuner's LyCORIS layout), not Black Forest Labs' fused ones: a LoRA of
q, k and v stacks into one LoRA of BFL's fused qkv (shared/bfl_lora.py), but Kronecker and Hadamard products of
three parts are not one product of the whole. ComfyUI's LoRA key map gives each `lycoris_` diffusers name its
slice of the fused BFL weight (comfy/lora.py model_lora_keys_unet over comfy/utils.py flux_to_diffusers,
which lists FLUX.1's and FLUX.2's diffusers names), and diffusers reads this layout back for FLUX.2 LoKr
(Flux2LoraLoaderMixin: _convert_lycoris_flux2_lokr_to_diffusers).

Scales: peft scales both kinds by alpha / r. LyCORIS readers (ComfyUI, diffusers) scale LoHa by alpha /
rank(w1_b), and LoKr by alpha / rank of its rank-decomposed factor, or not at all where both factors are full
matrices: there the scale is folded into w1 and no alpha is written.
"""
from __future__ import annotations

import torch

PREFIX = "lycoris_"
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def lycoris_name(module: str) -> str:
    """`transformer_blocks.0.attn.to_q` -> `lycoris_transformer_blocks_0_attn_to_q`."""
    return PREFIX + module.replace(".", "_")


def _modules(adapter: dict, suffixes: tuple[str, ...]) -> dict[str, dict]:
    """{module: {suffix: tensor}} of a peft state dict (keys `<module>.<suffix>`, no prefix, no adapter name)."""
    out: dict[str, dict] = {}
    for key, value in adapter.items():
        module, _, suffix = key.rpartition(".")
        if suffix not in suffixes:
            raise ValueError(f"a tensor that is not {'LoKr' if suffixes is LOKR else 'LoHa'}'s: {key}")
        out.setdefault(module, {})[suffix] = value
    return out


def peft_to_lycoris(adapter: dict, kind: str, rank: int, alpha: float) -> dict:
    """LyCORIS's state dict of a peft LoKr ("lokr") or LoHa ("loha") adapter of one rank and alpha."""
    out = {}
    for module, parts in _modules(adapter, LOKR if kind == "lokr" else LOHA).items():
        name = lycoris_name(module)
        if kind == "lokr" and not ({"lokr_w1_a", "lokr_w2_a"} & set(parts)):   # both full: no alpha read
            parts = {**parts, "lokr_w1": parts["lokr_w1"] * (alpha / rank)}
        else:
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
        out.update({f"{name}.{suffix}": v.contiguous() for suffix, v in parts.items()})
    return out

