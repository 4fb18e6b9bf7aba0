"""The one home of the latent formulas: VAE scale/shift, 2x2 packing, position ids.

FLUX's transformer sees a latent `[B, 16, h, w]` as a sequence of `h/2 * w/2`
patches of 64 channels; each patch carries the position id `(0, row, col)`,
text tokens carry `(0, 0, 0)`.
"""
from __future__ import annotations

import torch

# FLUX VAE (AutoencoderKL, 16 channels): x0 = (mean - SHIFT) * SCALE.
# Models carry their own values in vae.config; these are FLUX.1's.
VAE_SHIFT = 0.1159
VAE_SCALE = 0.3611
LATENT_CHANNELS = 16
VAE_DOWNSAMPLE = 8


def scale_latents(mean: torch.Tensor, shift: float = VAE_SHIFT, scale: float = VAE_SCALE) -> torch.Tensor:
    """VAE posterior mean -> the x0 the transformer is trained on."""
    return (mean - shift) * scale


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """A sample of the VAE posterior, mean + exp(logvar / 2) * n with n ~ N(0, I) drawn from `generator`,
    in float32 ([B, C, h, w], before scale/shift). diffusers' own posterior, the one its FLUX training
    scripts sample (it clamps logvar to [-30, 20], as the VAE does)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    return DiagonalGaussianDistribution(torch.cat([mean.float(), logvar.float()], dim=1)).sample(generator)


def unscale_latents(x0: torch.Tensor, shift: float = VAE_SHIFT, scale: float = VAE_SCALE) -> torch.Tensor:
    """Inverse of `scale_latents`: what the VAE decoder takes."""
    return x0 / scale + shift


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C], patches in row-major order."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2 patches, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2)
    x = x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (h/2)(w/2), 4C] -> [B, C, h, w]; h, w are the latent (not pixel) size."""
    b, n, d = packed.shape
    if n != (h // 2) * (w // 2):
        raise ValueError(f"{n} patches do not make a {h}x{w} latent")
    x = packed.view(b, h // 2, w // 2, d // 4, 2, 2)
    x = x.permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids `(0, row, col)` for the patches of an `h x w` latent: [(h/2)(w/2), 3]."""
    rows = torch.arange(h // 2, device=device, dtype=dtype)
    cols = torch.arange(w // 2, device=device, dtype=dtype)
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Text tokens all sit at position (0, 0, 0): [length, 3]."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def joint_attention_mask(text_mask: torch.Tensor | None, image_tokens: int) -> torch.Tensor | None:
    """[B, L] text mask (True = real token) -> [B, 1, 1, L + S] bool over FLUX's joint sequence,
    text first, for `joint_attention_kwargs={"attention_mask": ...}`; None when nothing is masked."""
    if text_mask is None:
        return None
    image = torch.ones(text_mask.shape[0], image_tokens, dtype=torch.bool, device=text_mask.device)
    return torch.cat([text_mask.bool(), image], dim=1)[:, None, None, :]


def flex_block_mask(joint_mask: torch.Tensor):
    """joint_attention_mask's [B, 1, 1, S] bool mask as a flex-attention BlockMask, for diffusers'
    "flex" attention backend: the same keys are masked, but one flash-style kernel skips whole
    blocks of padding instead of the memory-efficient kernel reading a mask value per score."""
    from torch.nn.attention.flex_attention import create_block_mask
    keep = joint_mask[:, 0, 0, :]

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b, kv_idx]
    batch, length = keep.shape
    return create_block_mask(mask_mod, batch, None, length, length, device=keep.device)


def latent_size(height_px: int, width_px: int) -> tuple[int, int]:
    """Pixel size -> latent size, checking that the image packs into whole 2x2 patches."""
    step = VAE_DOWNSAMPLE * 2
    if height_px % step or width_px % step:
        raise ValueError(f"width and height must be multiples of {step}, got {width_px}x{height_px}")
    return height_px // VAE_DOWNSAMPLE, width_px // VAE_DOWNSAMPLE
