"""Black Forest Labs' original FLUX checkpoint layout (flux1-dev.safetensors) <-> diffusers' names: what
flux-sample reads (`--transformer FILE`) and `flux-prep export` writes (what ComfyUI loads).

diffusers' own converter (`convert_flux_transformer_checkpoint_to_diffusers`) hard-codes FLUX.1's
width (3072), so it cannot read smaller models of the same shape; this one derives every size from
the tensors themselves. The two layouts differ in names, in fused projections (BFL's `qkv` and
`linear1` are diffusers' q, k, v [and mlp] stacked on dim 0) and in the final modulation, whose
(shift, scale) halves diffusers stores as (scale, shift).
"""
from __future__ import annotations

from pathlib import Path

import torch

# Some exporters (ComfyUI, original repos' full checkpoints) prefix every key with this.
PREFIX = "model.diffusion_model."
SWAPPED = ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias")


def _linear(bfl: str, *diffusers: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(f"{bfl}.{p}", tuple(f"{d}.{p}" for d in diffusers)) for p in ("weight", "bias")]


def _norm(bfl: str, diffusers: str) -> list[tuple[str, tuple[str, ...]]]:
    return [(f"{bfl}.scale", (f"{diffusers}.weight",))]


def key_map(num_double: int, num_single: int, guidance: bool) -> list[tuple[str, tuple[str, ...]]]:
    """(BFL key, the diffusers keys stacked on dim 0 to make it), for a whole transformer."""
    pairs = (_linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
             + _linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
             + _linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
             + _linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
             + _linear("txt_in", "context_embedder") + _linear("img_in", "x_embedder")
             + _linear("final_layer.linear", "proj_out")
             + _linear("final_layer.adaLN_modulation.1", "norm_out.linear"))
    if guidance:
        pairs += (_linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
                  + _linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"))
    for i in range(num_double):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        pairs += (_linear(f"{b}.img_mod.lin", f"{d}.norm1.linear")
                  + _linear(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
                  + _linear(f"{b}.img_attn.qkv", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v")
                  + _linear(f"{b}.txt_attn.qkv", f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj",
                            f"{d}.attn.add_v_proj")
                  + _norm(f"{b}.img_attn.norm.query_norm", f"{d}.attn.norm_q")
                  + _norm(f"{b}.img_attn.norm.key_norm", f"{d}.attn.norm_k")
                  + _norm(f"{b}.txt_attn.norm.query_norm", f"{d}.attn.norm_added_q")
                  + _norm(f"{b}.txt_attn.norm.key_norm", f"{d}.attn.norm_added_k")
                  + _linear(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj") + _linear(f"{b}.img_mlp.2", f"{d}.ff.net.2")
                  + _linear(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
                  + _linear(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
                  + _linear(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
                  + _linear(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out"))
    for i in range(num_single):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        pairs += (_linear(f"{b}.modulation.lin", f"{d}.norm.linear")
                  + _linear(f"{b}.linear1", f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp")
                  + _norm(f"{b}.norm.query_norm", f"{d}.attn.norm_q")
                  + _norm(f"{b}.norm.key_norm", f"{d}.attn.norm_k")
                  + _linear(f"{b}.linear2", f"{d}.proj_out"))
    return pairs


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _count_blocks(keys, prefix: str) -> int:
    idx = {int(k.split(".")[1]) for k in keys if k.startswith(prefix + ".")}
    return max(idx) + 1 if idx else 0


def strip_prefix(state: dict) -> dict:
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in state.items()}


def config_from_shapes(shapes: dict[str, tuple[int, ...]], base: dict | None = None) -> dict:
    """A FluxTransformer2DModel config for a BFL checkpoint, every size read from its tensor shapes.

    Only the rotary axes cannot be read from weights; they come from `base` (the MODEL's
    transformer config) or diffusers' default, FLUX.1's (16, 56, 56)."""
    shapes = strip_prefix(shapes)
    try:
        inner, in_channels = shapes["img_in.weight"]
        out_channels = shapes["final_layer.linear.weight"][0]
        head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        cfg = dict(base or {})
        cfg.update(
            patch_size=1, in_channels=in_channels, out_channels=None if out_channels == in_channels else out_channels,
            num_layers=_count_blocks(shapes, "double_blocks"),
            num_single_layers=_count_blocks(shapes, "single_blocks"),
            attention_head_dim=head_dim, num_attention_heads=inner // head_dim,
            joint_attention_dim=shapes["txt_in.weight"][1],
            pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
            guidance_embeds="guidance_in.in_layer.weight" in shapes,
        )
    except KeyError as e:
        raise ValueError(f"not a FLUX transformer in Black Forest Labs' key layout (no {e.args[0]})") from None
    cfg.setdefault("axes_dims_rope", (16, 56, 56))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def bfl_to_diffusers(state: dict, target_shapes: dict[str, tuple[int, ...]]) -> dict:
    """Rename and split a BFL state dict into diffusers' keys; `target_shapes` (the diffusers model's
    own state-dict shapes) give the split sizes of the fused projections."""
    state = strip_prefix(state)
    pairs = key_map(_count_blocks(state, "double_blocks"), _count_blocks(state, "single_blocks"),
                    "guidance_in.in_layer.weight" in state)
    missing = [b for b, _ in pairs if b not in state]
    unexpected = sorted(set(state) - {b for b, _ in pairs})
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
        raise ValueError(f"not a FLUX transformer in Black Forest Labs' key layout ({what})")
    out = {}
    for bfl, names in pairs:
        t = state[bfl]
        if bfl in SWAPPED:
            t = _swap_halves(t)
        if len(names) == 1:
            out[names[0]] = t
        else:
            for name, part in zip(names, t.split([target_shapes[n][0] for n in names], dim=0)):
                out[name] = part
    return out


def diffusers_to_bfl(state: dict) -> dict:
    """The inverse, for exporting and for tests: diffusers' keys -> one BFL state dict."""
    pairs = key_map(_count_blocks(state, "transformer_blocks"), _count_blocks(state, "single_transformer_blocks"),
                    any(k.startswith("time_text_embed.guidance_embedder.") for k in state))
    out = {}
    for bfl, names in pairs:
        t = torch.cat([state[n] for n in names], dim=0)
        out[bfl] = _swap_halves(t) if bfl in SWAPPED else t
    return {k: v.contiguous() for k, v in out.items()}


def config_from_diffusers_shapes(shapes: dict[str, tuple[int, ...]], base: dict | None = None) -> dict:
    """The same config for a state dict in diffusers' keys: the shapes its BFL tensors would have."""
    pairs = key_map(_count_blocks(shapes, "transformer_blocks"), _count_blocks(shapes, "single_transformer_blocks"),
                    any(k.startswith("time_text_embed.guidance_embedder.") for k in shapes))
    bfl = {}
    for key, names in pairs:
        if all(n in shapes for n in names):
            first = shapes[names[0]]
            bfl[key] = (sum(shapes[n][0] for n in names), *first[1:])
    try:
        return config_from_shapes(bfl, base)
    except ValueError:
        raise ValueError("not a FLUX transformer in diffusers' key layout") from None


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the weights."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def transformer_from_state(config: dict, state: dict, dtype=torch.float32, device="cpu"):
    """A FluxTransformer2DModel of `config` holding `state` (diffusers' keys, every one of them), in `dtype`."""
    from diffusers import FluxTransformer2DModel
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.to(device).eval()


def load_bfl_transformer(path: Path, base_config: dict | None, dtype=torch.float32, device="cpu"):
    """A FluxTransformer2DModel from a single BFL-layout safetensors file."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    config = config_from_shapes(read_shapes(path), base_config)
    with torch.device("meta"):
        target = {k: tuple(v.shape) for k, v in FluxTransformer2DModel.from_config(config).state_dict().items()}
    return transformer_from_state(config, bfl_to_diffusers(load_file(str(path)), target), dtype, device)
