"""Black Forest Labs' FLUX.2 checkpoint layout (flux2-dev.safetensors, the [klein] files; what ComfyUI's
diffusion-model loader reads) <-> diffusers' Flux2Transformer2DModel names.

The counterpart of shared/bfl.py (FLUX.1) with the same functions. The reference is diffusers'
`convert_flux2_transformer_checkpoint_to_diffusers` (BFL -> diffusers), which hard-codes no width but
only reads BFL's keys (no "model.diffusion_model." prefix) and has no inverse. Every size here comes from
the tensors. The layouts differ in names, in the double blocks' `qkv` (diffusers' q, k, v stacked on
dim 0; the single blocks' `linear1` is fused in both, diffusers' `to_qkv_mlp_proj`), and in the final
modulation, whose (shift, scale) halves diffusers stores as (scale, shift). FLUX.2 has no biases, and its
modulation layers are shared by all blocks of a kind (one `double_stream_modulation_img`, ...).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .bfl import PREFIX, SWAPPED, _count_blocks, _swap_halves, read_shapes, strip_prefix

__all__ = ["PREFIX", "bfl_to_diffusers", "config_from_diffusers_shapes", "config_from_shapes", "diffusers_to_bfl",
           "is_flux2_bfl", "key_map", "load_bfl_transformer", "read_shapes", "transformer_from_state"]

# What neither layout's tensors hold: Flux2Transformer2DModel's defaults, FLUX.2's own (diffusers'
# convert_flux2_to_diffusers.py and BFL's flux2 model.py agree).
ROPE_THETA = 2000
EPS = 1e-6
GUIDANCE = "guidance_in.in_layer.weight"
# A key only FLUX.2's BFL layout has (FLUX.1 modulates in each block: double_blocks.N.img_mod.lin)
FLUX2_MARK = "double_stream_modulation_img.lin.weight"


def _w(bfl: str, *diffusers: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(f"{bfl}.weight", tuple(f"{d}.weight" for d in diffusers))]


def _norm(bfl: str, diffusers: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(f"{bfl}.scale", (f"{diffusers}.weight",))]


def _shared_layers(guidance: bool) -> list[tuple[str, tuple[str, ...]]]:
    pairs = (_w("img_in", "x_embedder") + _w("txt_in", "context_embedder")
             + _w("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1")
             + _w("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2")
             + _w("double_stream_modulation_img.lin", "double_stream_modulation_img.linear")
             + _w("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear")
             + _w("single_stream_modulation.lin", "single_stream_modulation.linear")
             + _w("final_layer.linear", "proj_out") + _w("final_layer.adaLN_modulation.1", "norm_out.linear"))
    if guidance:   # [dev] only: guidance-distilled
        pairs += (_w("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1")
                  + _w("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"))
    return pairs


def _double_block(i: int) -> list[tuple[str, tuple[str, ...]]]:
    b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
    return (_w(f"{b}.img_attn.qkv", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")
            + _w(f"{b}.txt_attn.qkv", f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj")
            + _norm(f"{b}.img_attn.norm.query_norm", f"{d}.attn.norm_q")
            + _norm(f"{b}.img_attn.norm.key_norm", f"{d}.attn.norm_k")
            + _norm(f"{b}.txt_attn.norm.query_norm", f"{d}.attn.norm_added_q")
            + _norm(f"{b}.txt_attn.norm.key_norm", f"{d}.attn.norm_added_k")
            + _w(f"{b}.img_attn.proj", f"{d}.attn.to_out.0") + _w(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
            + _w(f"{b}.img_mlp.0", f"{d}.ff.linear_in") + _w(f"{b}.img_mlp.2", f"{d}.ff.linear_out")
            + _w(f"{b}.txt_mlp.0", f"{d}.ff_context.linear_in") + _w(f"{b}.txt_mlp.2", f"{d}.ff_context.linear_out"))


def _single_block(i: int) -> list[tuple[str, tuple[str, ...]]]:
    b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    return (_w(f"{b}.linear1", f"{d}.attn.to_qkv_mlp_proj") + _w(f"{b}.linear2", f"{d}.attn.to_out")
            + _norm(f"{b}.norm.query_norm", f"{d}.attn.norm_q") + _norm(f"{b}.norm.key_norm", f"{d}.attn.norm_k"))


def key_map(num_double: int, num_single: int, guidance: bool) -> list[tuple[str, tuple[str, ...]]]:
    """(BFL key, the diffusers keys stacked on dim 0 to make it), for a whole Flux2Transformer2DModel."""
    pairs = _shared_layers(guidance)
    for i in range(num_double):
        pairs += _double_block(i)
    for i in range(num_single):
        pairs += _single_block(i)
    return pairs


def is_flux2_bfl(keys) -> bool:
    """Whether the keys (a BFL-layout file's, with or without "model.diffusion_model.") are FLUX.2's."""
    return FLUX2_MARK in keys or PREFIX + FLUX2_MARK in keys


def _diffusers_pairs(keys) -> list[tuple[str, tuple[str, ...]]]:
    return key_map(_count_blocks(keys, "transformer_blocks"), _count_blocks(keys, "single_transformer_blocks"),
                   any(k.startswith("time_guidance_embed.guidance_embedder.") for k in keys))


def bfl_to_diffusers(state: dict, target_shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """Rename and split a BFL FLUX.2 state dict into diffusers' keys. The double blocks' qkv splits into
    three equal parts (q, k and v all have the attention width); `target_shapes` (the diffusers model's own
    state-dict shapes), where given, give the split sizes instead."""
    state = strip_prefix(state)
    pairs = key_map(_count_blocks(state, "double_blocks"), _count_blocks(state, "single_blocks"), GUIDANCE in state)
    missing = [b for b, _ in pairs if b not in state]
    unexpected = sorted(set(state) - {b for b, _ in pairs})
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
        raise ValueError(f"not a FLUX.2 transformer in Black Forest Labs' key layout ({what})")
    out = {}
    for bfl, names in pairs:
        t = _swap_halves(state[bfl]) if bfl in SWAPPED else state[bfl]
        if target_shapes is None:
            parts = t.chunk(len(names), dim=0)
        else:
            parts = t.split([target_shapes[n][0] for n in names], dim=0)
        out.update(zip(names, parts))
    return out


def diffusers_to_bfl(state: dict) -> dict:
    """The inverse, for exporting: a Flux2Transformer2DModel's state dict -> one BFL state dict (no prefix)."""
    pairs = _diffusers_pairs(state)
    missing = [n for _, names in pairs for n in names if n not in state]
    unexpected = sorted(set(state) - {n for _, names in pairs for n in names})
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
        raise ValueError(f"not a whole Flux2Transformer2DModel state dict ({what})")
    out = {}
    for bfl, names in pairs:
        t = torch.cat([state[n] for n in names], dim=0)
        out[bfl] = (_swap_halves(t) if bfl in SWAPPED else t).contiguous()
    return out


def _first(shapes: dict, *keys: str) -> tuple[int, ...]:
    """The shape of the first of `keys` present (a model may have no double or no single blocks)."""
    for k in keys:
        if k in shapes:
            return shapes[k]
    raise KeyError(keys[0])


def _mlp_ratio(hidden: int, width: int) -> float:
    """The mlp_ratio for which diffusers' int(width * ratio) gives `hidden` back (hidden / width may land just
    below it in floating point)."""
    ratio = hidden / width
    while int(width * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _rope_axes(base: dict, head_dim: int) -> tuple[int, ...]:
    """`base`'s rotary axes, else FLUX.2's four equal ones ((32,) * 4 at its head dim 128); they must add up
    to the head dim."""
    axes = tuple(base.get("axes_dims_rope") or (head_dim // 4,) * 4)
    if sum(axes) != head_dim:
        raise ValueError(f"rotary axes {axes} do not add up to the weights' attention head dim {head_dim}")
    return axes


def _mlp_hidden(shapes: dict, width: int) -> int:
    if "double_blocks.0.img_mlp.2.weight" in shapes:
        return shapes["double_blocks.0.img_mlp.2.weight"][1]
    return shapes["single_blocks.0.linear2.weight"][1] - width   # linear2 takes [attention, MLP hidden]


def _config(shapes: dict, base: dict) -> dict:
    """The config of BFL-keyed shapes (no prefix); KeyError names a key a FLUX.2 transformer must have."""
    width, in_channels = shapes["img_in.weight"]
    head_dim = _first(shapes, "double_blocks.0.img_attn.norm.query_norm.scale",
                      "single_blocks.0.norm.query_norm.scale")[0]
    patch = base.get("patch_size") or 1
    out_channels = shapes["final_layer.linear.weight"][0] // (patch * patch)
    return dict(
        patch_size=patch, in_channels=in_channels, out_channels=None if out_channels == in_channels else out_channels,
        num_layers=_count_blocks(shapes, "double_blocks"), num_single_layers=_count_blocks(shapes, "single_blocks"),
        attention_head_dim=head_dim, num_attention_heads=width // head_dim,
        joint_attention_dim=shapes["txt_in.weight"][1], timestep_guidance_channels=shapes["time_in.in_layer.weight"][1],
        mlp_ratio=_mlp_ratio(_mlp_hidden(shapes, width), width), guidance_embeds=GUIDANCE in shapes,
        axes_dims_rope=_rope_axes(base, head_dim), rope_theta=base.get("rope_theta", ROPE_THETA),
        eps=base.get("eps", EPS))


def config_from_shapes(shapes: dict[str, tuple[int, ...]], base: dict | None = None) -> dict:
    """A Flux2Transformer2DModel config for a BFL FLUX.2 checkpoint, every size read from its tensor shapes.

    From the tensors: the width (img_in), in/out channels, block counts, the head dim (the per-head q/k
    RMSNorm's scale has one entry per head channel) and so the head count, the text width, the timestep
    channels, mlp_ratio (the MLP's hidden width over the width) and the guidance embedding ([dev]).
    Not in any tensor: the rotary axes and theta, the norms' eps and the patch size; those come from `base`
    (the MODEL's transformer config) or FLUX.2's values (four equal axes, theta 2000, eps 1e-6, patch 1)."""
    try:
        return _config(strip_prefix(shapes), dict(base or {}))
    except KeyError as e:
        raise ValueError(f"not a FLUX.2 transformer in Black Forest Labs' key layout (no {e.args[0]})") from None


def config_from_diffusers_shapes(shapes: dict[str, tuple[int, ...]], base: dict | None = None) -> dict:
    """The same config for a state dict in diffusers' keys: the shapes its BFL tensors would have."""
    bfl = {}
    for key, names in _diffusers_pairs(shapes):
        if all(n in shapes for n in names):
            bfl[key] = (sum(shapes[n][0] for n in names), *shapes[names[0]][1:])
    try:
        return _config(bfl, dict(base or {}))
    except KeyError:
        raise ValueError("not a FLUX.2 transformer in diffusers' key layout (no x_embedder, context_embedder, "
                         "proj_out, timestep embedder or block weights)") from None


def transformer_from_state(config: dict, state: dict, dtype=torch.float32, device="cpu"):
    """A Flux2Transformer2DModel of `config` holding `state` (diffusers' keys, every one of them), in `dtype`.
    A state that does not fit the config raises RuntimeError (load_state_dict's)."""
    from diffusers import Flux2Transformer2DModel
    with torch.device("meta"):
        model = Flux2Transformer2DModel.from_config(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.to(device).eval()


def load_bfl_transformer(path: Path, base_config: dict | None, dtype=torch.float32, device="cpu"):
    """A Flux2Transformer2DModel from a single BFL-layout FLUX.2 safetensors file. Raises ValueError (naming
    the key or the mismatch) on a file that is not one."""
    from safetensors.torch import load_file

    config = config_from_shapes(read_shapes(path), base_config)
    try:
        return transformer_from_state(config, bfl_to_diffusers(load_file(str(path))), dtype, device)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])   # line 0 names only the class
        raise ValueError(f"tensor shapes that do not make one FLUX.2 transformer ({detail})") from None
