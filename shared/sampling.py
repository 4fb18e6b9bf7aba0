"""The sampler's loop, shared by `flux-sample` and the trainer's sample images: Euler steps over FLUX's
schedule, as diffusers' FluxPipeline takes them, and the conventions that pick the schedule.

Every formula (schedule, packing, position ids, VAE scale/shift) comes from `shared/`, the code the
trainer uses. The numerics follow FluxPipeline step for step (noise drawn by `randn_tensor`, the
timestep cast to the latents' dtype and divided by 1000, the Euler update in float32 and cast back),
so the same weights, prompt, seed, size, steps and guidance give the same image, whichever stage runs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .latents import (LATENT_CHANNELS, image_ids, joint_attention_mask, latent_size, pack_latents, text_ids,
                      unpack_latents, unscale_latents)
from .schedules import sampling_sigmas
from .text import encode_prompts, round_up

# FluxPipeline's default guidance for guidance-distilled models, and our CFG default for models
# trained with guidance dropout.
DEFAULT_GUIDANCE = 3.5
DEFAULT_CFG = 4.0
# Steps when nothing says otherwise: FLUX.1-dev's (shifted schedule) and FLUX.1-schnell's (unshifted).
SHIFTED_STEPS, UNSHIFTED_STEPS = 28, 4


def schedule_conventions(info: dict, scheduler_config: dict | None) -> dict:
    """`shift_schedule` and `default_steps`: the values a trainer saved (`info`, its flux_prep.json, or a
    preset's), else the published model's scheduler config (dynamic shifting on unless it says no),
    with FLUX.1-dev's step count for a shifted schedule and schnell's for an unshifted one."""
    shift = info.get("shift_schedule")
    if shift is None:
        shift = (scheduler_config or {}).get("use_dynamic_shifting", True)
    steps = info.get("default_steps") or (SHIFTED_STEPS if shift else UNSHIFTED_STEPS)
    return {"shift_schedule": bool(shift), "default_steps": int(steps)}


def guidance_conventions(info: dict, guidance_embeds: bool) -> tuple[float | None, float]:
    """(guidance embedding value or None, CFG scale) a model is sampled with by default: the guidance it
    was trained with (guidance-distilled models), and true CFG for models trained with guidance dropout."""
    guidance = info.get("guidance")
    guidance = float(DEFAULT_GUIDANCE if guidance is None else guidance) if guidance_embeds else None
    cfg = info.get("cfg_scale")
    if cfg is None:
        cfg = DEFAULT_CFG if float(info.get("guidance_dropout") or 0.0) > 0 and not guidance_embeds else 1.0
    return guidance, float(cfg)


@dataclass
class PromptEncoding:
    """One prompt's text conditioning: T5 states [L, D] (only the real tokens when trimmed), CLIP [Dc]."""
    t5: torch.Tensor
    clip: torch.Tensor


@dataclass
class TextBatch:
    """A batch's conditioning; `mask` [B, L] marks real T5 tokens (None: every token counts)."""
    t5: torch.Tensor
    clip: torch.Tensor
    mask: torch.Tensor | None

    @staticmethod
    def collate(items: list[PromptEncoding], pad_multiple: int | None = None) -> "TextBatch":
        """Stack prompts, padding trimmed T5 states with zeros to the longest (rounded up to
        `pad_multiple`, for a compiled transformer) and masking the padding."""
        longest = max(e.t5.shape[0] for e in items)
        if pad_multiple:
            longest = round_up(longest, pad_multiple)
        t5 = items[0].t5.new_zeros(len(items), longest, items[0].t5.shape[1])
        mask = torch.zeros(len(items), longest, dtype=torch.bool, device=t5.device)
        for i, e in enumerate(items):
            t5[i, :e.t5.shape[0]] = e.t5
            mask[i, :e.t5.shape[0]] = True
        return TextBatch(t5, torch.stack([e.clip for e in items]), None if bool(mask.all()) else mask)


def guided_batch(cond: list[PromptEncoding], empty: PromptEncoding | None,
                 pad_multiple: int | None = None) -> TextBatch:
    """The text of one denoising batch: the prompts, then (for classifier-free guidance, `empty` given)
    as many empty prompts, padded and masked together so that both halves run in one forward."""
    return TextBatch.collate(list(cond) + ([empty] * len(cond) if empty is not None else []), pad_multiple)


@torch.no_grad()
def encode_all(prompts: list[str], t5_tokenizer, t5, clip_tokenizer, clip, *, t5_mode: str, t5_max_length: int,
               batch_size: int = 8) -> list[PromptEncoding]:
    """Encode every prompt once, up front, so that the text encoders can leave memory before sampling."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        enc = encode_prompts(chunk, t5_tokenizer, t5, clip_tokenizer, clip, t5_mode=t5_mode,
                             t5_max_length=t5_max_length)
        for i in range(len(chunk)):
            # Trimmed: keep only the real tokens, as the cache stores them for the trainer.
            n = int(enc["t5_len"][i]) if t5_mode == "trimmed" else enc["t5"].shape[1]
            out.append(PromptEncoding(enc["t5"][i, :n].clone(), enc["clip"][i].clone()))
    return out


def initial_noise(seeds: list[int], height_px: int, width_px: int, device, dtype) -> torch.Tensor:
    """Packed noise [B, (h/2)(w/2), 64], each image's drawn from its own seed exactly as FluxPipeline's
    `prepare_latents` draws it (randn_tensor on a generator of `device`, in `dtype`, then packed)."""
    from diffusers.utils.torch_utils import randn_tensor
    h, w = latent_size(height_px, width_px)
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    noise = randn_tensor((len(seeds), LATENT_CHANNELS, h, w), generator=gens, device=torch.device(device), dtype=dtype)
    return pack_latents(noise)


@torch.no_grad()
def denoise(transformer, noise: torch.Tensor, text: TextBatch, *, height_px: int, width_px: int, steps: int,
            shift: bool = True, guidance: float | None = None, cfg_scale: float = 1.0, progress=None) -> torch.Tensor:
    """Euler steps from packed noise [B, N, 64] to packed x0; `guidance` feeds the guidance embedding
    (distilled models). `cfg_scale` > 1 runs true classifier-free guidance: `text` then holds 2B rows,
    the prompts and the empty prompt's (guided_batch), and both passes run batched in one forward."""
    b, n, _ = noise.shape
    device, dtype = noise.device, noise.dtype
    h, w = latent_size(height_px, width_px)
    sigmas = sampling_sigmas(steps, n, shift=shift).to(device)
    timesteps = sigmas[:-1] * 1000.0   # FlowMatchEulerDiscreteScheduler's timesteps
    use_cfg = cfg_scale > 1.0
    reps = 2 if use_cfg else 1
    if text.t5.shape[0] != b * reps:
        raise ValueError(f"{text.t5.shape[0]} text rows for {b} images" + (" with CFG (needs 2 per image: "
                         "the prompt's and the empty prompt's)" if use_cfg else ""))
    img_ids = image_ids(h, w, device=device, dtype=dtype)
    txt_ids = text_ids(text.t5.shape[1], device=device, dtype=dtype)
    mask = joint_attention_mask(text.mask, n)
    attn_kwargs = None if mask is None else {"attention_mask": mask}
    t5 = text.t5.to(dtype) if text.mask is None else (text.t5 * text.mask[..., None]).to(dtype)
    clip = text.clip.to(dtype)
    guidance_vec = None
    if transformer.config.guidance_embeds:
        g = guidance if guidance is not None else DEFAULT_GUIDANCE
        guidance_vec = torch.full([b * reps], g, device=device, dtype=torch.float32)
    x = noise
    for i, t in enumerate(timesteps):
        x_in = torch.cat([x] * reps) if use_cfg else x
        timestep = t.expand(x_in.shape[0]).to(dtype)
        v = transformer(hidden_states=x_in, timestep=timestep / 1000, guidance=guidance_vec,
                        pooled_projections=clip, encoder_hidden_states=t5, txt_ids=txt_ids, img_ids=img_ids,
                        joint_attention_kwargs=attn_kwargs, return_dict=False)[0]
        if use_cfg:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        # As the scheduler's step: float32 update, 0-d float32 dt, back to the model's dtype.
        x = (x.to(torch.float32) + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
        if progress is not None:
            progress.update(1)
    return x


@torch.no_grad()
def decode(vae, packed: torch.Tensor, height_px: int, width_px: int) -> torch.Tensor:
    """Packed x0 -> uint8 images [B, H, W, 3] (VaeImageProcessor's postprocess: [-1,1] -> round(255 x))."""
    h, w = latent_size(height_px, width_px)
    latents = unpack_latents(packed, h, w)
    latents = unscale_latents(latents, shift=vae.config.shift_factor, scale=vae.config.scaling_factor)
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    image = (image / 2 + 0.5).clamp(0, 1)
    return (image.permute(0, 2, 3, 1).float().cpu() * 255).round().to(torch.uint8)


def fuse_lora_adapter(model, folder: str, weight_name: str, prefix: str | None) -> None:
    """Merge an adapter in diffusers' layout (the trainer's final/: keys under `prefix`, "transformer" in
    FluxPipeline's layout, None in older finals) into `model`'s weights, as flux-sample samples it:
    diffusers' loader, then fuse and drop the adapter layers, so the loop runs plain Linear layers (and
    compiles) as without an adapter."""
    model.load_lora_adapter(folder, weight_name=weight_name, prefix=prefix, use_safetensors=True)
    model.fuse_lora()
    model.unload_lora()
