"""The denoising loop: Euler steps over FLUX's schedule, as diffusers' FluxPipeline takes them.

Every formula (schedule, packing, position ids, VAE scale/shift) comes from `shared/`, the code the
trainer uses. The numerics follow FluxPipeline step for step (noise drawn by `randn_tensor`, the
timestep cast to the latents' dtype and divided by 1000, the Euler update in float32 and cast back),
so the same weights, prompt, seed, size, steps and guidance give the same image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shared.latents import (LATENT_CHANNELS, image_ids, joint_attention_mask, latent_size, pack_latents, text_ids,
                            unpack_latents)
from shared.schedules import sampling_sigmas
from shared.text import encode_prompts, round_up


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

    @staticmethod
    def concat(a: "TextBatch", b: "TextBatch") -> "TextBatch":
        """[a; b] on the batch axis, padding the shorter text to the longer one."""
        la, lb = a.t5.shape[1], b.t5.shape[1]
        length = max(la, lb)

        def pad(x: TextBatch, n: int):
            mask = x.mask if x.mask is not None else torch.ones(x.t5.shape[:2], dtype=torch.bool, device=x.t5.device)
            if n == length:
                return x.t5, mask
            extra = length - n
            return (torch.cat([x.t5, x.t5.new_zeros(x.t5.shape[0], extra, x.t5.shape[2])], 1),
                    torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1))

        (ta, ma), (tb, mb) = pad(a, la), pad(b, lb)
        mask = torch.cat([ma, mb])
        return TextBatch(torch.cat([ta, tb]), torch.cat([a.clip, b.clip]), None if bool(mask.all()) else mask)


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
            shift: bool = True, guidance: float | None = None, cfg_scale: float = 1.0,
            uncond: TextBatch | None = None, progress=None) -> torch.Tensor:
    """Euler steps from packed noise to packed x0; `guidance` feeds the guidance embedding (distilled
    models), `cfg_scale` > 1 runs true classifier-free guidance against `uncond`, batched with the
    conditional pass in one forward."""
    b, n, _ = noise.shape
    device, dtype = noise.device, noise.dtype
    h, w = latent_size(height_px, width_px)
    sigmas = sampling_sigmas(steps, n, shift=shift).to(device)
    timesteps = sigmas[:-1] * 1000.0   # FlowMatchEulerDiscreteScheduler's timesteps
    use_cfg = cfg_scale > 1.0
    if use_cfg:
        if uncond is None:
            raise ValueError("classifier-free guidance needs the empty prompt's encoding")
        text = TextBatch.concat(text, uncond)
    reps = 2 if use_cfg else 1
    img_ids = image_ids(h, w, device=device, dtype=dtype)
    txt_ids = text_ids(text.t5.shape[1], device=device, dtype=dtype)
    mask = joint_attention_mask(text.mask, n)
    attn_kwargs = None if mask is None else {"attention_mask": mask}
    t5 = text.t5.to(dtype) if text.mask is None else (text.t5 * text.mask[..., None]).to(dtype)
    clip = text.clip.to(dtype)
    if transformer.config.guidance_embeds:
        g = guidance if guidance is not None else 3.5
        guidance_vec = torch.full([b * reps], g, device=device, dtype=torch.float32)
    else:
        guidance_vec = None
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
    from shared.latents import unscale_latents
    h, w = latent_size(height_px, width_px)
    latents = unpack_latents(packed, h, w)
    latents = unscale_latents(latents, shift=vae.config.shift_factor, scale=vae.config.scaling_factor)
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    image = (image / 2 + 0.5).clamp(0, 1)
    return (image.permute(0, 2, 3, 1).float().cpu() * 255).round().to(torch.uint8)


def configure_speed(transformer, *, compile_blocks: bool = False, attention_backend: str = "default",
                    cudnn_sdpa: bool = True, fuse_qkv: bool = False, mode: str | None = None,
                    compile_backend: str = "inductor"):
    """The project's fast path: an attention backend for every block, q/k/v fused into one GEMM,
    torch.compile per repeated block (regional compilation: each FluxTransformerBlock /
    FluxSingleTransformerBlock compiled once, its graph reused for all 19/38 blocks, so compile time
    stays in seconds), and optionally cuDNN SDPA off (it crashed under autocast on torch 2.11+cu130
    in the trainer's backward)."""
    if not cudnn_sdpa and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    if fuse_qkv:
        transformer.fuse_qkv_projections()
    if attention_backend != "default":
        transformer.set_attention_backend(attention_backend)
    if compile_blocks:
        # All 57 blocks share one forward; give dynamo room for their guards without falling back to eager.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        for block in blocks:
            block.compile(fullgraph=True, dynamic=False, mode=mode, backend=compile_backend)
    return transformer
