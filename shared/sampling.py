"""The sampler's loop, shared by `flux-sample` and the trainer's sample images: Euler steps over the
family's schedule, as diffusers' pipelines take them, and the conventions that pick the schedule.

Every formula (schedule, tokens, position ids, VAE normalisation, the transformer call) is the family's
(shared/family/), the code the trainer uses. The numerics follow the pipelines step for step (noise drawn
by `randn_tensor`, the timestep cast to the latents' dtype and divided by 1000, the Euler update in float32
and cast back), so the same weights, prompt, seed, size, steps and guidance give the same image, whichever
stage runs it.
"""
from __future__ import annotations

import torch

from .family import Family
from .latents import latent_size
from .text_batch import PromptEncoding, TextBatch

# Our CFG default for models trained with guidance dropout (and no guidance embedding).
DEFAULT_CFG = 4.0


def sampling_conventions(family: Family, info: dict, guidance_embeds: bool, model_index: dict | None = None,
                         scheduler_config: dict | None = None) -> dict:
    """How a model is sampled by default: {"shift_schedule", "default_steps", "guidance", "cfg_scale"}. The
    values a trainer saved (`info`, its flux_prep.json, or a preset's) win; else the published model's own
    (its family's rules over `model_index` and `scheduler_config`): the schedule's shift, its steps, the
    guidance embedding's value (None without one), true CFG for models trained with guidance dropout."""
    shift = info.get("shift_schedule")
    if shift is None:
        shift = family.default_shift(scheduler_config)
    steps = info.get("default_steps") or family.default_steps(bool(shift), model_index)
    guidance = info.get("guidance")
    guidance = float(family.default_guidance if guidance is None else guidance) if guidance_embeds else None
    cfg = info.get("cfg_scale")
    if cfg is None:
        dropout = float(info.get("guidance_dropout") or 0.0) > 0
        cfg = DEFAULT_CFG if dropout and not guidance_embeds else family.default_cfg(model_index, guidance_embeds)
    return {"shift_schedule": bool(shift), "default_steps": int(steps), "guidance": guidance, "cfg_scale": float(cfg)}


def guided_batch(cond: list[PromptEncoding], empty: PromptEncoding | None,
                 pad_multiple: int | None = None) -> TextBatch:
    """The text of one denoising batch: the prompts, then (for classifier-free guidance, `empty` given)
    as many empty prompts, padded and masked together so that both halves run in one forward."""
    return TextBatch.collate(list(cond) + ([empty] * len(cond) if empty is not None else []), pad_multiple)


def initial_noise(family: Family, latent_channels: int, seeds: list[int], height_px: int, width_px: int,
                  device, dtype) -> torch.Tensor:
    """Image tokens of noise [B, N, D], each image's drawn from its own seed exactly as the family's pipeline
    draws it (randn_tensor on a generator of `device`, in `dtype`, in the x0 shape, then packed)."""
    from diffusers.utils.torch_utils import randn_tensor
    h, w = latent_size(height_px, width_px)
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    shape = (len(seeds), *family.x0_shape(latent_channels, h, w))
    return family.pack(randn_tensor(shape, generator=gens, device=torch.device(device), dtype=dtype))


@torch.no_grad()
def denoise(family: Family, transformer, noise: torch.Tensor, text: TextBatch, *, height_px: int, width_px: int,
            steps: int, shift: bool = True, guidance: float | None = None, cfg_scale: float = 1.0,
            progress=None, refs=()) -> torch.Tensor:
    """Euler steps from noise tokens [B, N, D] to x0 tokens; `guidance` feeds the guidance embedding
    (distilled models). `cfg_scale` > 1 runs true classifier-free guidance: `text` then holds 2B rows,
    the prompts and the empty prompt's (guided_batch), and both passes run batched in one forward. `refs`:
    reference images (packed x0 tokens [1, Nr, D], latent h, w), the same for every image and both CFG
    passes, as FluxKontextPipeline and Flux2KleinPipeline give them; the schedule counts the noisy tokens only."""
    b, n, _ = noise.shape
    device, dtype = noise.device, noise.dtype
    h, w = latent_size(height_px, width_px)
    sigmas = family.sampling_sigmas(steps, n, shift).to(device)
    timesteps = sigmas[:-1] * 1000.0   # FlowMatchEulerDiscreteScheduler's timesteps
    use_cfg = cfg_scale > 1.0
    reps = 2 if use_cfg else 1
    if text.states.shape[0] != b * reps:
        raise ValueError(f"{text.states.shape[0]} text rows for {b} images" + (" with CFG (needs 2 per image: "
                         "the prompt's and the empty prompt's)" if use_cfg else ""))
    states = text.states if text.mask is None else text.states * text.mask[..., None]
    text = TextBatch(states.to(dtype), None if text.pooled is None else text.pooled.to(dtype), text.mask)
    if transformer.config.guidance_embeds:
        guidance = guidance if guidance is not None else family.default_guidance
    else:
        guidance = None
    refs = [(r.to(device, dtype).expand(b * reps, -1, -1), rh, rw) for r, rh, rw in refs]
    x = noise
    for i, t in enumerate(timesteps):
        x_in = torch.cat([x] * reps) if use_cfg else x
        timestep = t.expand(x_in.shape[0]).to(dtype)
        v = family.predict(transformer, x_in, timestep / 1000, text, h, w, guidance, refs=refs)
        if use_cfg:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        # As the scheduler's step: float32 update, 0-d float32 dt, back to the model's dtype.
        x = (x.to(torch.float32) + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
        if progress is not None:
            progress.update(1)
    return x


@torch.no_grad()
def decode(family: Family, vae, tokens: torch.Tensor, height_px: int, width_px: int) -> torch.Tensor:
    """x0 tokens -> uint8 images [B, H, W, 3] (VaeImageProcessor's postprocess: [-1,1] -> round(255 x))."""
    h, w = latent_size(height_px, width_px)
    latents = family.from_x0(family.unpack(tokens, h, w), family.vae_facts(vae))
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    image = (image / 2 + 0.5).clamp(0, 1)
    return (image.permute(0, 2, 3, 1).float().cpu() * 255).round().to(torch.uint8)


def fuse_lora_adapter(model, folder: str, weight_name: str, prefix: str | None, scale: float = 1.0) -> None:
    """Merge an adapter in diffusers' layout (the trainer's final/: keys under `prefix`, "transformer" in
    FluxPipeline's layout, None in older finals) into `model`'s weights, as flux-sample samples it:
    diffusers' loader, then fuse and drop the adapter layers, so the loop runs plain Linear layers (and
    compiles) as without an adapter. `scale` multiplies the adapter's delta (diffusers' lora_scale)."""
    from .adapters import fuse_peft_adapter, read_adapter   # (adapters imports this module)
    path = f"{folder}/{weight_name}"
    if read_adapter(path, prefix, tensors=False)[1].get("peft_type") == "LOHA":   # diffusers' loader reads
        fuse_peft_adapter(model, *read_adapter(path, prefix), scale)                 # LoRA, DoRA and LoKr only
        return
    model.load_lora_adapter(folder, weight_name=weight_name, prefix=prefix, use_safetensors=True)
    model.fuse_lora(lora_scale=scale)
    model.unload_lora()
