"""Model presets: the transformer, text and VAE shapes of each known FLUX model.

`flux-dev`, `flux-schnell` and `flux-kontext-dev` carry FLUX.1's real dimensions; `tiny`
(and `tiny-kontext`) keeps the same classes at toy sizes so that every stage runs on a CPU in seconds. FLUX.2's
(`flux2-klein-4b`, `flux2-klein-9b`, `flux2-dev`, `flux2-tiny`) are in presets_flux2.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from .presets_flux2 import FLUX2_PRESETS


@dataclass(frozen=True)
class Preset:
    name: str
    transformer: dict           # FluxTransformer2DModel config
    t5_max_length: int          # FLUX's padded T5 length
    default_steps: int          # sampling steps the model is made for
    shift_schedule: bool        # whether sampling shifts the schedule by image-token count
    hub_id: str | None = None   # where the real weights live
    family: str = "flux1"       # shared/family/


_FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    axes_dims_rope=(16, 56, 56),
)

_FLUX1_PRESETS: dict[str, Preset] = {
    "flux-dev": Preset(
        name="flux-dev",
        transformer={**_FLUX_TRANSFORMER, "guidance_embeds": True},
        t5_max_length=512, default_steps=28, shift_schedule=True,
        hub_id="black-forest-labs/FLUX.1-dev",
    ),
    "flux-schnell": Preset(
        name="flux-schnell",
        transformer={**_FLUX_TRANSFORMER, "guidance_embeds": False},
        t5_max_length=256, default_steps=4, shift_schedule=False,
        hub_id="black-forest-labs/FLUX.1-schnell",
    ),
    # FLUX.1 Kontext [dev]: [dev]'s transformer (BFL's flux/util.py), sampled with a reference image
    # (shared/family/flux1_kontext.py); for a random init of its shape (bench/memory_edit.py)
    "flux-kontext-dev": Preset(
        name="flux-kontext-dev",
        transformer={**_FLUX_TRANSFORMER, "guidance_embeds": True},
        t5_max_length=512, default_steps=28, shift_schedule=True,
        hub_id="black-forest-labs/FLUX.1-Kontext-dev", family="flux1-kontext",
    ),
    "tiny": Preset(
        name="tiny",
        transformer=dict(
            patch_size=1, in_channels=64, out_channels=None,
            num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=4,
            joint_attention_dim=64, pooled_projection_dim=64,
            axes_dims_rope=(4, 6, 6), guidance_embeds=False,
        ),
        t5_max_length=32, default_steps=20, shift_schedule=True,
    ),
}
# the tiny transformer with Kontext [dev]'s guidance embedding (shared/tiny.py write_tiny_kontext's)
_FLUX1_PRESETS["tiny-kontext"] = Preset(
    name="tiny-kontext", transformer={**_FLUX1_PRESETS["tiny"].transformer, "guidance_embeds": True},
    t5_max_length=32, default_steps=28, shift_schedule=True, family="flux1-kontext")


# Every preset, both families: FLUX.2's shapes and sources are in presets_flux2.py.
PRESETS: dict = {**_FLUX1_PRESETS, **FLUX2_PRESETS}


def get_preset(name: str):
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}") from None


def transformer_config(name: str, **overrides) -> dict:
    """A preset's transformer config with overrides (e.g. fewer blocks for a benchmark)."""
    cfg = dict(get_preset(name).transformer)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"unknown transformer option(s): {', '.join(sorted(unknown))}")
    cfg.update(overrides)
    return cfg
