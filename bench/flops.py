"""Model FLOPs of a FLUX transformer training step, for MFU: 6 x (matmul weights each token passes
through) x tokens + attention (12 x S^2 x width per layer), counting real tokens only.

Both families' transformers (FluxTransformer2DModel, Flux2Transformer2DModel) name their layers alike:
double blocks' image stream (to_q/k/v, to_out, ff) and text stream (add_*_proj, to_add_out, ff_context),
single blocks over the joint sequence (FLUX.1: to_q/k/v, proj_mlp, proj_out; FLUX.2: the fused
to_qkv_mlp_proj and to_out), x_embedder/proj_out on the image tokens, context_embedder on the text's.
Layers fed one row per image (modulation, time/guidance embedding) are the family's per_sample_layer.
"""
from __future__ import annotations

import torch

from shared.family import get_family

per_sample_layer = get_family("flux1").per_sample_layer

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}


def linear_flops_per_image(model, img_tokens: int, txt_tokens: float, per_sample=per_sample_layer) -> float:
    """6 x sum over linear layers of (weights x tokens through them): training FLOPs without attention.
    `per_sample`: the family's per_sample_layer (FLUX.1's by default)."""
    total = 0.0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = mod.in_features * mod.out_features
        if per_sample(name):
            tokens = 1                                           # per-sample modulation, not per token
        elif name.startswith("context_embedder") or (name.startswith("transformer_blocks")
                                                     and any(k in name for k in ("add_", "ff_context"))):
            tokens = txt_tokens                                  # text stream of the double blocks
        elif name.startswith(("x_embedder", "proj_out")) or name.startswith("transformer_blocks"):
            tokens = img_tokens                                  # image stream
        else:
            tokens = img_tokens + txt_tokens                     # single blocks: the joint sequence
        total += 6 * w * tokens
    return total


def attention_flops_per_image(cfg: dict, img_tokens: int, mean_sq_seq: float) -> float:
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    layers = cfg["num_layers"] + cfg["num_single_layers"]
    return 12 * mean_sq_seq * width * layers
