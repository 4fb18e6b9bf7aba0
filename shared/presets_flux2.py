"""FLUX.2 model presets: the transformer, text and sampling shapes of each known FLUX.2 model.

shared/presets.py's table takes them in (PRESETS, get_preset, transformer_config serve both families). Each value says where it comes from:

- [diffusers-convert]: diffusers' scripts/convert_flux2_to_diffusers.py, get_flux2_transformer_config
  (the configs the hub folders were converted with).
- [bfl-model]: BFL's flux2 src/flux2/model.py, Flux2Params / Klein4BParams / Klein9BParams.
- [bfl-util]: BFL's flux2 src/flux2/util.py, FLUX2_MODEL_INFO: hub repo ids and each model's
  "defaults" {"num_steps", "guidance"} (musubi-tuner's flux_2/flux2_utils.py copies the same table).
- [diffusers-pipe]: diffusers 0.42.1 pipelines/flux2: Flux2KleinPipeline._get_qwen3_prompt_embeds
  (layers (9, 18, 27)), Flux2Pipeline._get_mistral_3_small_prompt_embeds (layers (10, 20, 30)),
  max_sequence_length 512 for both; `is_distilled` in model_index.json turns CFG off.
- [bfl-readme]: BFL's flux2 README: the klein *base* checkpoints (undistilled, 50 steps) are the
  ones for fine-tuning and LoRA training; the distilled ones take 4 steps at guidance 1.

Parameter counts (Flux2Transformer2DModel on the meta device, tests/test_tiny_flux2.py):
klein-4B 3.88e9, klein-9B 9.08e9, dev 32.22e9.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Flux2Preset:
    name: str
    transformer: dict               # Flux2Transformer2DModel config
    text_encoder: str               # transformers class of the text encoder
    text_layers: tuple[int, ...]    # hidden-state layers stacked (3 x width) into the prompt embedding
    text_max_length: int            # the padded prompt length (the transformer attends all of it)
    default_steps: int              # sampling steps the checkpoint is made for
    guidance_scale: float           # the checkpoint's default guidance
    true_cfg: bool                  # True: two passes (cond/uncond, klein base); False: embedded (dev)
    shift_schedule: bool = True     # sampling shifts the schedule by image-token count (compute_empirical_mu)
    family: str = "flux2"           # shared/family/
    hub_id: str | None = None       # where the real weights live (diffusers layout)
    distilled_hub_id: str | None = None   # the step-distilled sibling (4 steps, guidance 1), for sampling


# [diffusers-convert] and [bfl-model]: all FLUX.2 transformers share these.
_FLUX2_COMMON = dict(
    patch_size=1,
    in_channels=128,            # 32 latent channels, patchified 2x2
    out_channels=None,
    attention_head_dim=128,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
)

FLUX2_PRESETS: dict[str, Flux2Preset] = {
    "flux2-klein-4b": Flux2Preset(
        name="flux2-klein-4b",
        # [diffusers-convert] klein-4b; [bfl-model] Klein4BParams: hidden 3072, 24 heads, 5 + 20 blocks,
        # context 7680 = 3 x Qwen3-4B's 2560.
        transformer={**_FLUX2_COMMON, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
                     "joint_attention_dim": 7680, "guidance_embeds": False},
        text_encoder="Qwen3ForCausalLM", text_layers=(9, 18, 27), text_max_length=512,   # [diffusers-pipe]
        default_steps=50, guidance_scale=4.0, true_cfg=True,     # [bfl-util] flux.2-klein-base-4b defaults
        hub_id="black-forest-labs/FLUX.2-klein-base-4B",          # [bfl-util], [bfl-readme]
        distilled_hub_id="black-forest-labs/FLUX.2-klein-4B",     # [bfl-util] flux.2-klein-4b: 4 steps, 1.0
    ),
    "flux2-klein-9b": Flux2Preset(
        name="flux2-klein-9b",
        # [diffusers-convert] klein-9b; [bfl-model] Klein9BParams: hidden 4096, 32 heads, 8 + 24 blocks,
        # context 12288 = 3 x Qwen3-8B's 4096.
        transformer={**_FLUX2_COMMON, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
                     "joint_attention_dim": 12288, "guidance_embeds": False},
        text_encoder="Qwen3ForCausalLM", text_layers=(9, 18, 27), text_max_length=512,   # [diffusers-pipe]
        default_steps=50, guidance_scale=4.0, true_cfg=True,     # [bfl-util] flux.2-klein-base-9b defaults
        hub_id="black-forest-labs/FLUX.2-klein-base-9B",          # [bfl-util], [bfl-readme]
        distilled_hub_id="black-forest-labs/FLUX.2-klein-9B",     # [bfl-util] flux.2-klein-9b: 4 steps, 1.0
    ),
    "flux2-dev": Flux2Preset(
        name="flux2-dev",
        # [diffusers-convert] flux2-dev; [bfl-model] Flux2Params: hidden 6144, 48 heads, 8 + 48 blocks,
        # context 15360 = 3 x Mistral-Small-3.x's 5120; guidance-distilled, so a guidance embedding.
        transformer={**_FLUX2_COMMON, "num_layers": 8, "num_single_layers": 48, "num_attention_heads": 48,
                     "joint_attention_dim": 15360, "guidance_embeds": True},
        text_encoder="Mistral3ForConditionalGeneration", text_layers=(10, 20, 30), text_max_length=512,
        default_steps=50, guidance_scale=4.0, true_cfg=False,    # [bfl-util] flux.2-dev defaults
        hub_id="black-forest-labs/FLUX.2-dev",                    # [bfl-util]
    ),
    # The tiny folders of shared/tiny_flux2.py: the same classes at toy sizes (text width 16, so
    # joint_attention_dim 3 x 16; 8 latent channels, so in_channels 4 x 8; sum(axes_dims_rope) = head dim).
    "flux2-tiny": Flux2Preset(
        name="flux2-tiny",
        transformer=dict(
            patch_size=1, in_channels=32, out_channels=None, num_layers=1, num_single_layers=2,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=48,
            timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(2, 2, 2, 2), rope_theta=2000,
            eps=1e-6, guidance_embeds=False,
        ),
        text_encoder="Qwen3ForCausalLM", text_layers=(9, 18, 27), text_max_length=512,
        default_steps=20, guidance_scale=4.0, true_cfg=True,
    ),
}
