"""bench/sample.py's two families: the transformer (random init of a preset's real shapes), its inputs, the
plain diffusers loop each is measured against, and a random-init VAE of the family's real config to turn
final latents into pixels (the image difference of a row from the bf16 loop's).

  FLUX.1 [dev]   FluxPipeline's loop: FlowMatchEulerDiscreteScheduler + the transformer, guidance embedding 3.5
  FLUX.2 [klein] Flux2KleinPipeline's loop (base model: true CFG 4.0, two transformer calls per step, the
                 prompt's and the negative prompt's), its exponential schedule with compute_empirical_mu
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from shared.family import get_family
from shared.latents import image_ids, latent_size, text_ids
from shared.presets import transformer_config
from shared.sampling import initial_noise
from shared.text_batch import TextBatch

# FLUX.1 [dev]'s vae/config.json (black-forest-labs/FLUX.1-dev; diffusers' AutoencoderKL): written here, not
# downloaded. FLUX.2's is AutoencoderKLFlux2's defaults (128..512 wide, 32 latent channels).
FLUX1_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                 layers_per_block=2, act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024,
                 scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
                 force_upcast=True, mid_block_add_attention=True)
TINY_VAE = dict(block_out_channels=(32,) * 4, layers_per_block=1, norm_num_groups=8)   # --tiny: a fast smoke


@dataclass
class Setup:
    family: object
    preset: str
    transformer: torch.nn.Module
    noise: torch.Tensor
    text: TextBatch            # 2B rows with CFG (prompts, then the empty prompt's), as guided_batch makes them
    guidance: float | None     # the guidance embedding's value (FLUX.1 [dev]), None without one
    cfg_scale: float
    baseline: Callable[[int], torch.Tensor]   # steps -> final latents, the plain diffusers loop
    make_vae: Callable[[], torch.nn.Module]


def build_transformer(family, preset: str, device, dtype):
    """Random init straight on the device in the target dtype (12B in bf16: 24 GB, no fp32 copy)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = family.transformer_cls()(**transformer_config(preset))
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def _vae(cls, config: dict, device, dtype):
    torch.manual_seed(0)
    return cls(**config).to(device, dtype).eval().requires_grad_(False)


def flux1_setup(preset, device, dtype, batch, size, text_len, tiny) -> Setup:
    from diffusers import AutoencoderKL
    family = get_family("flux1")
    transformer = build_transformer(family, preset, device, dtype)
    cfg = transformer.config
    g = torch.Generator(device=device).manual_seed(0)
    t5 = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g, device=device, dtype=dtype)
    clip = torch.randn(batch, cfg.pooled_projection_dim, generator=g, device=device, dtype=dtype)
    noise = initial_noise(family, cfg.in_channels // 4, list(range(batch)), size, size, device, dtype)
    guidance = 3.5 if cfg.guidance_embeds else None
    g_tensor = None if guidance is None else torch.full([batch], guidance, device=device, dtype=torch.float32)
    vae_cfg = {**FLUX1_VAE, **(TINY_VAE if tiny else {}), "latent_channels": cfg.in_channels // 4}
    return Setup(family, preset, transformer, noise, TextBatch(t5, clip, None), guidance, 1.0,
                 lambda n: flux1_loop(transformer, noise, t5, clip, g_tensor, size, size, n),
                 lambda: _vae(AutoencoderKL, vae_cfg, device, dtype))


@torch.no_grad()
def flux1_loop(transformer, noise, t5, clip, guidance, height, width, steps):
    """What FluxPipeline.__call__ does between prompt encoding and VAE decoding."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    h, w = latent_size(height, width)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(noise.shape[1]),
                        device=noise.device)
    sched.set_begin_index(0)
    img, txt = image_ids(h, w, noise.device, noise.dtype), text_ids(t5.shape[1], noise.device, noise.dtype)
    x = noise
    for t in sched.timesteps:
        timestep = t.expand(x.shape[0]).to(x.dtype)
        v = transformer(hidden_states=x, timestep=timestep / 1000, guidance=guidance, pooled_projections=clip,
                        encoder_hidden_states=t5, txt_ids=txt, img_ids=img, return_dict=False)[0]
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


def flux2_setup(preset, device, dtype, batch, size, text_len, tiny) -> Setup:
    from diffusers import AutoencoderKLFlux2
    family = get_family("flux2")
    transformer = build_transformer(family, preset, device, dtype)
    cfg = transformer.config
    g = torch.Generator(device=device).manual_seed(0)
    cond = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g, device=device, dtype=dtype)
    neg = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g, device=device, dtype=dtype)
    noise = initial_noise(family, cfg.in_channels // 4, list(range(batch)), size, size, device, dtype)
    cfg_scale = 4.0   # the klein base's (presets_flux2: true_cfg, guidance_scale 4.0)
    vae_cfg = {**(TINY_VAE if tiny else {}), "latent_channels": cfg.in_channels // 4}
    return Setup(family, preset, transformer, noise, TextBatch(torch.cat([cond, neg]), None, None), None, cfg_scale,
                 lambda n: flux2_klein_loop(transformer, noise, cond, neg, size, size, n, cfg_scale),
                 lambda: _vae(AutoencoderKLFlux2, vae_cfg, device, dtype))


@torch.no_grad()
def flux2_klein_loop(transformer, noise, cond, neg, height, width, steps, cfg_scale):
    """What Flux2KleinPipeline.__call__ does between prompt encoding and VAE decoding (no reference image)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline, compute_empirical_mu
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=noise.device,
                        mu=compute_empirical_mu(image_seq_len=noise.shape[1], num_steps=steps))
    sched.set_begin_index(0)
    h, w = latent_size(height, width)
    img = Flux2KleinPipeline._prepare_latent_ids(torch.empty(noise.shape[0], 1, h // 2, w // 2)).to(noise.device)
    txt = Flux2KleinPipeline._prepare_text_ids(cond).to(noise.device)
    x = noise
    for t in sched.timesteps:
        timestep = t.expand(x.shape[0]).to(x.dtype)
        call = dict(hidden_states=x, timestep=timestep / 1000, guidance=None, txt_ids=txt, img_ids=img,
                    return_dict=False)
        v = transformer(encoder_hidden_states=cond, **call)[0]
        v_neg = transformer(encoder_hidden_states=neg, **call)[0]
        x = sched.step(v_neg + cfg_scale * (v - v_neg), t, x, return_dict=False)[0]
    return x


SETUPS = {"flux1": flux1_setup, "flux2": flux2_setup}
PRESETS = {"flux1": ("flux-dev", "tiny"), "flux2": ("flux2-klein-4b", "flux2-tiny")}   # (default, --tiny)
