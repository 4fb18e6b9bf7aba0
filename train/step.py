"""The flow-matching step (docs/DESIGN.md, "Training") and the validation loss.

x0 = (z - shift) * scale with z the VAE posterior's mean (flow.latent: mean) or a sample of it
(sample: mean + exp(logvar / 2) * n), x_t = (1 - t) x0 + t n, v = n - x0, loss = mse(model(x_t, t, text), v).
Every formula (scale, posterior sample, packing, position ids, timestep samplers) comes from `shared`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shared.latents import (VAE_SCALE, VAE_SHIFT, flex_block_mask, image_ids, joint_attention_mask, pack_latents,
                            sample_posterior, scale_latents, text_ids)
from shared.schedules import sample_timesteps, validation_timesteps
from shared.text import pad_text

from .data import TrainBatch, sample_seed


@dataclass
class StepSettings:
    sampler: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    guidance_dropout: float = 0.0
    dropout_mode: str = "joint"          # joint: one coin drops T5 and CLIP; independent: a coin each
    latent: str = "mean"                 # mean: the posterior mean; sample: a sample of the posterior
    guidance: float | None = None        # set for guidance-distilled models (guidance_embeds=True)
    vae_shift: float = VAE_SHIFT
    vae_scale: float = VAE_SCALE
    flex_mask: bool = False              # text padding masked through flex attention (run.masked_attention)

    @classmethod
    def from_config(cls, flow, vae: tuple[float, float], **kw) -> "StepSettings":
        """From the config's flow section (FlowConfig) and the cache's VAE (shift, scale)."""
        return cls(sampler=flow.sampler, logit_mean=flow.logit_mean, logit_std=flow.logit_std,
                   guidance_dropout=flow.guidance_dropout, dropout_mode=flow.guidance_dropout_mode,
                   latent=flow.latent, vae_shift=vae[0], vae_scale=vae[1], **kw)


class EmptyPrompt:
    """The cache's empty-prompt encodings on the training device, for guidance dropout."""

    def __init__(self, encodings: dict, device):
        self.t5 = encodings["t5"].to(device)            # [L_e, D]
        self.clip = encodings["clip"].to(device)        # [Dc]
        self.t5_len = int(encodings["t5_len"])


def drop_text(batch: TrainBatch, empty: EmptyPrompt, drop: torch.Tensor,
              drop_clip: torch.Tensor | None = None) -> tuple:
    """Replace the T5 encodings of samples where `drop` is True by the empty prompt's, and their CLIP
    encodings where `drop_clip` is (None: where `drop` is, the joint dropout)."""
    drop_clip = drop if drop_clip is None else drop_clip
    t5, clip, mask = batch.t5, batch.clip, batch.t5_mask
    length = t5.shape[1]
    if mask is None:  # padded: every caption, and the empty prompt, has all max_length positions
        if empty.t5.shape[0] != length:
            raise ValueError(f"empty-prompt T5 has {empty.t5.shape[0]} positions, the batch {length}")
        empty_t5 = empty.t5
    else:
        length = max(length, empty.t5.shape[0])   # keep every position of the empty prompt
        t5, mask = pad_text(t5, mask, length)
        empty_t5, _ = pad_text(empty.t5, None, length)
        empty_mask = torch.arange(length, device=mask.device) < empty.t5_len
        mask = torch.where(drop[:, None], empty_mask[None], mask)
    t5 = torch.where(drop[:, None, None], empty_t5.to(t5.dtype)[None], t5)
    clip = torch.where(drop_clip[:, None], empty.clip.to(clip.dtype)[None], clip)
    return t5, clip, mask


def predict(model, x_t: torch.Tensor, t: torch.Tensor, t5: torch.Tensor, clip: torch.Tensor,
            t5_mask: torch.Tensor | None, guidance: float | None, flex_mask: bool = False) -> torch.Tensor:
    """The transformer's velocity for a [B, C, h, w] x_t, packed: [B, hw/4, 4C]. `flex_mask`: the
    text padding goes to the model as a flex-attention BlockMask (its attention backend is "flex")."""
    b, _, h, w = x_t.shape
    device = x_t.device
    packed = pack_latents(x_t)
    mask = joint_attention_mask(t5_mask, packed.shape[1])
    if mask is not None and flex_mask:
        mask = flex_block_mask(mask)
    out = model(
        hidden_states=packed,
        encoder_hidden_states=t5,
        pooled_projections=clip,
        timestep=t,
        img_ids=image_ids(h, w, device=device),
        txt_ids=text_ids(t5.shape[1], device=device),
        guidance=None if guidance is None else torch.full((b,), float(guidance), device=device),
        joint_attention_kwargs=None if mask is None else {"attention_mask": mask},
        return_dict=False,
    )[0]
    return out


def flow_matching_loss(model, latent: torch.Tensor, t5: torch.Tensor, clip: torch.Tensor,
                       t5_mask: torch.Tensor | None, t: torch.Tensor, noise: torch.Tensor,
                       settings: StepSettings) -> torch.Tensor:
    """Per-sample loss [B] (float32) for given timesteps and noise; `latent` is the VAE posterior's
    mean or a sample of it, before scale/shift."""
    x0 = scale_latents(latent.float(), settings.vae_shift, settings.vae_scale)
    tb = t.view(-1, 1, 1, 1)
    x_t = (1.0 - tb) * x0 + tb * noise
    target = pack_latents(noise - x0)
    pred = predict(model, x_t, t, t5.float(), clip.float(), t5_mask, settings.guidance, settings.flex_mask)
    return (pred.float() - target).pow(2).mean(dim=(1, 2))


def draw(batch: TrainBatch, settings: StepSettings, generator: torch.Generator) -> dict:
    """The step's random draws from the step's generator, in this fixed order (a resumed run, whose
    generator state is restored, repeats them exactly): timesteps [B]; noise [B, C, h, w]; the T5
    dropout coins [B] (in joint mode the one coin for T5 and CLIP); the CLIP coins [B] (independent mode
    only); the posterior's noise [B, C, h, w] (latent: sample only). The options add draws at the end
    only, so joint mode with the posterior mean draws what the trainer always drew."""
    latent = batch.latent
    b, _, h, w = latent.shape
    t = sample_timesteps(settings.sampler, b, generator=generator, image_seq_len=(h // 2) * (w // 2),
                         mean=settings.logit_mean, std=settings.logit_std, device=latent.device)
    noise = torch.randn(latent.shape, generator=generator, device=latent.device, dtype=torch.float32)
    drop_t5 = torch.rand(b, generator=generator, device=latent.device) < settings.guidance_dropout
    drop_clip = drop_t5
    if settings.dropout_mode == "independent":
        drop_clip = torch.rand(b, generator=generator, device=latent.device) < settings.guidance_dropout
    out = {"t": t, "noise": noise, "drop_t5": drop_t5, "drop_clip": drop_clip}
    if settings.latent == "sample":
        out["latent"] = sample_posterior(latent, batch.latent_logvar, generator)
    return out


def training_loss(model, batch: TrainBatch, settings: StepSettings, generator: torch.Generator,
                  empty: EmptyPrompt | None) -> torch.Tensor:
    """Mean flow-matching loss of one batch (on the model's device), with guidance dropout."""
    r = draw(batch, settings, generator)
    if empty is not None and settings.guidance_dropout > 0:
        t5, clip, mask = drop_text(batch, empty, r["drop_t5"], r["drop_clip"])
    else:
        t5, clip, mask = batch.t5, batch.clip, batch.t5_mask
    latent = r.get("latent", batch.latent)
    return flow_matching_loss(model, latent, t5, clip, mask, r["t"], r["noise"], settings).mean()


def validation_noise(keys: list[str], shape: tuple, i: int) -> torch.Tensor:
    """[B, *shape] float32 on the CPU: each sample's fixed noise at validation timestep i, drawn from a
    seed fixed by the sample's key and i, so the same on every rerun and at any world size."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(k, i)))
                        for k in keys])


class ValidationNoise:
    """The fixed validation noise, drawn once per (batch, timestep) and reused by later passes.

    Memory: a batch's noise at all n timesteps is n x its latents' element count in float32, i.e.
    8 x 4 = 32 bytes per latent value: 16x the batch's latents cached in bf16 (2 MiB per 512-px sample,
    whose latent is 16 x 64 x 64). It is kept on the host, not the device, whose memory training needs;
    the copy to the device each pass is what the old per-pass draw did anyway. Entries are kept in
    first-seen order until `max_bytes` is reached; the rest are drawn again on each pass (the same
    values, at the old CPU cost). Cached tensors are only read (the loss builds new tensors from them).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self.bytes = 0
        self.draws = 0          # (batch, timestep) noises drawn: once each if all fit under max_bytes
        self._cache: dict = {}

    def get(self, keys: list[str], shape: tuple, i: int) -> torch.Tensor:
        # Keyed by exactly what validation_noise depends on, so a hit is the very same tensor.
        entry = (tuple(keys), tuple(shape), i)
        noise = self._cache.get(entry)
        if noise is None:
            noise = validation_noise(keys, shape, i)
            self.draws += 1
            size = noise.numel() * noise.element_size()
            if self.bytes + size <= self.max_bytes:
                self._cache[entry] = noise
                self.bytes += size
        return noise


@torch.no_grad()
def validation_sums(model, batches, settings: StepSettings, device, n_timesteps: int = 8,
                    noise: ValidationNoise | None = None) -> torch.Tensor:
    """[2, n_timesteps] float64: at each fixed t = (i + 0.5)/n, the summed squared error over every
    latent element of the batches, and the number of those elements (for summarize_validation).
    It is measured on the posterior mean whatever flow.latent says: a fixed target, like the noise.

    Noise is drawn on the CPU from a seed fixed by each sample's key and timestep index, so the
    value is the same on every rerun and at any world size (sum over ranks, then divide). With
    `noise` (a ValidationNoise kept across passes) it is drawn once and reused, with the same values."""
    sums = torch.zeros(2, n_timesteps, dtype=torch.float64, device=device)
    ts = validation_timesteps(n_timesteps)
    for batch in batches:
        batch = batch.to(device)
        keys = batch.key
        b = len(keys)
        shape = tuple(batch.latent.shape[1:])
        elements = math.prod(shape)     # per sample: the loss is a mean over these (packing keeps them)
        for i, t_value in enumerate(ts.tolist()):
            n = noise.get(keys, shape, i) if noise is not None else validation_noise(keys, shape, i)
            t = torch.full((b,), t_value, device=device)
            loss = flow_matching_loss(model, batch.latent, batch.t5, batch.clip, batch.t5_mask, t, n.to(device),
                                      settings)
            sums[0, i] += loss.double().sum() * elements
            sums[1, i] += b * elements
    return sums


def summarize_validation(sums: torch.Tensor) -> dict:
    """The validation loss as torchtitan's FLUX validation computes it: summed squared error over
    the summed count of latent elements, so a sample weighs by its latent size (a 64x64 latent four
    times a 32x32 one), not one per sample; also per timestep. Every sample is seen at every
    timestep, so the overall value is also the mean of the per-timestep values."""
    per_t = (sums[0] / sums[1].clamp(min=1)).tolist()
    n = len(per_t)
    out = {f"val/loss_t{i}_{n}": v for i, v in enumerate(per_t)}
    out["val/loss"] = float(sums[0].sum() / sums[1].sum().clamp(min=1))
    return out
